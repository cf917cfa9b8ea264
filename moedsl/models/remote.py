"""Models that ship their own modeling code: when moedsl runs it, and which files it is.

A model directory whose family transformers does not know carries `configuration_*.py` and
`modeling_*.py` beside its weights and names their classes in config.json's `auto_map`
(`"AutoConfig": "configuration_x.XConfig"`); a remote tokenizer is named the same way in
tokenizer_config.json. Loaders run that code only when asked to (`trust_remote_code=True`), and
so does moedsl (`--trust-remote-code`):

- without the flag, a directory that cannot be loaded without its code is refused, naming the
  files and the flag; a directory whose `model_type` transformers knows loads with the built-in
  classes and its `auto_map` is left alone (what transformers does);
- with the flag, every file the `auto_map`s name, and every file those import relatively, must
  lie inside the directory: code from another repository (`"repo--module.Class"`), a path that
  leaves the directory (also through a symlink) or a missing file is a located error. The classes
  are then loaded as transformers loads them (`get_class_from_dynamic_module`, in this process).

`RemoteCode` lists those files with their sha256, for the run report, for the resume
fingerprint, and for copying them into the output directory so the quantized model loads the
same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moedsl.errors import MoedslError, Span

FLAG = "--trust-remote-code"
HOW_TO_TRUST = f"pass {FLAG} (`trust_remote_code=True` in the library API)"
TOKENIZER_CONFIG = "tokenizer_config.json"

# the relative imports transformers follows to find a module's companion files (same patterns)
_RELATIVE_IMPORT = re.compile(r"^\s*(?:import\s+\.(\S+)\s*$|from\s+\.(\S+)\s+import)", re.M)


@dataclass(frozen=True)
class RemoteCode:
    """The code a model directory ships and that this run trusts."""

    root: Path  # the directory holding the code (the model directory, or a --config file's directory)
    auto_map: dict[str, str]  # "AutoConfig", "AutoModelForCausalLM", "AutoTokenizer (fast)", ... -> "module.Class"
    files: tuple[str, ...]  # every code file, relative to `root` (modules and what they import relatively)

    def digests(self) -> dict[str, str]:
        """File (relative to the directory) -> sha256 of its bytes."""
        return {f: hashlib.sha256((self.root / f).read_bytes()).hexdigest() for f in self.files}

    def record(self) -> dict[str, Any]:
        """What a report says about it: that remote code ran, from which directory and files."""
        return {"trusted": True, "directory": str(self.root), "auto_map": dict(self.auto_map),
                "files": self.digests()}

    def copy_to(self, out: Path) -> list[Path]:
        """Copy every code file into `out` under the same relative path (config.json keeps `auto_map`)."""
        written = []
        for f in self.files:
            dest = out / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.partial")
            shutil.copyfile(self.root / f, tmp)
            tmp.replace(dest)
            written.append(dest)
        return written

    @property
    def config_class_ref(self) -> str | None:
        return self.auto_map.get("AutoConfig")


# ------------------------------------------------------------------------------------------ policy


def needs_remote_code(data: dict) -> bool:
    """Whether a config cannot be loaded without the code its `auto_map` names: its `model_type` is
    not one transformers knows, or transformers has no causal-LM class for it and `auto_map` has one."""
    auto_map = data.get("auto_map")
    if not isinstance(auto_map, dict) or not ({"AutoConfig", "AutoModelForCausalLM"} & set(auto_map)):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        return True
    return "AutoModelForCausalLM" in auto_map and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def policy(config_file: Path, trust: bool, data: dict | None = None, text: str | None = None) -> RemoteCode | None:
    """The code to run for the config at `config_file` (its directory holds the code), or None
    when none runs. Raises the refusal when the config needs its own code and `trust` is off."""
    config_file = Path(config_file)
    if data is None:
        text, data = _read_json(config_file)
    if not isinstance(data, dict):
        return None
    if not trust:
        if needs_remote_code(data):
            raise _refusal(config_file, data, text)
        return None
    if data.get("auto_map") is None and not _tokenizer_auto_map(config_file.parent):
        return None
    return find(config_file, data, text)


def _refusal(config_file: Path, data: dict, text: str | None) -> MoedslError:
    auto_map = data["auto_map"]
    modules = []
    for ref in auto_map.values():
        for r in ref if isinstance(ref, list) else [ref]:
            if isinstance(r, str) and "." in r:
                name = r.rsplit(".", 1)[0] + ".py"
                if name not in modules:
                    modules.append(name)
    key = "AutoConfig" if "AutoConfig" in auto_map else "AutoModelForCausalLM"
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = data.get("model_type")
    why = (f"transformers has no causal-LM class for model_type `{model_type}`" if model_type in CONFIG_MAPPING_NAMES
           else f"model_type `{model_type}` is not a transformers model type")
    return MoedslError(
        f"{why}: this model directory ships its own modeling code "
        f"({', '.join(modules) or 'named by auto_map'}), which moedsl runs only with {FLAG}",
        span=_locate(config_file, text, key), code="remote code",
        notes=[f"that code runs in this process with your permissions: read it, then {HOW_TO_TRUST}"])


# ------------------------------------------------------------------------------------------ files


def find(config_file: Path, data: dict, text: str | None = None) -> RemoteCode:
    """Every code file the `auto_map`s of config.json (and tokenizer_config.json) name, checked."""
    root = config_file.parent
    refs: dict[str, tuple[str, Path, str | None]] = {}  # label -> (ref, json file, its text)
    declared = data.get("auto_map") or {}
    if not isinstance(declared, dict):
        raise MoedslError(f"`auto_map` must be an object of class references, not {json.dumps(declared)[:80]}",
                          span=_locate(config_file, text, "auto_map"), code="remote code")
    for label, ref in declared.items():
        _collect(refs, label, ref, config_file, text)
    tok_file = root / TOKENIZER_CONFIG
    tok_map = _tokenizer_auto_map(root)
    if tok_map:
        tok_text = tok_file.read_text(encoding="utf-8")
        for label, ref in tok_map.items():
            _collect(refs, label, ref, tok_file, tok_text)
    files: list[str] = []
    auto_map: dict[str, str] = {}
    for label, (ref, where, where_text) in refs.items():
        module = _module_file(root, label, ref, where, where_text)
        auto_map[label] = ref
        for f in _with_relative_imports(root, module):
            if f not in files:
                files.append(f)
    for f in files:
        _check_compiles(root / f)
    return RemoteCode(root=root, auto_map=auto_map, files=tuple(files))


def _check_compiles(path: Path) -> None:
    """A syntax error is reported at its line here: transformers would report it for `<unknown>`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        compile(text, str(path), "exec", dont_inherit=True)
    except SyntaxError as err:
        raise MoedslError(f"SyntaxError in the model directory's own code: {err.msg}",
                          span=Span(str(path), err.lineno or 1, err.offset or 1, 1, text), code="remote code") from None


def _collect(refs: dict, label: str, ref: Any, where: Path, text: str | None) -> None:
    if isinstance(ref, list):  # tokenizers: [slow, fast], either may be null
        for i, r in enumerate(ref):
            if r is not None:
                _collect(refs, f"{label} ({'slow' if i == 0 else 'fast'})", r, where, text)
        return
    if not isinstance(ref, str):
        raise MoedslError(f"auto_map `{label}` must be a string \"module.Class\", not {json.dumps(ref)}",
                          span=_locate(where, text, label.split(" ")[0]), code="remote code")
    refs[label] = (ref, where, text)


def _module_file(root: Path, label: str, ref: str, where: Path, text: str | None) -> str:
    """The file (relative to `root`) that auto_map entry `ref` names, checked to exist inside `root`."""
    key = label.split(" ")[0]
    span = _locate(where, text, key, ref)
    if "--" in ref:
        raise MoedslError(f"auto_map `{label}` names code in another repository (`{ref.split('--')[0]}`): moedsl "
                          f"runs only code inside the model directory {root}", span=span, code="remote code",
                          notes=["copy that code into the model directory and name it as `module.Class`"])
    parts = ref.split(".")
    if len(parts) != 2 or not all(parts):
        raise MoedslError(f"auto_map `{label}` is `{ref}`, not `module.Class`", span=span, code="remote code")
    module = parts[0] + ".py"
    rel = Path(module)
    root_real = root.resolve()
    target = (root / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not target.is_relative_to(root_real):
        raise MoedslError(f"auto_map `{label}` names `{module}`, which is outside the model directory {root} "
                          f"(resolves to {target})", span=span, code="remote code",
                          notes=["moedsl runs only code inside the model directory"])
    if not target.is_file():
        raise MoedslError(f"auto_map `{label}` names `{module}`, which is not in the model directory {root}",
                          span=span, code="remote code", suggestion=_nearest_py(root, module))
    return rel.as_posix()


def _with_relative_imports(root: Path, module: str) -> list[str]:
    """`module` and, recursively, the files it imports relatively (`from .x import y`), as
    transformers collects them; each must be a file inside `root`."""
    root_real = root.resolve()
    out = [module]
    todo = [module]
    while todo:
        current = todo.pop()
        path = root / current
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in _RELATIVE_IMPORT.finditer(text):
            name = m.group(1) or m.group(2)
            rel = (Path(current).parent / (name.replace(".", "/") + ".py")).as_posix()
            target = (root / rel).resolve()
            line = text.count("\n", 0, m.start()) + 1
            col = m.start(1 if m.group(1) else 2) - (text.rfind("\n", 0, m.start(1 if m.group(1) else 2)) + 1)
            span = Span(str(path), line, col, len(name), text)
            if not target.is_relative_to(root_real):
                raise MoedslError(f"`{current}` imports `.{name}`, which resolves outside the model directory "
                                  f"({target})", span=span, code="remote code")
            if not target.is_file():
                raise MoedslError(f"`{current}` imports `.{name}`, but {rel} is not in the model directory {root}",
                                  span=span, code="remote code", suggestion=_nearest_py(root, rel))
            if rel not in out:
                out.append(rel)
                todo.append(rel)
    return out


def _nearest_py(root: Path, name: str) -> str | None:
    from moedsl.errors import nearest

    return nearest(name, [p.relative_to(root).as_posix() for p in root.glob("*.py")])


def _tokenizer_auto_map(root: Path) -> dict:
    path = root / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # the tokenizer loader reports a broken file when it is used
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    return auto_map if isinstance(auto_map, dict) else {}


def _read_json(path: Path) -> tuple[str | None, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        return text, json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, None  # whoever reads the config next says what is wrong with it


def _locate(path: Path, text: str | None, key: str, value: str | None = None) -> Span:
    """Where `"key": "value"` (or just the key) is in a JSON text; line 1 when it cannot be found."""
    if text:
        m = re.search(r'"%s"\s*:\s*' % re.escape(key), text)
        if m is not None:
            start, length = m.start(), len(key) + 2
            if value is not None:
                v = text.find(json.dumps(value), m.end())
                if v != -1:
                    start, length = v, len(json.dumps(value))
            line = text.count("\n", 0, start) + 1
            col = start - (text.rfind("\n", 0, start) + 1) + 1
            return Span(str(path), line, col, length, text)
    return Span(str(path), 1, 1, 1, text)


# ------------------------------------------------------------------------------------------ running


def load_config(rc: RemoteCode, data: dict) -> Any:
    """The config object of `data` (a config.json's contents), from the directory's own config
    class; as `AutoConfig.for_model` builds built-in ones, with `name_or_path` set to the code's
    directory so that `AutoModelForCausalLM.from_config(..., trust_remote_code=True)` finds its model class."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from moedsl.models.tiny import quiet_transformers

    ref = rc.config_class_ref
    with running(rc, "loading the config class"), quiet_transformers():
        cls = get_class_from_dynamic_module(ref, str(rc.root), local_files_only=True)
        kwargs = {k: v for k, v in data.items() if k != "model_type"}
        config = cls(**kwargs)
    config._name_or_path = str(rc.root)
    return config


def is_remote_config(config: Any) -> bool:
    """Whether a config object's class came from a model directory's own code."""
    return type(config).__module__.split(".")[0] == "transformers_modules"


@contextlib.contextmanager
def running(rc: RemoteCode | None, what: str, only_in_code: bool = False) -> Iterator[None]:
    """Turn an exception raised inside the directory's own code into a located MoedslError
    (file:line of the deepest frame in that code). While classes are being loaded, transformers
    refusing the files (a missing package or class) is turned too; with `only_in_code` (forward
    passes), only exceptions raised in that code. Other exceptions pass unchanged."""
    try:
        yield
    except MoedslError:
        raise
    except Exception as exc:
        if rc is None:
            raise
        names = {Path(f).name: f for f in rc.files}
        frame = None
        tb = traceback.extract_tb(exc.__traceback__)
        for fs in tb:
            if Path(fs.filename).name in names and "transformers_modules" in Path(fs.filename).parts:
                frame = fs
        if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).name in names:
            path = rc.root / names[Path(exc.filename).name]
            span = Span(str(path), exc.lineno or 1, exc.offset or 1, 1, _text(path))
        elif frame is not None:
            path = rc.root / names[Path(frame.filename).name]
            span = Span(str(path), frame.lineno or 1, 1, 1, _text(path))
        elif not only_in_code and isinstance(exc, (ImportError, OSError, AttributeError, ValueError)):
            span = None  # transformers refusing the files (a missing package, a missing class, ...)
        else:
            raise
        raise MoedslError(f"the model directory's own code failed while {what}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", span=span,
                          code="remote code") from None


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


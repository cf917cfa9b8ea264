"""The definition library: the `.moedef` files shipped in `model_defs/`, found by name or model_type."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from moedsl.errors import MoedslError, nearest
from moedsl.lang import ir
from moedsl.lang.parser import parse_file
from moedsl.lang.resolve import resolve

# moedsl/model_defs is a link to the checkout's top-level model_defs/ and a real folder in the wheel
LIBRARY_DIR = (Path(__file__).resolve().parents[1] / "model_defs").resolve()


def library_files(extra_dirs: Iterable[Path] = ()) -> list[Path]:
    files: list[Path] = []
    for d in (*extra_dirs, LIBRARY_DIR):
        if d.is_dir():
            files += sorted(d.glob("*.moedef"))
    return files


@lru_cache(maxsize=256)
def _parse_cached(path: str, mtime_ns: int, size: int) -> ir.Definition:
    return parse_file(path)


def parse_cached(path: Path) -> ir.Definition:
    """parse_file, once per version of the file (its modification time and size)."""
    st = path.stat()
    return _parse_cached(str(path), st.st_mtime_ns, st.st_size)


def find(name: str, extra_dirs: Iterable[Path] = ()) -> ir.Definition:
    """The definition whose `arch` is `name` (file `name.moedef` first, then any file)."""
    extra_dirs = tuple(extra_dirs)
    for d in (*extra_dirs, LIBRARY_DIR):
        candidate = d / f"{name}.moedef"
        if candidate.is_file():
            parsed = parse_cached(candidate)
            if parsed.header.name == name:
                return parsed
    names = []
    for f in library_files(extra_dirs):
        try:
            parsed = parse_cached(f)
        except MoedslError:
            continue  # a broken file beside the one being resolved is not this definition's problem
        if parsed.header.name == name:
            return parsed
        names.append(parsed.header.name)
    raise MoedslError(f"no definition named `{name}` in the library", expected=sorted(names)[:12],
                      suggestion=nearest(name, names))


def load(source: str | Path, extra_dirs: Iterable[Path] = ()) -> ir.Definition:
    """A resolved definition from a file path or a library name (`extends` and `use` expanded)."""
    path = Path(source)
    if path.suffix == ".moedef" or path.exists():
        parsed = parse_cached(path) if path.is_file() else parse_file(path)  # parse_file says what is wrong
        dirs = (path.resolve().parent, *extra_dirs)
    else:
        parsed = find(str(source), extra_dirs)
        dirs = tuple(extra_dirs)
    return resolve(parsed, lambda n: find(n, dirs))


def all_definitions() -> list[ir.Definition]:
    """Every definition in the library, resolved."""
    return [load(f) for f in library_files()]


def model_type_of(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, dict):
        mt = config.get("model_type")
    else:
        mt = getattr(config, "model_type", None)
    if not mt:
        raise MoedslError("the config has no `model_type`")
    return str(mt)


def _may_match(path: Path, mt: str) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return True  # parse_file says what is wrong with it
    return mt in text or "\\" in text


def for_model(model_or_config: Any) -> ir.Definition:
    """The library definition that matches this model's (or config's) `model_type`."""
    mt = model_type_of(model_or_config)
    files = library_files()
    # A `match "…"` naming mt spells it out in the file's text, or escapes a character of it (a backslash): the
    # other files cannot match, and are parsed only to list the known types when none does.
    for f in files:
        if _may_match(f, mt):
            parsed = parse_cached(f)
            if mt in parsed.header.matches:
                return load(f)
    known: list[str] = []
    for f in files:
        parsed = parse_cached(f)
        if mt in parsed.header.matches:
            return load(f)
        known += parsed.header.matches
    raise MoedslError(f"no definition in the library matches model_type `{mt}`", suggestion=nearest(mt, known),
                      notes=["`moedsl list` shows the supported model types; write a .moedef for a new one "
                             "and pass it with --def"])

"""The output directory of a run: kept apart from the source, locked, resumable, complete or visibly not.

1. Apart from the source. A run deletes and writes only inside its output directory. Before it
   touches anything there, `check_apart` refuses an output directory that is, holds, or lies
   inside the model directory (symlinks followed; also by inode, so bind mounts count), that
   holds a file the model directory links to, the built-in default model, or an input file
   (calibration data, a definition). `--overwrite` and `--no-resume` can never delete a source.
2. Locked. `hold` takes an exclusive `flock` on `.moedsl-lock` inside the directory; a second run
   into the same directory stops with exit 2 before it changes anything.
3. Ours or refused. A directory is used when it is empty or new, when it holds `.moedsl-run/`
   (an interrupted moedsl run: resumed, or cleared with `--no-resume` / `--overwrite`), or when it
   holds a finished moedsl checkpoint and `--overwrite` is given. Anything else is refused.
   What the run replaces is cleared only at `begin`, just before its first write, so a run that
   fails on input found late leaves the old checkpoint as it was. `.moedsl-run/` is created
   first, before any other file, so every state a kill can leave is recognisably ours.
4. Resumable. After each layer, `commit_layer` writes the next layer's inputs to a new
   `acts-NNNNN.safetensors`, then `state.json` naming it (the commit), then removes the older
   inputs: the state and the inputs it names always belong together. The state carries the run's
   fingerprint (`fingerprint.py`); a resumed run whose options or source differ is refused.
5. Complete or visibly not. Every file is written atomically (`write/files.py`), config.json with
   `quantization_config` last of all (`CheckpointWriter.finalize`), and `.moedsl-run/` is removed
   only after it (`finish`). A run that fails before any layer finished leaves nothing behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from moedsl.errors import MoedslError
from moedsl.write.files import filesystem_error, save_atomic, stop_point, write_atomic

RUN_DIR = ".moedsl-run"  # resume state; removed when the run finishes
STATE_NAME = "state.json"
LOCK_NAME = ".moedsl-lock"
REPORT_NAME = "moedsl-report.json"


def _inside(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies below it: by path after following symlinks, and by
    inode along `inner`'s existing ancestors."""
    inner, outer = inner.resolve(), outer.resolve()
    if inner == outer or outer in inner.parents:
        return True
    try:
        o = outer.stat()
    except OSError:
        return False
    for p in (inner, *inner.parents):
        try:
            s = p.stat()
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (o.st_dev, o.st_ino):
            return True
    return False


def _linked_files(model_dir: Path) -> list[Path]:
    """The files a model directory's top-level symlinks point at (a hub cache's snapshot links to blobs)."""
    try:
        entries = list(model_dir.iterdir())
    except OSError:
        return []
    return [p.resolve() for p in entries if p.is_symlink()]


def check_apart(out: Path, model_dir: Path | None, inputs: dict[str, str | Path | None]) -> None:
    """Refuse `out` when writing or cleaning it could touch what the run reads.

    model_dir: the model directory (None: the built-in default). inputs: option name → an input
    file (calibration data, a definition file); names that are not files (a library definition) are skipped.
    """
    from moedsl.models.default import DEFAULT_NAME, cache_root

    default_dir = cache_root() / DEFAULT_NAME
    sources = [("--model", model_dir)] if model_dir is not None else []
    sources.append(("the built-in default model", default_dir))
    why = "moedsl never writes into, or deletes, what a run reads"
    for name, src in sources:
        label = f"{name} {src}" if name.startswith("--") else f"{name} ({src})"
        if _inside(out, src) and _inside(src, out):
            raise MoedslError(f"--out {out} is {label}", notes=[why, "choose a new output directory"])
        if _inside(out, src):
            raise MoedslError(f"--out {out} lies inside {label}",
                              notes=[why, "choose an output directory outside the model directory"])
        if _inside(src, out):
            raise MoedslError(f"--out {out} holds {label}",
                              notes=[why, "choose an output directory that does not hold the model"])
    if model_dir is not None:
        for target in _linked_files(model_dir):
            if _inside(target, out):
                raise MoedslError(f"--out {out} holds {target}, a file of --model {model_dir} (through a symlink)",
                                  notes=[why, "choose another output directory"])
    for name, path in inputs.items():
        if path is not None and Path(path).is_file() and _inside(Path(path), out):
            raise MoedslError(f"--out {out} holds the {name} file {path}",
                              notes=[why, f"move {path} out of the output directory, or choose another one"])


def is_finished(directory: Path) -> bool:
    """A finished moedsl checkpoint: config.json with `quantization_config`, and the run report."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization_config" in config and (directory / REPORT_NAME).is_file()


def _first_non_directory(path: Path) -> Path | None:
    for p in reversed((path, *path.parents)):
        if p.exists() and not p.is_dir():
            return p
    return None


class OutputDir:
    """One run's hold on its output directory; made by `hold`, ended by `finish` or `release`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.run_dir = self.path / RUN_DIR
        self.state: dict | None = None  # the interrupted run this one continues, if any
        self.notes: list[str] = []  # what preparing the directory did, for the progress output
        self._fd: int | None = None
        self._created = False
        self._owned = False  # the directory's contents are this run's to clear

    # ---- taking hold ------------------------------------------------------------------

    def _create(self) -> None:
        out = self.path
        if out.exists() and not out.is_dir():
            raise MoedslError(f"--out {out}: exists and is not a directory")
        self._created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocker = _first_non_directory(out)
            if blocker is not None:
                raise MoedslError(f"--out {out}: cannot create it: {blocker} is a file, not a directory") from None
            raise filesystem_error(exc, out, "create") from None

    def _lock(self) -> None:
        path = self.path / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise filesystem_error(exc, path, "create the lock file") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise filesystem_error(exc, path, "lock") from None
                who = f"another moedsl run (pid {holder})" if holder.isdigit() else "another moedsl run"
                raise MoedslError(f"--out {self.path}: {who} holds this output directory",
                                  notes=["two runs writing one directory would mix their checkpoints: wait for the "
                                         "other run to end, or choose another --out"]) from None
            try:  # the last holder removes the file when it ends: make sure ours is still the one there
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:  # who holds it, for the message another run prints; a full disk may refuse even this
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass

    def _entries(self) -> list[Path]:
        try:
            return sorted(p for p in self.path.iterdir() if p.name != LOCK_NAME)
        except OSError as exc:
            raise filesystem_error(exc, self.path, "read") from None

    def _classify(self, resume: bool, overwrite: bool) -> str:
        """"interrupted", "finished" (to overwrite) or "empty"; refuses what is not ours to change."""
        if self.run_dir.is_dir():
            return "interrupted"
        if not self._entries():
            return "empty"
        if not is_finished(self.path):
            raise MoedslError(f"--out {self.path} is not empty and holds no moedsl run to resume",
                              notes=["choose an empty or new directory (--overwrite replaces only a finished moedsl "
                                     "checkpoint)"])
        if not overwrite:
            raise MoedslError(f"--out {self.path} already holds a finished checkpoint",
                              notes=["pass --overwrite to replace it"])
        return "finished"

    def _clear(self) -> None:
        """Leave only the lock and an empty `.moedsl-run/` (only ever called on a directory that is ours).

        `.moedsl-run/` is made first and the completion marker and the resume state go before the rest,
        so a kill part way leaves a directory that is neither complete nor resumable, but still ours."""
        def remove(p: Path) -> None:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            except OSError as exc:
                raise filesystem_error(exc, p, "remove") from None

        try:
            self.run_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise filesystem_error(exc, self.run_dir, "create") from None
        remove(self.path / "config.json")
        remove(self.run_dir / STATE_NAME)
        for p in self._entries():
            if p != self.run_dir:
                remove(p)
        for p in sorted(self.run_dir.iterdir()):
            remove(p)

    def _read_state(self) -> dict | None:
        path = self.run_dir / STATE_NAME
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            acts = self.run_dir / state["acts"]
            ok = isinstance(state["finished"], int) and acts.is_file() and "fingerprint" in state
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise MoedslError(f"--out {self.path}: the interrupted run's state ({path}) cannot be read",
                              notes=["pass --no-resume to start over"])
        return state

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        kind = self._classify(resume, overwrite)
        if kind == "interrupted" and resume and not overwrite:
            self.state = self._read_state()
            if self.state is not None:
                self._owned = True
                for p in [*self.path.glob(".*.partial"), *self.run_dir.glob(".*.partial")]:
                    p.unlink(missing_ok=True)  # files a kill interrupted; written again when resumed
                return
            self.notes.append("the interrupted run had finished no layer: starting over")

    def begin(self) -> None:
        """Just before the first write: clear what this run replaces (a killed run, or with --overwrite a
        finished checkpoint). Until then a failing run (bad input found late) has changed nothing."""
        if self.state is None and not self._owned:
            self._owned = True
            self._clear()

    # ---- the resume state -------------------------------------------------------------

    def resume(self, fingerprint: dict) -> dict:
        """The interrupted run's state, when its fingerprint is this run's; else a MoedslError saying what differs."""
        from moedsl.execute.fingerprint import changes

        assert self.state is not None
        saved = self.state["fingerprint"]
        if saved != fingerprint:
            options, source = changes(saved, fingerprint)
            if options:
                raise MoedslError(f"--out {self.path} holds an interrupted run with other options: "
                                  + "; ".join(options),
                                  notes=["pass --no-resume to start over, or repeat the earlier options"])
            raise MoedslError(f"--out {self.path}: the source changed since the interrupted run: " + "; ".join(source),
                              notes=["resuming would mix two sources in one checkpoint; pass --no-resume to start "
                                     "over"])
        return self.state

    def load_acts(self, device) -> dict:
        from safetensors.torch import load_file

        assert self.state is not None
        return load_file(str(self.run_dir / self.state["acts"]), device=str(device))

    def commit_layer(self, finished: int, acts: dict, fingerprint: dict, layers: list[dict]) -> None:
        """Record that `finished` layers are done: their successor's inputs, then the state that names them."""
        name = f"acts-{finished:05d}.safetensors"
        save_atomic(self.run_dir / name, acts)
        state = {"fingerprint": fingerprint, "finished": finished, "acts": name, "layers": layers}
        write_atomic(self.run_dir / STATE_NAME, json.dumps(state).encode())
        for old in self.run_dir.glob("acts-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    # ---- letting go -------------------------------------------------------------------

    def finish(self) -> None:
        """The checkpoint is complete (config.json written): drop the resume state and the lock."""
        self._owned = False  # complete now: nothing may clear it, even if what follows fails
        stop_point("finish")
        try:
            shutil.rmtree(self.run_dir)
        except OSError as exc:
            raise filesystem_error(exc, self.run_dir, "remove") from None
        self._unlock()

    def release(self) -> None:
        """End a run that failed: keep a resumable state; remove what a run that finished no layer left."""
        if self._fd is None:
            return
        try:
            if self._owned and not (self.run_dir / STATE_NAME).exists():
                self._clear()
                self.run_dir.rmdir()
            if self._created and (self._owned or not self._entries()):
                (self.path / LOCK_NAME).unlink()
                self.path.rmdir()
        except (OSError, MoedslError):
            pass  # best effort: the directory stays visibly unfinished (no config.json)
        self._unlock()

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)  # while still holding it (see `_lock`)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def hold(out: Path, *, resume: bool, overwrite: bool) -> OutputDir:
    """Create (if needed), lock and check `out` for a run; `.state` is the run to resume, if any.
    Nothing in it is changed before `begin`."""
    d = OutputDir(out)
    if d.path.is_dir():
        d._classify(resume, overwrite)  # refuse a directory that is not ours before even locking it
    d._create()
    try:
        d._lock()
        d._prepare(resume, overwrite)
    except BaseException:
        d.release()
        if d._created and d._fd is None:
            try:
                d.path.rmdir()
            except OSError:
                pass
        raise
    return d

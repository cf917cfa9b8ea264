"""Writing the files of an output directory so that no file ever looks finished before it is.

    write_atomic(path, data)        bytes → a hidden `.NAME.partial` beside `path`, fsynced, renamed over it
    write_all_atomic(files)         every partial first, then the renames in order (a failure leaves none)
    save_atomic(path, tensors)      the same for a safetensors file
    copy_atomic(src, dst)           the same for a copy
    filesystem_error(exc, path)     an OSError (or safetensors' I/O error) as a MoedslError naming the path

A kill leaves at most a `.NAME.partial` (never a truncated `NAME`); a failed write (disk full,
read-only file system, permission denied) removes its partial file and raises a `MoedslError`
that says which file, what went wrong and what to do.

`stop_point(name)` is a test hook: when `MOEDSL_TEST_STOP` names the point, the process stops
there, as if killed at that moment (see its docstring). Every atomic write has the point
`write:NAME`, between writing the partial file and renaming it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Mapping

from moedsl.errors import MoedslError

_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose an --out with room) and run the same command again; "
                  "a run resumes after its last finished layer",
    errno.EDQUOT: "the disk quota is exceeded: free space and run the same command again; a run resumes after its "
                  "last finished layer",
    errno.EROFS: "the file system is read-only: choose an --out on a writable one",
    errno.EACCES: "permission denied: choose an --out you may write",
    errno.EPERM: "operation not permitted: choose an --out you may write",
    errno.EFBIG: "the file is larger than this process may write (see `ulimit -f`)",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}


def filesystem_error(exc: BaseException, path: str | os.PathLike, doing: str = "write") -> MoedslError:
    """`exc` (an OSError, or safetensors' error wrapping one) as a MoedslError naming `path`."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors: "... I/O error: No space left on device (os error 28)"
        m = re.search(r"os error (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    reason = os.strerror(code) if code else str(exc)
    notes = [_ADVICE[code]] if code in _ADVICE else []
    return MoedslError(f"cannot {doing} {path}: {reason}", notes=notes, code="write")


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _sync(tmp: Path) -> None:
    """fsync a partial file, and give it the mode a new file gets from the umask (safetensors makes 0600)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _rename(tmp: Path, path: Path) -> None:
    stop_point(f"write:{path.name}")
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise filesystem_error(exc, path) from None


def _commit(tmp: Path, path: Path) -> None:
    _sync(tmp)
    _rename(tmp, path)


def _guarded(path: Path, write) -> None:
    tmp = _partial(path)
    try:
        write(tmp)
        _commit(tmp, path)
    except Exception as exc:
        if not isinstance(exc, OSError) and "os error" not in str(exc):
            raise
        tmp.unlink(missing_ok=True)
        raise filesystem_error(exc, path) from None


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _guarded(Path(path), write)


def write_all_atomic(files: list[tuple[Path, bytes]]) -> None:
    """Write every file's partial first, then rename them in order: a failed write (a full disk)
    leaves none of them, a kill leaves a prefix of them."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            tmp = _partial(path)
            written.append((tmp, path))
            with open(tmp, "wb") as f:
                f.write(data)
            _sync(tmp)
    except OSError as exc:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise filesystem_error(exc, written[-1][1]) from None
    for tmp, path in written:
        _rename(tmp, path)


def save_atomic(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    from moedsl.write.safetensors_file import write_safetensors

    _guarded(Path(path), lambda tmp: write_safetensors(tmp, tensors, dict(metadata or {})))


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    _guarded(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def stop_requested(name: str) -> bool:
    """Whether `stop_point(name)` will stop (a caller may first finish work in flight elsewhere)."""
    return os.environ.get("MOEDSL_TEST_STOP") == name


def stop_point(name: str) -> None:
    """Tests: stop the process at the point `name` when `MOEDSL_TEST_STOP` names it.

    With `MOEDSL_TEST_STOP_FILE` set, the process writes its pid there and waits to be killed (the
    test sends SIGKILL by pid); without it, the process SIGKILLs itself.
    """
    if os.environ.get("MOEDSL_TEST_STOP") != name:
        return
    marker = os.environ.get("MOEDSL_TEST_STOP_FILE")
    if not marker:
        os.kill(os.getpid(), signal.SIGKILL)
    Path(marker).write_text(f"{os.getpid()}\n")
    while True:
        time.sleep(60)

"""Reading and writing the text files users hand to moedsl, with located errors.

Bytes that are not UTF-8 are reported as `file:line:col` (the line and column of the first bad
byte, counted in the characters before it), not only as a byte offset; a file is replaced
atomically, so a failed write leaves the old file as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moedsl.errors import MoedslError, Span


def undecodable_span(path: str | Path, data: bytes, err: UnicodeDecodeError) -> Span:
    """Where the first undecodable byte of `data` sits, as line:col (1-based, in characters)."""
    before = data[: err.start].decode("utf-8", errors="replace")
    line = before.count("\n") + 1
    col = len(before) - (before.rfind("\n") + 1) + 1
    line_end = data.find(b"\n", err.start)
    shown = data[err.start - len(before.rsplit("\n", 1)[-1].encode("utf-8", "replace")): line_end if line_end != -1 else None]
    source = "\n" * (line - 1) + shown.decode("utf-8", errors="replace")[:200]
    return Span(str(path), line, col, 1, source)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`; a `MoedslError` naming the file (and line:col) otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MoedslError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MoedslError(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise MoedslError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start: err.end]
        raise MoedslError(f"not UTF-8 text: byte 0x{bad[0]:02x} at offset {err.start} ({err.reason})",
                          span=undecodable_span(path, data, err),
                          notes=["save the file as UTF-8"]) from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) through a temporary file beside it, keeping its mode."""
    path = Path(path)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise MoedslError(f"{path}: the text cannot be written as UTF-8 ({err.reason} at character {err.start})") \
            from None
    tmp = None
    try:
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied (the file is not writable)")
        mode = path.stat().st_mode & 0o7777 if path.exists() else None
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise MoedslError(f"{path}: cannot write: {err.strerror or err}", notes=["the file was left unchanged"]) \
            from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass

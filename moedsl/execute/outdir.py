"""The output directory of a run, kept apart from everything the run reads.

A run deletes and writes only inside its output directory. Before it touches anything there,
`check_apart` refuses an output directory that is, holds, or lies inside the model directory
(symlinks followed; also by inode, so bind mounts and hard-linked trees count), that holds a
file the model directory links to, the built-in default model, or an input file (calibration
data, a definition). `--overwrite` and `--no-resume` can then never delete a source.
"""

from __future__ import annotations

import os
from pathlib import Path

from moedsl.errors import MoedslError


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

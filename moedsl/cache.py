"""Where moedsl keeps what it may rebuild at any time (the default model, the analysed grammar)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where moedsl caches things: `cache_dir`, else `$MOEDSL_CACHE`, else `~/.cache/moedsl`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MOEDSL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "moedsl"

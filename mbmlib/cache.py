"""Where mbmlib keeps what it builds at first use (the CPU kernel, EvoApproxLib circuits' tables).

``$MBMLIB_CACHE``, else ``$XDG_CACHE_HOME/mbmlib``, i.e. ``~/.cache/mbmlib``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("MBMLIB_CACHE"):
        return Path(os.environ["MBMLIB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mbmlib"

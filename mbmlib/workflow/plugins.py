"""User designs for the commands: Python files that call ``mbmlib.register_design``, named by ``--designs`` or
the env var ``MBMLIB_DESIGNS`` (paths separated by ``os.pathsep``), run once per process before a command.

The env var also reaches the processes a command starts (papermill's notebook kernels, torchrun's workers),
which load the same files when they train.
"""
from __future__ import annotations

import os
import runpy
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["ENV_VAR", "load_design_files"]

ENV_VAR = "MBMLIB_DESIGNS"
_LOADED: set[Path] = set()


def load_design_files(paths: Optional[Iterable[str]] = None) -> list[Path]:
    """Run each design file once (``paths``, else those of ``$MBMLIB_DESIGNS``); the files run now.

    A missing file is a ValueError naming it; an error inside a file is re-raised with the file's name.
    """
    if paths is None:
        paths = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    ran = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if path in _LOADED:
            continue
        if not path.is_file():
            raise ValueError(f"design file {raw!r} does not exist; name a Python file that calls "
                             f"mbmlib.register_design (--designs or ${ENV_VAR})")
        try:
            runpy.run_path(str(path), run_name=f"mbmlib_designs_{path.stem}")
        except Exception as err:
            raise ValueError(f"design file {raw}: {type(err).__name__}: {err}") from err
        _LOADED.add(path)
        ran.append(path)
    return ran

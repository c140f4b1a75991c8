"""Atomic result files: write to a temporary file beside the target, then rename.

A run killed mid-write leaves the previous file (or none), never half a JSON.
"""
from __future__ import annotations

import atexit
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

CHECKPOINT = "checkpoint.pt"
REPLACED = ".replaced"  # where a replaced run goes, inside the results folder
RUN_FILES = ("config.json", "metrics.json", "history.csv", CHECKPOINT)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Call ``write(file)`` on a temporary file and move it onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda f: f.write(text))


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a killed writer left in ``folder``; returns what was removed.

    Call it only where no other process is writing (e.g. when a run is resumed: one writer per run folder).
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run's records (config, metrics, history or checkpoint)."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def move_run_aside(run_dir: str | os.PathLike) -> Path:
    """Move a run folder to ``<parent>/.replaced/<name>-<UTC time>/``, so replacing a run loses nothing."""
    run_dir = Path(run_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    aside = run_dir.parent / REPLACED / f"{run_dir.name}-{stamp}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, aside)
    print(f"--overwrite: moved the earlier run {run_dir.name} to {aside}", flush=True)
    return aside


def claim_result_files(paths, overwrite: bool, option: str = "--overwrite") -> list[Path]:
    """Make sure writing ``paths`` loses nothing: a ValueError naming the first that exists, unless ``overwrite``,
    which moves each existing one to ``<its folder>/.replaced/<name>-<UTC time>``.  Call it before the work.

    Returns where the earlier files went.
    """
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} exists (an earlier result of the same name); pass {option} to move the "
                         "earlier files aside to .replaced/, or --name to write beside them")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    moved = []
    for path in existing:
        aside = path.parent / REPLACED / f"{path.stem}-{stamp}{path.suffix}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, aside)
        print(f"{option}: moved the earlier {path.name} to {aside}", flush=True)
        moved.append(aside)
    return moved


_HELD_LOCKS: dict[Path, Any] = {}  # lock files this process holds, open until it exits (kill -9 frees them too)


@atexit.register
def _release_locks() -> None:
    for handle in _HELD_LOCKS.values():
        handle.close()


def lock_run(run_dir: str | os.PathLike) -> None:
    """Hold an exclusive lock on the run folder ``run_dir`` for the rest of this process (one writer per run).

    The lock file is ``<parent>/.locks/<name>.lock``, outside the run folder, so moving a run aside never moves
    the lock.  A second process asking for the same run gets a RunFolderInUse error at once.  Where the OS has
    no ``fcntl`` (Windows), runs are not locked.
    """
    try:
        import fcntl
    except ImportError:
        return
    run_dir = Path(run_dir)
    path = (run_dir.parent / ".locks" / f"{run_dir.name}.lock").resolve()
    if path in _HELD_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderInUse(f"run folder {run_dir} is in use by {owner}; wait for it to finish, or pick another "
                             "--run-name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()
    _HELD_LOCKS[path] = handle


class RunFolderInUse(ValueError):
    """Another process is writing the run folder (a ValueError: a one-line error, exit 2, from the CLI)."""

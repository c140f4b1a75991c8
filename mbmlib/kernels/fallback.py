"""The kernels' one fallback chain: triton -> compiled (native C++ -> inductor) -> reference.

A stage that cannot run on this machine (a kernel that fails to build, compile or launch) is recorded
here with its reason, said once (a ``RuntimeWarning`` naming the reason and where the calls go now,
except where the next stage is as fast), and skipped by every later call.  The backends ask
:func:`failed` before trying a stage and call :func:`give_up` when it fails; nothing else keeps state.
"""
from __future__ import annotations

import warnings
from typing import Optional

__all__ = ["CHAIN", "failed", "reason", "give_up", "forget"]

CHAIN = ("triton", "native", "inductor", "reference")  # a Triton stage is named per op: "triton:<op>"
_REASONS: dict[str, str] = {}  # stage -> why it failed here


def failed(stage: str) -> bool:
    """Whether ``stage`` has failed on this machine (then it is not tried again)."""
    return stage in _REASONS


def reason(stage: str) -> Optional[str]:
    """Why ``stage`` failed (its first line), or None."""
    return _REASONS.get(stage)


def give_up(stage: str, err: Exception, message: Optional[str], stacklevel: int = 3) -> str:
    """Record that ``stage`` failed with ``err``; warn ``message`` (formatted with ``{reason}``) the first time.

    ``message`` None records silently (the next stage is as fast).  Returns the reason.
    """
    if stage not in _REASONS:
        _REASONS[stage] = f"{type(err).__name__}: {err}".splitlines()[0]
        if message is not None:
            warnings.warn(message.format(reason=_REASONS[stage]), RuntimeWarning, stacklevel=stacklevel + 1)
    return _REASONS[stage]


def forget(stage: Optional[str] = None) -> None:
    """Try ``stage`` (every stage if None) again from the next call: for tests, or after installing a compiler."""
    if stage is None:
        _REASONS.clear()
    else:
        _REASONS.pop(stage, None)

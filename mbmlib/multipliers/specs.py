"""Multiplier specs: names such as "exact", "mitchell", "mbm", "mbm-t16" and the constants of SPEC section 1.

A multiplier is named by a string or given as a :class:`Multiplier`; every
layer, kernel and config takes either (``MultiplierLike``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Union

__all__ = [
    "Multiplier",
    "MultiplierLike",
    "as_multiplier",
    "MULTIPLIER_KINDS",
    "MAX_TRUNCATION",
    "MANT_BITS",
    "MANT_MASK",
    "ONE",
    "MBM_CORRECTION",
]

MULTIPLIER_KINDS = ("exact", "mitchell", "mbm")
MAX_TRUNCATION = 22
MANT_BITS = 23
MANT_MASK = (1 << MANT_BITS) - 1
ONE = 1 << MANT_BITS  # 1.0 in 23-bit fixed point
MBM_CORRECTION = 0xA0000  # 2**-4 + 2**-6 = 0.078125 in 23-bit fixed point
_EXACT_TAKES_NO_T = "the 'exact' multiplier takes no truncation; valid names are 'exact', 'mbm[-t<N>]', 'mitchell[-t<N>]'"
_NAME_RE = re.compile(r"^(exact|mitchell|mbm)(?:-t(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Multiplier:
    """An approximate float32 multiplier: ``kind`` and mantissa truncation ``t``.

    ``kind`` is one of "exact", "mitchell", "mbm"; ``t`` (0..22) keeps the top
    ``23 - t`` mantissa bits (t = 0 is the full design).
    """

    kind: str = "mbm"
    t: int = 0

    def __post_init__(self):
        if self.kind not in MULTIPLIER_KINDS:
            raise ValueError(
                f"unknown multiplier kind {self.kind!r}; valid kinds are "
                f"{', '.join(MULTIPLIER_KINDS)} (optionally with '-t<N>', 0 <= N <= {MAX_TRUNCATION})"
            )
        if not isinstance(self.t, int) or not 0 <= self.t <= MAX_TRUNCATION:
            raise ValueError(f"valid truncations are integers t = 0..{MAX_TRUNCATION}, got {self.t!r}")
        if self.kind == "exact" and self.t != 0:
            raise ValueError(_EXACT_TAKES_NO_T)

    @property
    def name(self) -> str:
        """Canonical string name, e.g. ``"mbm-t16"``; parses back to the same spec."""
        return self.kind if self.t == 0 else f"{self.kind}-t{self.t}"

    @property
    def is_exact(self) -> bool:
        return self.kind == "exact"

    @property
    def corrections(self) -> tuple[int, int]:
        """MBM correction for (no carry, carry), masked below bit t; (0, 0) for Mitchell."""
        if self.kind != "mbm":
            return (0, 0)
        keep = -(1 << self.t) if self.t > 16 else -1  # -(2**t) == ~(2**t - 1)
        return (MBM_CORRECTION & keep, (MBM_CORRECTION >> 1) & keep)

    def __str__(self) -> str:
        return self.name


MultiplierLike = Union[str, Multiplier]


def as_multiplier(spec: MultiplierLike) -> Multiplier:
    """Parse a multiplier name ("mbm", "mitchell-t8", "exact") or pass a Multiplier through."""
    if isinstance(spec, Multiplier):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"multiplier must be a str or mbmlib.Multiplier, got {type(spec).__name__}")
    match = _NAME_RE.match(spec.strip().lower())
    if match is None:
        raise ValueError(
            f"unknown multiplier {spec!r}; valid names are 'exact', 'mitchell', 'mbm', "
            f"or 'mitchell-t<N>' / 'mbm-t<N>' with 0 <= N <= {MAX_TRUNCATION}"
        )
    kind, t = match.group(1), int(match.group(2) or 0)
    if kind == "exact" and match.group(2) is not None:
        raise ValueError(_EXACT_TAKES_NO_T)
    return Multiplier(kind, t)

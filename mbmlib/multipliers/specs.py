"""Multiplier specs: names such as "exact", "mbm", "mbm-t16", "mbm-int8", "table:<file.csv>" and SPEC constants.

A multiplier is named by a string or given as a :class:`Multiplier`; every
layer, kernel and config takes either (``MultiplierLike``).  Float multipliers
(SPEC section 1) have ``bits=None``; integer ones (section 4) multiply n-bit
magnitudes, either by formula ("mbm-int8", "mitchell-int12") or by a lookup
table (kind "table", see :mod:`.table`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

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
    "INT_BITS_RANGE",
    "TABLE_PREFIX",
]

MULTIPLIER_KINDS = ("exact", "mitchell", "mbm")
MAX_TRUNCATION = 22
MANT_BITS = 23
MANT_MASK = (1 << MANT_BITS) - 1
ONE = 1 << MANT_BITS  # 1.0 in 23-bit fixed point
MBM_CORRECTION = 0xA0000  # 2**-4 + 2**-6 = 0.078125 in 23-bit fixed point
INT_BITS_RANGE = (2, 16)  # widths of the integer multipliers: n-bit magnitudes, products below 2**(2n)
TABLE_PREFIX = "table:"  # "table:<path to CSV>" names a table multiplier; "table:sha256=<hex>" one built in memory
_VALID_NAMES = ("valid names are 'exact', 'mbm[-t<N>]', 'mitchell[-t<N>]' (0 <= N <= 22), 'mbm-int<n>', "
                "'mitchell-int<n>' (2 <= n <= 16) and 'table:<path to CSV>'")
_EXACT_TAKES_NO_T = "the 'exact' multiplier takes no truncation nor width; " + _VALID_NAMES
_NAME_RE = re.compile(r"^(exact|mitchell|mbm)(?:-t(\d+)|-int(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Multiplier:
    """An approximate multiplier: ``kind``, mantissa truncation ``t`` (floats) or width ``bits`` (integers).

    Float multipliers (``bits=None``): ``kind`` "exact", "mitchell" or "mbm";
    ``t`` (0..22) keeps the top ``23 - t`` mantissa bits (t = 0 is the full design).
    Integer multipliers (``bits`` = n in 2..16, e.g. ``Multiplier("mbm", bits=8)``)
    multiply n-bit magnitudes (SPEC section 4).  Kind "table" is a lookup table
    built by :meth:`from_table` / :meth:`from_csv`: equal and hashed by its
    content ``digest``; ``source`` (the CSV path, if any) only names it.
    """

    kind: str = "mbm"
    t: int = 0
    bits: Optional[int] = None
    digest: Optional[str] = None
    source: Optional[str] = dataclasses.field(default=None, compare=False)
    table: Any = dataclasses.field(default=None, compare=False, repr=False)  # (2**bits, 2**bits) int64 tensor

    def __post_init__(self):
        if self.kind == "table":
            if self.table is None or self.digest is None or self.bits is None:
                raise ValueError("build table multipliers with Multiplier.from_table(table) or "
                                 "Multiplier.from_csv(path)")
            return
        if self.kind not in MULTIPLIER_KINDS:
            raise ValueError(f"unknown multiplier kind {self.kind!r}; valid kinds are {', '.join(MULTIPLIER_KINDS)} "
                             f"(optionally with '-t<N>', 0 <= N <= {MAX_TRUNCATION}, or '-int<n>'), or 'table'")
        if not isinstance(self.t, int) or not 0 <= self.t <= MAX_TRUNCATION:
            raise ValueError(f"valid truncations are integers t = 0..{MAX_TRUNCATION}, got {self.t!r}")
        if self.kind == "exact" and (self.t != 0 or self.bits is not None):
            raise ValueError(_EXACT_TAKES_NO_T)
        if self.bits is not None:
            lo, hi = INT_BITS_RANGE
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not lo <= self.bits <= hi:
                raise ValueError(f"integer multipliers are {lo} to {hi} bits wide, got bits={self.bits!r}")
            if self.t != 0:
                raise ValueError(f"integer multipliers take no truncation: use '{self.kind}-int{self.bits}', "
                                 f"not t={self.t}")

    @classmethod
    def from_table(cls, table, source: Optional[str] = None) -> "Multiplier":
        """A table multiplier ``P(A, B) = table[A, B]`` from a (2**n, 2**n) tensor/array of non-negative integers."""
        from .table import table_multiplier
        return table_multiplier(table, source)

    @classmethod
    def from_csv(cls, path) -> "Multiplier":
        """A table multiplier from a CSV with columns A, B and the product (e.g. ``A,B,MBM``), one row a pair."""
        from .table import read_csv
        return read_csv(path)

    @property
    def name(self) -> str:
        """Canonical string name, e.g. ``"mbm-t16"``, ``"mbm-int8"``, ``"table:file.csv"``; parses back to it."""
        if self.kind == "table":
            return TABLE_PREFIX + (self.source if self.source is not None else f"sha256={self.digest}")
        if self.bits is not None:
            return f"{self.kind}-int{self.bits}"
        return self.kind if self.t == 0 else f"{self.kind}-t{self.t}"

    @property
    def is_exact(self) -> bool:
        return self.kind == "exact"

    @property
    def is_integer(self) -> bool:
        """True for integer and table multipliers (they multiply quantised magnitudes, not floats)."""
        return self.bits is not None

    @property
    def max_magnitude(self) -> Optional[int]:
        """Largest magnitude an integer multiplier takes, ``2**bits - 1``; None for float multipliers."""
        return None if self.bits is None else (1 << self.bits) - 1

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
    """Parse a multiplier name ("mbm", "mitchell-t8", "mbm-int8", "table:file.csv", "exact") or pass one through."""
    if isinstance(spec, Multiplier):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"multiplier must be a str or mbmlib.Multiplier, got {type(spec).__name__}")
    if spec.strip().lower().startswith(TABLE_PREFIX):
        from .table import named_table
        return named_table(spec.strip()[len(TABLE_PREFIX):])
    match = _NAME_RE.match(spec.strip().lower())
    if match is None:
        raise ValueError(f"unknown multiplier {spec!r}; " + _VALID_NAMES)
    kind, t, bits = match.group(1), match.group(2), match.group(3)
    if kind == "exact" and (t is not None or bits is not None):
        raise ValueError(_EXACT_TAKES_NO_T)
    return Multiplier(kind, int(t or 0), None if bits is None else int(bits))

"""Multipliers: a registered design with its parameters, named "exact", "mbm", "mbm-t16", "mbm-int8", "table:<file.csv>".

A multiplier is named by a string or given as a :class:`Multiplier`; every
layer, kernel and config takes either (``MultiplierLike``).  Names are parsed
from the design registry (:mod:`.designs`): float designs (SPEC section 1) have
``bits=None`` and a truncation ``t``; integer designs (section 4) multiply n-bit
magnitudes ("mbm-int8", "mitchell-int12"); a lookup table (kind "table", see
:mod:`.table`) multiplies n-bit magnitudes by its entries.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Optional, Union

from .designs import INT_BITS_RANGE, MAX_TRUNCATION, Design, find_design, mbm_corrections, on_registry_change, valid_names
from .evoapprox import EVOAPPROX_ENV, load_circuit
from .table import checked_table, read_table_csv, table_digest

__all__ = [
    "Multiplier",
    "MultiplierLike",
    "as_multiplier",
    "MAX_TRUNCATION",
    "INT_BITS_RANGE",
    "TABLE_PREFIX",
    "EVOAPPROX_PREFIX",
]

TABLE_PREFIX = "table:"  # "table:<path to CSV>" names a table multiplier; "table:sha256=<hex>" one built in memory
EVOAPPROX_PREFIX = "evoapprox:"  # "evoapprox:<circuit>" (in $MBMLIB_EVOAPPROX) or "evoapprox:<path to .c>"
_EXACT_TAKES_NO_T = "the 'exact' multiplier takes no truncation nor width"
_NAME_RE = re.compile(r"^([a-z][a-z0-9_]*)(?:-t(\d+)|-int(\d+)|-m(\d+))?$")
_NUMBERED = re.compile(r"^([a-z][a-z0-9_]*?[a-z_])(\d+)$")  # "drum4": a design's name and its number k


@dataclasses.dataclass(frozen=True)
class Multiplier:
    """An approximate multiplier: a registered design ``kind`` with truncation ``t`` (floats) or width ``bits`` (ints).

    Float multipliers (``bits=None``): ``kind`` "exact" or a float design ("mbm", "mitchell",
    or one added with :func:`mbmlib.register_design`); ``t`` (0..22) keeps the top ``23 - t``
    mantissa bits (t = 0 is the full design).  Integer multipliers (``bits`` = n in 2..16,
    e.g. ``Multiplier("mbm", bits=8)``) multiply n-bit magnitudes (SPEC section 4).  Kind
    "table" is a lookup table built by :meth:`from_table` / :meth:`from_csv`: equal and
    hashed by its content ``digest``; ``source`` (the CSV path, if any) only names it.
    """

    kind: str = "mbm"
    t: int = 0
    bits: Optional[int] = None
    digest: Optional[str] = None
    source: Optional[str] = dataclasses.field(default=None, compare=False)
    table: Any = dataclasses.field(default=None, compare=False, repr=False)  # (2**bits, 2**bits) int64 tensor
    param: Optional[int] = None  # a design's own parameter: L-Mul's mantissa width n, DRUM's k
    signed: bool = False  # a signed table: two's-complement operands, P(a, b) = table[a mod 2**n, b mod 2**n]

    def __post_init__(self):
        if self.kind == "table":
            if self.table is None or self.digest is None or self.bits is None:
                raise ValueError("build table multipliers with Multiplier.from_table(table) or "
                                 "Multiplier.from_csv(path)")
            return
        if self.signed:
            raise ValueError("only tables are signed (Multiplier.from_table(t, signed=True)); the formula designs "
                             "multiply sign-magnitude operands")
        if not isinstance(self.t, int) or isinstance(self.t, bool) or not 0 <= self.t <= MAX_TRUNCATION:
            raise ValueError(f"valid truncations are integers t = 0..{MAX_TRUNCATION}, got {self.t!r}")
        if self.kind == "exact":
            if self.t != 0 or self.bits is not None:
                raise ValueError(_EXACT_TAKES_NO_T + "; " + valid_names())
            return
        if self.bits is not None:
            lo, hi = INT_BITS_RANGE
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not lo <= self.bits <= hi:
                raise ValueError(f"integer multipliers are {lo} to {hi} bits wide, got bits={self.bits!r}")
            if self.t != 0:
                raise ValueError(f"integer multipliers take no truncation: use '{self.kind}-int{self.bits}', "
                                 f"not t={self.t}")
        _check_param(self, find_design(self.kind, "int" if self.bits is not None else "float"))

    @classmethod
    def from_table(cls, table, source: Optional[str] = None, signed: bool = False) -> "Multiplier":
        """A table multiplier from a (2**n, 2**n) tensor/array of integers (any integer dtype).

        Unsigned (default): ``P(A, B) = table[A, B]`` on n-bit magnitudes, the sign apart
        (sign-magnitude; the operand 0 is positive).  ``signed=True``: operands are two's
        complement in [-2**(n-1), 2**(n-1)) and ``P(a, b) = table[a mod 2**n, b mod 2**n]``
        (entries may be negative).  Every entry counts, row and column 0 included.
        """
        t, bits = checked_table(table, source or "table", signed)
        digest = table_digest(t, signed)
        mult = cls("table", bits=bits, digest=digest, source=source, table=t, signed=signed)
        _BY_DIGEST.setdefault(digest, cls("table", bits=bits, digest=digest, table=t, signed=signed))
        return mult

    @classmethod
    def from_csv(cls, path) -> "Multiplier":
        """A table multiplier from a CSV with columns A, B and the product (e.g. ``A,B,MBM``), one row a pair;
        negative operands make it a signed table."""
        table, signed = read_table_csv(path)
        return cls.from_table(table, source=os.fspath(path), signed=signed)

    @classmethod
    def from_evoapprox(cls, spec: str, directory: Optional[str] = None) -> "Multiplier":
        """An EvoApproxLib circuit as a table multiplier: ``spec`` is ``[evoapprox:]<circuit>`` (looked up in the
        checkout ``directory``, else ``$MBMLIB_EVOAPPROX``) or ``[evoapprox:]<path to .c>``.  Unsigned circuits
        are sign-magnitude tables, signed ones signed tables (:mod:`.evoapprox`)."""
        spec = spec[len(EVOAPPROX_PREFIX):] if spec.lower().startswith(EVOAPPROX_PREFIX) else spec
        key = (spec, directory or os.environ.get(EVOAPPROX_ENV))
        if key not in _EVOAPPROX:
            circuit = load_circuit(spec, directory)
            _EVOAPPROX[key] = cls.from_table(circuit.table, source=EVOAPPROX_PREFIX + spec, signed=circuit.signed)
        return _EVOAPPROX[key]

    @property
    def name(self) -> str:
        """Canonical string name, e.g. ``"mbm-t16"``, ``"mbm-int8"``, ``"table:file.csv"``,
        ``"evoapprox:mul8s_1L2J"``; parses back to it."""
        if self.kind == "table" and self.source is not None and self.source.startswith(EVOAPPROX_PREFIX):
            return self.source
        if self.kind == "table":
            return TABLE_PREFIX + (self.source if self.source is not None else f"sha256={self.digest}")
        if self.bits is not None:
            return f"{self.kind}{'' if self.param is None else self.param}-int{self.bits}"
        if self.param is not None:
            return f"{self.kind}-m{self.param}"
        return self.kind if self.t == 0 else f"{self.kind}-t{self.t}"

    @property
    def key(self) -> str:
        """A name that parses back without touching files: a table's is its digest (``"table:sha256=..."``)."""
        return f"{TABLE_PREFIX}sha256={self.digest}" if self.kind == "table" else self.name

    @property
    def is_exact(self) -> bool:
        return self.kind == "exact"

    @property
    def is_integer(self) -> bool:
        """True for integer and table multipliers (they multiply quantised magnitudes, not floats)."""
        return self.bits is not None

    @property
    def design(self) -> Optional[Design]:
        """The registered design (None for "exact" and tables)."""
        if self.kind in ("exact", "table"):
            return None
        return find_design(self.kind, "int" if self.bits is not None else "float")

    @property
    def mac(self) -> Optional[str]:
        """The id of the kernels' specialised multiply-accumulate: a design's ``mac``, "table", or None (generic)."""
        return "table" if self.kind == "table" else getattr(self.design, "mac", None)

    @property
    def q_range(self) -> Optional[tuple[int, int]]:
        """The integers an integer multiplier takes: ``(-(2**n - 1), 2**n - 1)`` (sign-magnitude), or
        ``(-2**(n-1), 2**(n-1) - 1)`` for a signed table; None for float multipliers."""
        if self.bits is None:
            return None
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return -((1 << self.bits) - 1), (1 << self.bits) - 1

    @property
    def max_magnitude(self) -> Optional[int]:
        """Largest |q| an integer multiplier takes (``2**n - 1``, a signed table's ``2**(n-1)``); None for floats."""
        return None if self.bits is None else max(-self.q_range[0], self.q_range[1])

    @functools.cached_property
    def zero_annihilates(self) -> bool:
        """Whether a zero operand always gives the product 0: true of every design, and of a table whose row and
        column of the operand 0 are zero.  Where false, convolution padding is a real operand (hardware)."""
        return self.kind != "table" or not (bool(self.table[0].any()) or bool(self.table[:, 0].any()))

    @functools.cached_property
    def max_product(self) -> Optional[int]:
        """An upper bound of |P| (a table's largest |entry|, else 2**(2n)): how many products a sum may take."""
        if self.bits is None:
            return None
        return max(1, int(self.table.abs().max())) if self.kind == "table" else 1 << (2 * self.bits)

    @property
    def corrections(self) -> tuple[int, int]:
        """MBM correction for (no carry, carry), masked below bit t; (0, 0) for any other design."""
        return mbm_corrections(self.t) if self.mac == "mbm" else (0, 0)

    def __str__(self) -> str:
        return self.name


MultiplierLike = Union[str, Multiplier]
_BY_DIGEST: dict[str, Multiplier] = {}  # every table built in this process, for "table:sha256=..." names
_BY_FILE: dict[str, tuple[tuple[int, int], Multiplier]] = {}  # path -> ((mtime_ns, size), table)
_EVOAPPROX: dict[tuple, Multiplier] = {}  # (circuit spec, checkout) -> its table multiplier


def as_multiplier(spec: MultiplierLike) -> Multiplier:
    """Parse a multiplier name ("mbm", "mitchell-t8", "mbm-int8", "table:file.csv", "evoapprox:mul8s_1L2J",
    "exact") or pass one through."""
    if isinstance(spec, Multiplier):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"multiplier must be a str or mbmlib.Multiplier, got {type(spec).__name__}")
    if spec.strip().lower().startswith(TABLE_PREFIX):
        return _named_table(spec.strip()[len(TABLE_PREFIX):])
    if spec.strip().lower().startswith(EVOAPPROX_PREFIX):
        return Multiplier.from_evoapprox(spec.strip())
    mult = _PARSED.get(spec)
    if mult is None:
        mult = _PARSED[spec] = _parsed(spec)
    return mult


_PARSED: dict[str, Multiplier] = {}  # names parsed once; cleared when the registry changes (a dict, not lru_cache:
on_registry_change(_PARSED.clear)  # torch.compile traces a dict lookup plainly)


def _parsed(spec: str) -> Multiplier:
    """A design's multiplier from its name."""
    match = _NAME_RE.match(spec.strip().lower())
    if match is None:
        raise ValueError(f"unknown multiplier {spec!r}; " + valid_names())
    kind, t, bits, m = (match.group(i) for i in range(1, 5))
    if kind == "exact" and (t is not None or bits is not None or m is not None):
        raise ValueError(_EXACT_TAKES_NO_T + "; " + valid_names())
    if kind == "exact":
        return Multiplier("exact")
    param = None if m is None else int(m)
    numbered = _NUMBERED.match(kind)
    if bits is not None and numbered and not _registered(kind, "int") and _registered(numbered.group(1), "int"):
        kind, param = numbered.group(1), int(numbered.group(2))  # "drum4-int8": design drum, k = 4
    try:
        find_design(kind, "float" if bits is None else "int")
        return Multiplier(kind, int(t or 0), None if bits is None else int(bits), param=param)
    except ValueError as err:
        raise ValueError(f"unknown multiplier {spec!r}: {err}") from None


def _registered(name: str, kind: str) -> bool:
    try:
        find_design(name, kind)
        return True
    except ValueError:
        return False


def _check_param(mult: Multiplier, design: Design) -> None:
    """The design's own parameter: present and in range where it has one (``lmul-m<n>``, ``drum<k>-int<n>``),
    absent elsewhere; L-Mul takes no frame truncation (its own clears bits without forcing one)."""
    if design.param is None:
        if mult.param is not None:
            raise ValueError(f"design {design.name!r} takes no parameter (got {mult.param}); its names are "
                             f"{design.pattern!r}")
        return
    if design.param == "m" and mult.t:
        raise ValueError(f"{design.name!r} takes -m<n>, not -t<N>: it truncates its mantissas itself (low bits "
                         "cleared, none forced to 1)")
    lo, hi = design.param_range[0], (mult.bits if design.param == "k" else design.param_range[1])
    if mult.param is None or isinstance(mult.param, bool) or not lo <= mult.param <= hi:
        example = f"{design.name}-m3" if design.param == "m" else f"{design.name}4-int8"
        raise ValueError(f"{design.pattern!r} needs {'n' if design.param == 'm' else 'k'} from {lo} to {hi}, got "
                         f"{mult.param!r}: e.g. {example!r}")


def _named_table(rest: str) -> Multiplier:
    """The table a name ``"table:<rest>"`` means: ``sha256=<digest>`` built here, else a CSV path (cached)."""
    if rest.startswith("sha256="):
        try:
            return _BY_DIGEST[rest[len("sha256="):]]
        except KeyError:
            raise ValueError(f"no table with digest {rest!r} was built in this process; name a CSV file "
                             "('table:<path>') or pass the Multiplier itself") from None
    try:
        st = os.stat(rest)
    except OSError as err:
        raise ValueError(f"table multiplier file {rest!r} cannot be read ({err.strerror}); name a CSV with "
                         "columns A,B,<product>, e.g. 'table:tables/reference_mbm.csv'") from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _BY_FILE.get(rest)
    if cached is None or cached[0] != stamp:
        cached = _BY_FILE[rest] = (stamp, Multiplier.from_csv(rest))
    return cached[1]

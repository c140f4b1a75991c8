"""The design registry: every approximate multiplier design is one entry here, and names are parsed from it.

A design supplies only its core; the frame of its operand kind does the rest:

* ``"float"`` designs give the significand ``G`` of a product from the two 23-bit
  mantissa fields (after truncation): ``product = sign * 2**(eA+eB-254) * G * 2**-23``
  with ``2**23 <= G < 2**25`` (up to ``2**26`` is accepted and normalised).  Splitting, truncation (``-t<N>``), special cases,
  normalisation (truncating), overflow and underflow are the float frame's
  (SPEC section 1 rules 1-3 and 6, :mod:`.floating`).  Names ``<design>[-t<N>]``.
* ``"int"`` designs give the product ``P(A, B)`` of two n-bit magnitudes,
  ``0 <= P < 2**(2n)``; signs are the sign-magnitude frame's (SPEC section 4,
  :mod:`.integer`).  Names ``<design>-int<n>``.

``mac`` names the design's specialised multiply-accumulate in the C++ and Triton
kernels (``"mbm"``, ``"mitchell"``, ``"lmul"``, ``"drum"``; :data:`MAC_IDS` holds the log-domain ones,
whose integer designs split operands into exponent and mantissa); a design without
one runs on each backend's generic path (:func:`mbmlib.kernels.route`).  Users add designs with :func:`register_design`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch

__all__ = ["Design", "DESIGN_KINDS", "MAC_IDS", "register_design", "unregister_design", "registered_designs",
           "find_design", "valid_names", "mbm_corrections", "normalise_significand"]

MANT_BITS = 23
MANT_MASK = (1 << MANT_BITS) - 1
ONE = 1 << MANT_BITS  # 1.0 in 23-bit fixed point
MBM_CORRECTION = 0xA0000  # 2**-4 + 2**-6 = 0.078125 in 23-bit fixed point
MAX_TRUNCATION = 22
INT_BITS_RANGE = (2, 16)  # widths of the integer designs: n-bit magnitudes, products below 2**(2n)
DESIGN_KINDS = ("float", "int")
MAC_IDS = {"mitchell": 0, "mbm": 1}  # the log-domain MACs (the integer designs split into exponent and mantissa)
RESERVED_NAMES = ("exact", "table")  # spelled out by the multiplier names themselves, never registered
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Design:
    """One registered design: ``name``, operand ``kind``, its ``reference`` and the id of its specialised ``mac``.

    ``reference(ma, mb, mult)`` (float: the significand, before normalisation) or
    ``reference(a, b, mult)`` (int: the product of magnitudes) is the definition every backend is held to;
    ``mult`` is the :class:`~mbmlib.Multiplier` (its truncation ``t``, width ``bits``, design ``param``), or
    None when a user's function is probed.  ``param`` names the design's own parameter, if it has one:
    ``"m"`` (a float design's mantissa width, ``lmul-m<n>``, instead of the frame's ``-t``) or ``"k"`` (an
    integer design's number after its name, ``drum<k>-int<n>``); ``param_range`` bounds it.
    """

    name: str
    kind: str
    reference: Callable
    mac: Optional[str] = None
    builtin: bool = False
    summary: str = ""
    param: Optional[str] = None
    param_range: tuple[int, int] = (0, 0)

    @property
    def pattern(self) -> str:
        """How names of this design are spelled, e.g. ``"mbm[-t<N>]"``, ``"lmul-m<n>"``, ``"drum<k>-int<n>"``."""
        if self.kind == "float":
            return f"{self.name}-m<n>" if self.param == "m" else f"{self.name}[-t<N>]"
        return f"{self.name}{'<k>' if self.param == 'k' else ''}-int<n>"


# ----------------------------------------------------------------------------- the built-in designs' cores


def mbm_corrections(t: int) -> tuple[int, int]:
    """MBM's correction for (no carry, carry) at truncation ``t``: bits below t dropped when t > 16."""
    keep = -(1 << t) if t > 16 else -1  # -(2**t) == ~(2**t - 1)
    return MBM_CORRECTION & keep, (MBM_CORRECTION >> 1) & keep


def mitchell_significand(ma: torch.Tensor, mb: torch.Tensor, mult=None) -> torch.Tensor:
    """Mitchell: ``1 + x1 + x2``, or ``2 * (x1 + x2)`` after a carry (SPEC section 1, rules 4-6)."""
    s = ma + mb
    return torch.where(s >= ONE, s << 1, s + ONE)


def mbm_significand(ma: torch.Tensor, mb: torch.Tensor, mult=None) -> torch.Tensor:
    """MBM: Mitchell plus the correction (halved after a carry), skipped in the carry/overflow corner case."""
    s = ma + mb
    c0, c1 = mbm_corrections(getattr(mult, "t", 0))
    t1 = s + c1  # carry: 2 * (x1 + x2 + c/2)
    return torch.where(s >= ONE, torch.where(t1 < 2 * ONE, t1, s) << 1, s + (ONE + c0))


def normalise_significand(g: torch.Tensor) -> torch.Tensor:
    """The frame's truncating normalisation of ``G`` in [2**23, 2**26) to 24 significant bits (SPEC rule 6).

    A ``G >= 2**24`` loses its lowest bit, a ``G >= 2**25`` (a design adding a constant may reach it) its two.
    """
    return g & ~((g >> 24) | (g >> 25))


def log_product(significand: Callable) -> Callable:
    """The integer design of a float significand (SPEC section 4): ``P = floor(2**(k1 + k2) * G * 2**-23)``."""

    def product(a: torch.Tensor, b: torch.Tensor, mult=None) -> torch.Tensor:
        ka = torch.frexp(a.to(torch.float64)).exponent.to(torch.int64) - 1  # floor(log2 A); -1 for A = 0
        kb = torch.frexp(b.to(torch.float64)).exponent.to(torch.int64) - 1
        ma = (a << (MANT_BITS - ka.clamp(min=0))) & MANT_MASK  # x1 in 23-bit fixed point, exact (k <= 15)
        mb = (b << (MANT_BITS - kb.clamp(min=0))) & MANT_MASK
        g = normalise_significand(significand(ma, mb).to(torch.int64))
        p = (g << (ka + kb).clamp(min=0)) >> MANT_BITS
        return torch.where((a == 0) | (b == 0), 0, p)

    return product


def lmul_constants(n: int) -> tuple[int, int]:
    """(mask keeping a mantissa's top n bits, 1 + 2**-l in 23-bit fixed point) of L-Mul on n bits."""
    return -(1 << (MANT_BITS - n)), ONE + (ONE >> (n if n <= 3 else 3 if n == 4 else 4))


def lmul_significand(ma: torch.Tensor, mb: torch.Tensor, mult=None) -> torch.Tensor:
    """L-Mul (Luo and Sun 2024; SPEC section 6): ``1 + xA + xB + 2**-l`` of the top n mantissa bits (no bit
    forced), l = n for n <= 3, 3 for n = 4, 4 above; the frame halves it (truncating) when it reaches 2."""
    keep, base = lmul_constants(mult.param)
    return (ma & keep) + (mb & keep) + base


def drum_reduced(q: torch.Tensor, k: int) -> torch.Tensor:
    """DRUM-k's reduced operand of sign-magnitude integers ``q``, int64 with the sign kept: a magnitude below 2**k
    as it is, else its k bits from the leading one down with the lowest forced to 1 (reducing twice changes
    nothing).  The kernels prepare their operands with it once, so a DRUM product is one exact multiply."""
    q = q.to(torch.int32)  # magnitudes below 2**16; an int8 -128 has no int8 magnitude
    m = q.abs()
    s = (torch.frexp(m.to(torch.float32)).exponent - k).clamp(min=0)  # floor(log2 m) + 1 - k, from an exact float
    return torch.where(m < (1 << k), q, torch.sign(q) * (((m >> s) | 1) << s)).to(torch.int64)


def drum_product(a: torch.Tensor, b: torch.Tensor, mult=None) -> torch.Tensor:
    """DRUM-k (Hashemi, Bahar and Reda 2015; SPEC section 6): each magnitude of 2**k or more keeps its k bits
    from the leading one down with the lowest forced to 1; the product of the reduced operands is exact."""
    return drum_reduced(a, mult.param) * drum_reduced(b, mult.param)


_REGISTRY: dict[tuple[str, str], Design] = {}
_listeners: list[Callable[[], None]] = []  # caches keyed by names, cleared when the registry changes


def _add(design: Design) -> None:
    _REGISTRY[design.name, design.kind] = design
    for clear in _listeners:
        clear()


for _name, _significand in (("mitchell", mitchell_significand), ("mbm", mbm_significand)):
    _add(Design(_name, "float", _significand, mac=_name, builtin=True, summary=f"{_name} on float32 mantissas"))
    _add(Design(_name, "int", log_product(_significand), mac=_name, builtin=True,
                summary=f"{_name} on n-bit magnitudes"))
_add(Design("lmul", "float", lmul_significand, mac="lmul", builtin=True, summary="L-Mul on n mantissa bits",
            param="m", param_range=(1, MANT_BITS)))
_add(Design("drum", "int", drum_product, mac="drum", builtin=True, summary="DRUM-k on n-bit magnitudes", param="k",
            param_range=(2, INT_BITS_RANGE[1])))


# ----------------------------------------------------------------------------- lookup


def registered_designs() -> list[Design]:
    """Every registered design, built-in ones first."""
    return sorted(_REGISTRY.values(), key=lambda d: (not d.builtin, d.name, d.kind))


def valid_names() -> str:
    """The one-line list of what a multiplier may be named, for error messages."""
    def listed(designs, bounds: str, own: dict) -> str:
        plain = [repr(d.pattern) for d in designs if not d.param]
        text = ", ".join(plain) + f" ({bounds})" if plain else ""
        return ", ".join([text] * bool(text) + [f"{d.pattern!r} ({own[d.param].format(*d.param_range)})"
                                                for d in designs if d.param])

    designs = registered_designs()
    floats = listed([d for d in designs if d.kind == "float"], f"0 <= N <= {MAX_TRUNCATION}",
                    {"m": "{} <= n <= {}"})
    ints = listed([d for d in designs if d.kind == "int"], f"{INT_BITS_RANGE[0]} <= n <= {INT_BITS_RANGE[1]}",
                  {"k": "{} <= k <= n"})
    return (f"valid names are 'exact', {floats}, {ints}, 'table:<path to CSV>' and 'evoapprox:<circuit>' "
            "(add your own with mbmlib.register_design)")


def find_design(name: str, kind: str) -> Design:
    """The registered design ``name`` of operand ``kind``; ValueError listing the registered designs."""
    try:
        return _REGISTRY[name, kind]
    except KeyError:
        other = [d.pattern for d in registered_designs() if d.name == name]
        hint = f" ({name!r} is registered as {', '.join(map(repr, other))})" if other else ""
        raise ValueError(f"unknown {kind} design {name!r}{hint}; " + valid_names()) from None


def on_registry_change(clear: Callable[[], None]) -> None:
    """Call ``clear`` whenever a design is registered or removed (for caches keyed by multiplier names)."""
    _listeners.append(clear)


# ----------------------------------------------------------------------------- user designs


def _probe_operands(kind: str) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Sample operand pairs a design is probed on: edges and random values, per width (int) or truncation (float)."""
    gen = torch.Generator().manual_seed(0)
    if kind == "float":
        edges = torch.tensor([0, 1, ONE // 2, ONE - 1], dtype=torch.int64)
        rand = torch.randint(0, ONE, (4096,), generator=gen, dtype=torch.int64)
        a = torch.cat([edges.repeat_interleave(len(edges)), rand])
        b = torch.cat([edges.repeat(len(edges)), rand.flip(0)])
        return [(a, b, 0)]
    probes = []
    for bits in (INT_BITS_RANGE[0], 8, 12, INT_BITS_RANGE[1]):
        top = (1 << bits) - 1
        edges = torch.tensor([0, 1, 2, top // 2, top], dtype=torch.int64)
        rand = torch.randint(0, top + 1, (1024,), generator=gen, dtype=torch.int64)
        probes.append((torch.cat([edges.repeat_interleave(5), rand]), torch.cat([edges.repeat(5), rand.flip(0)]),
                       bits))
    return probes


def check_values(name: str, kind: str, out, a: torch.Tensor, bits: int) -> None:
    """ValueError/TypeError unless ``out`` is an int64 tensor of ``a``'s shape with values in the kind's range."""
    what = "significand" if kind == "float" else "product"
    if not isinstance(out, torch.Tensor) or out.dtype != torch.int64:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"design {name!r} must return an int64 tensor ({what}s), got {got}")
    if out.shape != a.shape:
        raise ValueError(f"design {name!r} must return one {what} per operand pair (shape {list(a.shape)}), "
                         f"got shape {list(out.shape)}")
    lo, hi = (ONE, 8 * ONE) if kind == "float" else (0, 1 << (2 * bits))
    bad = ((out < lo) | (out >= hi)).nonzero()
    if len(bad):
        i = bad[0, 0].item() if out.dim() else None
        at = "" if i is None else f" at operand pair index {i}"
        raise ValueError(f"design {name!r} returned {what} {out.reshape(-1)[i or 0].item()}{at}, outside "
                         f"[{lo}, {hi}): " + ("a float design's significand G satisfies 2**23 <= G < 2**26"
                                              if kind == "float" else f"{bits}-bit products lie in [0, 2**{2 * bits})"))


def _wrapped(fn: Callable, kind: str) -> Callable:
    """The user's two-argument function as a registry reference: int64 operands, broadcast, extra argument dropped."""

    def reference(a: torch.Tensor, b: torch.Tensor, _mult=None) -> torch.Tensor:
        a, b = torch.broadcast_tensors(a.to(torch.int64), b.to(torch.int64))
        return fn(a, b)

    reference.__doc__ = fn.__doc__
    reference.__wrapped__ = fn
    return reference


def register_design(name: str, fn: Callable, kind: str) -> Design:
    """Register a user design: afterwards ``"<name>-int<n>"`` (kind "int") or ``"<name>[-t<N>]"`` (kind "float")
    work everywhere a built-in multiplier does.

    ``kind="int"``: ``fn(a, b)`` maps int64 magnitudes in ``[0, 2**n)`` to int64 products in ``[0, 2**(2n))``.
    ``kind="float"``: ``fn(ma, mb)`` maps int64 23-bit mantissa fields to the int64 significand ``G``,
    ``2**23 <= G < 2**25`` (up to ``2**26`` is normalised; the frame truncates, normalises and handles
    special cases, overflow and underflow).  ``fn`` is
    probed on sample operands now: a wrong dtype, shape or range is an error here, not in a layer.
    """
    if kind not in DESIGN_KINDS:
        raise ValueError(f"design kind must be 'int' or 'float', got {kind!r}")
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in RESERVED_NAMES:
        raise ValueError(f"design names are lower-case letters, digits and '_', starting with a letter, and not "
                         f"{' or '.join(map(repr, RESERVED_NAMES))}; got {name!r}")
    if (name, kind) in _REGISTRY:
        raise ValueError(f"a {kind} design {name!r} is registered already; pick another name, or "
                         f"mbmlib.unregister_design({name!r}, {kind!r}) first")
    if not callable(fn):
        raise TypeError(f"register_design({name!r}, fn, ...): fn must be callable, got {type(fn).__name__}")
    reference = _wrapped(fn, kind)
    for a, b, param in _probe_operands(kind):
        check_values(name, kind, reference(a, b, param), a, param)
    design = Design(name, kind, reference, mac=None, builtin=False, summary=(fn.__doc__ or "").strip())
    _add(design)
    return design


def unregister_design(name: str, kind: str) -> None:
    """Remove a user design (built-in ones stay)."""
    design = find_design(name, kind)
    if design.builtin:
        raise ValueError(f"{design.pattern} is built in and cannot be removed")
    del _REGISTRY[name, kind]
    for clear in _listeners:
        clear()

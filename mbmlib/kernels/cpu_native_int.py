"""The integer and table MACs of the C++ kernel (SPEC sections 4 and 6): operand encodings and entry points.

An integer operand of up to 12 bits is exactly a float, so integer Mitchell runs as bit-domain words and
integer MBM on the float MACs' fields (A's scale folded into its word on AVX-512); tables are looked up in
registers where their entries fit 16 bits, else gathered; DRUM is one exact multiply of reduced operands.
:func:`quantised_operand` quantises float activations straight into A's fields (the quantised layers' fused
path, :func:`bmm_nt_quant`, :func:`conv2d_quant`); :func:`bmm_nt_int` / :func:`conv2d_int` take integers.
The loader, packing and the float MACs are in :mod:`.cpu_native`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..multipliers.designs import MAC_IDS, drum_reduced
from ..multipliers.floating import SIGN_EXP_MASK as SIGN_EXP
from ..multipliers.specs import Multiplier
from .cpu_native import (_ONE_BITS, MACS, MacConstants, OutLayout, PackedB, _implicit_patches, _nchw, _pack,
                         _prepared_b, _rows_of, _run, _b_rows, library, specialised_mac, split)
from .prepared import prepared

__all__ = ["supports_int", "drum_split", "int_block", "quantised_operand", "bmm_nt_int", "conv2d_int", "bmm_nt_quant",
           "conv2d_quant", "FORMULA_MAX_BITS", "TABLE_MAX_BITS"]

FORMULA_MAX_BITS = 12  # products < 2**24 and shifts that only go right: int32 lanes suffice
TABLE_MAX_BITS = 8  # a 256 x 256 int32 table (256 KB) stays in the cache
DRUM_SPLIT = 8  # DRUM over 12 bits: A = 2**8 * hi + lo, two int32 sums (the split DrumMac is built for)


def supports_int(multiplier: Multiplier) -> bool:
    """Whether the C++ integer GEMM computes ``multiplier`` (log designs <= 12 bits, int32 tables <= 8, DRUM)."""
    if multiplier.kind == "table":
        return multiplier.bits <= TABLE_MAX_BITS and multiplier.max_product < 2**31
    return multiplier.mac == "drum" or (multiplier.mac in MAC_IDS and multiplier.bits <= FORMULA_MAX_BITS)


def drum_split(multiplier: Multiplier) -> int:
    """How DRUM's kernel splits A (``DrumMac<SPLIT>``): not at all up to 12 bits (int32 products below 2**24),
    else ``A = 2**DRUM_SPLIT * hi + lo``, as 16-bit products reach 2**32."""
    return DRUM_SPLIT if multiplier.bits > FORMULA_MAX_BITS else 0


def int_block(multiplier: Multiplier) -> int:
    """Steps of k an integer MAC sums in int32 before its int64 output: no block sum of its terms can reach 2**31.

    A term is a product (below ``max_product``), or for a split DRUM ``hi * B`` (below ``2**(2n - split)``) and
    ``lo * B`` (below ``2**(n + split)``).
    """
    split = drum_split(multiplier) if multiplier.mac == "drum" else 0
    term = 1 << max(2 * multiplier.bits - split, multiplier.bits + split) if split else multiplier.max_product
    return (2**31 - 1) // term


@functools.lru_cache(maxsize=16)
def _kernel_table(multiplier: Multiplier) -> torch.Tensor:
    """A table multiplier's entries as int32 (every one: a table may give a non-zero product for the operand 0)."""
    return multiplier.table.to(torch.int32).reshape(-1).contiguous()


INT_ZERO_WORDS = {"a": -(40 << 23), "b": 80 << 23}  # IntWordsMac's words of a zero operand (approx_gemm.cpp)
_QUANT_FIELDS = {"mbm": 0, "mitchell": 1, "table": 2, "signed table": 3, "drum": 4, "mbm_fold": 5,
                 "mitchell b": 6}  # QuantFields (approx_gemm.cpp)
FOLDED_ZERO = 2.0**-100  # FoldMac's stand-in for the operand 0 (approx_gemm.cpp)


class _Table16(NamedTuple):
    """A table of up to 8 bits as the register-table MACs read it: ``rows`` (R, 256) int16 (zero columns
    appended), on the MAC ``mac``; ``c0``, Table16MaddMac's first negated row (0: a signed table has none)."""

    rows: torch.Tensor
    mac: str
    c0: int = 0


@functools.lru_cache(maxsize=16)
def _kernel_table16(multiplier: Multiplier) -> Optional[_Table16]:
    """The table for Table16MaddMac where its entries and their negations fit int16 (a sign-magnitude table's
    rows, then its negated rows, which a negative A reads; a signed table's own rows, entries -2**15..2**15-1),
    else for Table16Mac where a sign-magnitude table's entries fit 16 bits (up to 2**16-1, zero-extended); None
    where they do not."""
    t = multiplier.table.to(torch.int64)
    lo, hi = int(t.min()), int(t.max())
    rows = F.pad(t, (0, 256 - t.shape[1]))
    if multiplier.signed:
        fits = lo >= -(1 << 15) and hi < 1 << 15
        return _Table16(rows.to(torch.int16).contiguous(), "table16_madd") if fits else None
    if hi < 1 << 15:
        return _Table16(torch.cat([rows, -rows]).to(torch.int16).contiguous(), "table16_madd", t.shape[0])
    if hi < 1 << 16:
        rows = torch.where(rows >= 1 << 15, rows - (1 << 16), rows)  # the same 16 bits, stored as int16
        return _Table16(rows.to(torch.int16).contiguous(), "table16")
    return None


def _table16(multiplier: Multiplier, lib) -> Optional[_Table16]:
    """The register table of a table multiplier (:func:`_kernel_table16`) where this build has the register MACs."""
    return _kernel_table16(multiplier) if multiplier.kind == "table" and lib.mbm_has_table16() else None


def _int_mac(multiplier: Multiplier, lib) -> int:
    """The kernel's MAC of an integer multiplier: integer Mitchell runs in the bit domain (IntWordsMac), one-addend
    MBM with A's scale folded into its word where the build has it (FoldMac), tables in registers where their
    entries fit 16 bits (Table16MaddMac, Table16Mac)."""
    if multiplier.mac == "mitchell":
        return MACS["int", "words"]
    if multiplier.mac == "mbm" and lib.mbm_has_words() and 2 * multiplier.corrections[1] == multiplier.corrections[0]:
        return MACS["int", "mbm_fold"]
    table16 = _table16(multiplier, lib)
    if table16 is not None:
        return MACS["int", table16.mac]
    return MACS["int", specialised_mac(multiplier)]


def _int_operand(q: torch.Tensor, multiplier: Multiplier, side: str, mac: int) -> tuple[torch.Tensor, ...]:
    """The fields of sign-magnitude integers as the MAC ``mac`` reads them on ``side`` ("a" or "b") of the GEMM:
    MBM the float fields of float(q) (FoldMac's A: :func:`_folded`); Mitchell its words; tables (sign mask 0/-1,
    magnitude), a signed table (0, q mod 2**n); DRUM its signed reduced operand.  :func:`quantised_operand`
    writes the same for A."""
    if multiplier.mac == "drum":
        return (drum_reduced(q, multiplier.param).to(torch.int32),)
    q = q.to(torch.int32)
    if multiplier.kind == "table":
        if multiplier.signed:  # no sign apart: the two's-complement index
            return torch.zeros_like(q), q & ((1 << multiplier.bits) - 1)
        return -(q < 0).to(torch.int32), q.abs()
    qf = q.to(torch.float32)  # exact: |q| < 2**13
    if multiplier.mac == "mitchell":
        word = qf.view(torch.int32) - (_ONE_BITS if side == "a" else 0)
        return (torch.where(q == 0, INT_ZERO_WORDS[side], word),)
    if side == "a" and mac == MACS["int", "mbm_fold"]:
        return _folded(torch.where(q == 0, FOLDED_ZERO, qf), multiplier.corrections[0])
    return split(qf, multiplier)


def _folded(v: torch.Tensor, c0: int) -> tuple[torch.Tensor, ...]:
    """FoldMac's A fields of the floats ``v``: their bits, the corner test's bound ``sign_exp + 2**24 - c0 / 2``
    and the correction ``sign * 2**k * c0 / 2**23``."""
    bits = v.view(torch.int32)
    sign_exp = bits & SIGN_EXP
    return bits, sign_exp + (2 << 23) - c0 // 2, sign_exp.view(torch.float32) * (c0 / 2**23)


def _quant_fields(multiplier: Multiplier, mac: int, side: str) -> tuple[int, int, int]:
    """(the QuantFields kind, its parameter, how many fields) that :func:`_quantised_rows` writes for ``mac`` on
    ``side`` ("a" or "b"): the fields :func:`_int_operand` gives."""
    if multiplier.kind == "table":
        return _QUANT_FIELDS["signed table" if multiplier.signed else "table"], multiplier.bits, 2
    if side == "a" and mac == MACS["int", "mbm_fold"]:
        return _QUANT_FIELDS["mbm_fold"], multiplier.corrections[0], 3
    if multiplier.mac == "mitchell" and side == "b":
        return _QUANT_FIELDS["mitchell b"], 0, 1
    kind = _QUANT_FIELDS[multiplier.mac]
    return kind, multiplier.param if multiplier.mac == "drum" else 0, 2 if multiplier.mac == "mbm" else 1


def _quantised_rows(x: torch.Tensor, scales: torch.Tensor, multiplier: Multiplier, mac: int, side: str,
                    lib) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The fields of ``x``'s last-dimension rows, each quantised with its own scale (``scales`` one per row, or one
    value for all), as :func:`mbmlib.quant.quantise` does (``clamp(round(x / scale))``, NaN 0), in one pass with no
    integer tensor between; and each row's count of elements that are not finite (int64, ``x.shape[:-1]``)."""
    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    scales = scales.to(torch.float32).contiguous()
    kind, param, count = _quant_fields(multiplier, mac, side)
    fields = tuple(torch.empty(x.shape, dtype=torch.int32) for _ in range(count))
    bad = torch.empty(x.shape[:-1], dtype=torch.int64)
    lo, hi = multiplier.q_range
    threads = torch.get_num_threads() if x.numel() >= 1 << 16 else 1
    lib.mbm_quantise(x.data_ptr(), bad.numel(), x.shape[-1], scales.data_ptr(), int(scales.numel() == 1), lo, hi,
                     kind, param, fields[0].data_ptr(), fields[min(1, count - 1)].data_ptr(), fields[-1].data_ptr(),
                     bad.data_ptr(), threads)
    return fields, bad


def quantised_operand(x: torch.Tensor, scale: torch.Tensor, multiplier: Multiplier, mac: int,
                      capability: str | None = None) -> tuple[tuple[torch.Tensor, ...], int]:
    """A's fields for ``mac`` (:func:`_int_operand`) of ``x`` quantised with the one float32 ``scale`` (read by the
    kernel: no synchronisation) by :func:`_quantised_rows`; and how many elements of ``x`` are not finite (their
    outputs are the caller's to make NaN)."""
    fields, bad = _quantised_rows(x.reshape(1, -1), scale, multiplier, mac, "a", library(capability))
    return tuple(f.view(x.shape) for f in fields), int(bad)


def _int_b(qb: torch.Tensor, multiplier: Multiplier, lib) -> PackedB:
    """(G, N, K) integer B as the integer MACs read it (:func:`_int_operand`), in K-major panels."""
    mac = _int_mac(multiplier, lib)
    return _packed_int_b(_int_operand(qb, multiplier, "b", mac), multiplier, mac, lib)


def _packed_int_b(fields, multiplier: Multiplier, mac: int, lib) -> PackedB:
    """B's (G, N, K) fields for ``mac`` in K-major panels; a register table's magnitudes (indices) as int16 with
    its sign masks (Table16MaddMac: as int16 too)."""
    if mac in (MACS["int", "table16"], MACS["int", "table16_madd"]):
        sign, index = fields
        fields = (index.to(torch.int16), sign.to(torch.int16) if mac == MACS["int", "table16_madd"] else sign)
    return PackedB(_pack(fields, lib.mbm_tile_cols(mac)), fields[0].shape[1], mac)


class QuantisedB(NamedTuple):
    """A float weight quantised per row into B's panels (:func:`_quantised_b`); ``bad_rows``: which rows hold a
    NaN or infinity, ``any_bad`` whether any does (known without a synchronisation)."""

    packed: PackedB
    bad_rows: torch.Tensor
    any_bad: bool


def _quantised_b(w: torch.Tensor, scale: torch.Tensor, groups: Optional[int], multiplier: Multiplier,
                 capability: str | None) -> QuantisedB:
    """The float weight ``w`` (a GEMM's (G, N, K) B, ``groups`` None, or a convolution weight) quantised with one
    scale per output channel (``scale``: (N,) or (O,)) straight into B's fields, then packed, once per version of
    ``w`` and ``scale`` (:mod:`.prepared`): what quantise + :func:`_int_b` give, with no integer tensor between."""
    capability = capability or torch.backends.cpu.get_cpu_capability()

    def build() -> QuantisedB:
        lib = library(capability)
        mac = _int_mac(multiplier, lib)
        rows = _b_rows(w, groups)
        scales = scale.reshape(-1, rows.shape[1]).expand(rows.shape[:2])
        fields, bad = _quantised_rows(rows, scales, multiplier, mac, "b", lib)
        bad_rows = bad.reshape(-1) > 0 if groups is not None else bad > 0
        return QuantisedB(_packed_int_b(fields, multiplier, mac, lib), bad_rows, bool(bad_rows.any()))

    return prepared((w, scale), ("quantised", groups, multiplier, capability), build)


def _int_constants(multiplier: Multiplier, mac: int) -> MacConstants:
    """The integer MAC ``mac``'s constants: MBM's corrections, DRUM's split of A (:func:`drum_split`), a table's
    entries (the register tables: their int16 rows, and in c0 Table16MaddMac's first negated row)."""
    if mac in (MACS["int", "table16"], MACS["int", "table16_madd"]):
        table16 = _kernel_table16(multiplier)
        return MacConstants(table16.c0, 0, table16.rows, multiplier.bits)
    if multiplier.kind == "table":
        return MacConstants(table=_kernel_table(multiplier), bits=multiplier.bits)
    if multiplier.mac == "drum":
        return MacConstants(drum_split(multiplier), bits=multiplier.bits)
    return MacConstants(*multiplier.corrections, bits=multiplier.bits)


def _gemm_int(a_fields, a_row: torch.Tensor, a_col: torch.Tensor, a_group: int, b: PackedB,
              multiplier: Multiplier, capability: str | None, out_scale: Optional[torch.Tensor] = None,
              layout: Optional[OutLayout] = None) -> torch.Tensor:
    """Integer GEMM with a gathered A (see :func:`gemm`): (G, M, N) (or ``layout``'s tensor) float64 exact sums, or,
    given ``out_scale`` ((G, N) float64), float32 ``sums * out_scale`` (rounded once); ``b`` from :func:`_int_b`.

    Products are summed in int32 for as many steps of k as cannot overflow it (:func:`int_block`), then in int64.
    """
    G, cols = b.panels[0].shape[0], b.panels[0].shape[1] * b.panels[0].shape[3]
    if out_scale is not None:
        out_scale = F.pad(out_scale.to(torch.float64).expand(G, b.N), (0, cols - b.N)).contiguous()
    res = _run(a_fields, a_row, a_col, a_group, b.panels, b.N, torch.int64 if out_scale is None else torch.float32,
               b.mac, _int_constants(multiplier, b.mac), capability, kblock=int_block(multiplier), out_scale=out_scale,
               layout=layout)
    return res.to(torch.float64) if out_scale is None else res


def bmm_nt_int(qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier,
               capability: str | None = None) -> torch.Tensor:
    """Integer ``qa @ qb.T`` on the CPU: (G, M, K), (G, N, K) -> (G, M, N) float64 exact sums.

    Each term is ``sign * P(|a|, |b|)`` as :func:`mbmlib.multipliers.integer.int_products` gives it; ``multiplier``
    must pass :func:`supports_int`.
    """
    packed = _prepared_b(qb, None, _int_b, multiplier, capability)  # once per quantised weight
    a = [f.contiguous() for f in _int_operand(qa, multiplier, "a", packed.mac)]
    return _gemm_int(a, *_rows_of(qa), qa.shape[1] * qa.shape[2], packed, multiplier, capability)


def conv2d_int(qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int, multiplier: Multiplier,
               capability: str | None = None) -> torch.Tensor:
    """Integer convolution as an implicit GEMM: (B, C, H, W), (O, C/groups, kh, kw) -> (B, O, Ho, Wo) float64.

    The operand fields are computed once per image element (not per patch element) and the patches are
    read from them in place; same products and exact sums as im2col + :func:`bmm_nt_int`.
    """
    x_cl, a_row, a_col, (Ho, Wo) = _implicit_patches(qx, qw.shape, stride, padding, dilation)
    packed = _prepared_b(qw, groups, _int_b, multiplier, capability)
    a = [f.contiguous() for f in _int_operand(x_cl, multiplier, "a", packed.mac)]  # padding is 0: a zero operand
    return _gemm_int(a, a_row, a_col, qw.shape[1], packed, multiplier, capability,
                     layout=_nchw(qx.shape[0], qw.shape[0], groups, Ho, Wo))


def bmm_nt_quant(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 multiplier: Multiplier, capability: str | None = None) -> tuple[torch.Tensor, int, QuantisedB]:
    """Quantised ``a @ b.T`` from float ``a`` (G, M, K) with the one scale ``a_scale`` and float ``b`` (G, N, K) with
    one scale per row ``b_scale`` (N,), both quantised in the kernel's operand passes (``b`` once per version):
    ((G, M, N) float32 ``sums * a_scale * b_scale`` rounded once, as the unfused float64 path gives them; how many
    elements of ``a`` are not finite; the quantised ``b`` and its non-finite rows)."""
    qb = _quantised_b(b, b_scale, None, multiplier, capability)
    fields, bad = quantised_operand(a, a_scale, multiplier, qb.packed.mac, capability)
    scale = a_scale.double() * b_scale.double()
    out = _gemm_int(fields, *_rows_of(a), a.shape[1] * a.shape[2], qb.packed, multiplier, capability, scale)
    return out, bad, qb


def conv2d_quant(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, stride, padding,
                 dilation, groups: int, multiplier: Multiplier,
                 capability: str | None = None) -> tuple[torch.Tensor, int, QuantisedB]:
    """Quantised convolution from float ``x`` (B, C, H, W) (one scale ``x_scale``) and float ``w`` (O, C/groups,
    kh, kw) (scales ``w_scale`` (O,)), both quantised in the operand passes (``w`` once per version): ((B, O, Ho, Wo)
    float32 ``sums * x_scale * w_scale``; how many elements of ``x`` are not finite; the quantised ``w`` and its
    non-finite output channels).  Padding is the operand 0."""
    x_cl, a_row, a_col, (Ho, Wo) = _implicit_patches(x, w.shape, stride, padding, dilation)
    qw = _quantised_b(w, w_scale, groups, multiplier, capability)
    fields, bad = quantised_operand(x_cl, x_scale, multiplier, qw.packed.mac, capability)
    scale = (x_scale.double() * w_scale.double()).view(groups, -1)
    res = _gemm_int(fields, a_row, a_col, w.shape[1], qw.packed, multiplier, capability, scale,
                    _nchw(x.shape[0], w.shape[0], groups, Ho, Wo))
    return res, bad, qw

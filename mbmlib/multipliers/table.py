"""Tables of products ``P(A, B) = T[A, B]``, (2**n, 2**n) integers (SPEC sections 4 and 6): checked and read.

An *unsigned* table multiplies n-bit magnitudes (sign-magnitude operands, non-negative
entries); a *signed* one is indexed by two's-complement operands, ``P(a, b) = T[a mod 2**n,
b mod 2**n]`` for a, b in [-2**(n-1), 2**(n-1)), and its entries may be negative (EvoApproxLib's
``mul8s_*`` circuits).  Every entry counts, row and column 0 included.  A table comes from a
tensor of any integer dtype (:func:`checked_table`) or from a CSV with columns ``A, B`` and
the product (:func:`read_table_csv`, the project's ``A,B,MBM`` format; negative A or B make
it a signed table).
These are the tensor-level checks; :class:`mbmlib.Multiplier` builds table
multipliers on them (``Multiplier.from_table`` / ``from_csv``).
"""
from __future__ import annotations

import csv
import hashlib
import os

import torch

__all__ = ["MAX_TABLE_BITS", "checked_table", "table_digest", "read_table_csv", "write_table_csv"]

MAX_TABLE_BITS = 12  # a 4096 x 4096 table; beyond, use the formula multipliers
_MAX_ENTRY = 2**32 - 1  # products above would not sum exactly in float64 over long dot products


def table_digest(table: torch.Tensor, signed: bool = False) -> str:
    """The content digest that identifies a table (its name when it has no file); signedness is part of it."""
    digest = hashlib.sha256(table.to(torch.int64).contiguous().numpy().tobytes())
    if signed:
        digest.update(b"signed")
    return digest.hexdigest()[:16]


def _table_bits(table: torch.Tensor, where: str) -> int:
    if table.dim() != 2 or table.shape[0] != table.shape[1]:
        raise ValueError(f"{where}: a multiplier table must be square (2**n, 2**n), got shape {list(table.shape)}")
    size = table.shape[0]
    bits = size.bit_length() - 1
    if size < 2 or size != 1 << bits or bits > MAX_TABLE_BITS:
        raise ValueError(f"{where}: a multiplier table is 2**n x 2**n with 1 <= n <= {MAX_TABLE_BITS}, got "
                         f"{size} x {size}")
    return bits


def checked_table(table, where: str = "table", signed: bool = False) -> tuple[torch.Tensor, int]:
    """``(int64 table, n)`` of a (2**n, 2**n) tensor or array of integers (any integer dtype, or integral floats):
    0..2**32-1, or -(2**32-1)..2**32-1 for a ``signed`` table; ValueError naming the first bad entry else."""
    t = torch.as_tensor(table).detach().cpu()
    bits = _table_bits(t, where)
    if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not bool(torch.isfinite(t).all()
                                                                                      and torch.equal(t, t.round()))):
        raise ValueError(f"{where}: a multiplier table holds integers, got dtype {t.dtype} with non-integer entries")
    if t.is_floating_point() and bool((t.abs() > _MAX_ENTRY).any()):
        t = t.clamp(-_MAX_ENTRY - 1, _MAX_ENTRY + 1)  # still out of range below, without an int64 overflow
    t = t.to(torch.int64)  # compare in int64: 2**32 - 1 does not exist in int16
    lowest = -_MAX_ENTRY if signed else 0
    bad = ((t < lowest) | (t > _MAX_ENTRY)).nonzero()
    if len(bad):
        a, b = bad[0].tolist()
        hint = "" if signed or t[a, b] > 0 else " (a table of two's-complement operands: pass signed=True)"
        raise ValueError(f"{where}: entry [{a}, {b}] = {t[a, b].item()} is not an integer in "
                         f"{lowest}..{_MAX_ENTRY}{hint}")
    return t.contiguous(), bits


def _parse_rows(path: str) -> list[tuple[int, int, int, int]]:
    """(line, A, B, product) of every data row; ValueError naming the file and line of the first bad one.

    UTF-8, with or without the byte-order mark Excel's "CSV UTF-8" writes.
    """
    try:
        return _rows_of(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {err.object[err.start]:#04x} at offset {err.start}); "
                         "save the table as CSV (UTF-8)") from None


def _rows_of(path: str) -> list[tuple[int, int, int, int]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if len(header) != 3 or header[:2] != ["a", "b"]:
            raise ValueError(f"{path}: line 1 must be the header 'A,B,<product>' (e.g. 'A,B,MBM'), got {header}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                values = [int(c.strip()) for c in row]
            except ValueError:
                raise ValueError(f"{path}: line {line}: {','.join(row)!r} is not three integers") from None
            if len(values) != 3:
                raise ValueError(f"{path}: line {line}: {','.join(row)!r} must be three integers A,B,product")
            if abs(values[2]) > _MAX_ENTRY:
                raise ValueError(f"{path}: line {line}: product {values[2]} is beyond {_MAX_ENTRY}; a table holds "
                                 "products of magnitude below 2**32")
            rows.append((line, *values))
    return rows


def _table_size(rows, signed: bool, path: str) -> int:
    """2**n, the smallest power of two whose operand range (0..2**n-1, or -2**(n-1)..2**(n-1)-1 if ``signed``)
    holds every A and B of the rows."""
    lowest = min(min(a, b) for _, a, b, _ in rows)
    highest = max(max(a, b) for _, a, b, _ in rows)
    size = 2
    while highest > (size // 2 - 1 if signed else size - 1) or lowest < -size // 2:
        size *= 2
    if size > 1 << MAX_TABLE_BITS:
        raise ValueError(f"{path}: operands {lowest}..{highest} need a {size} x {size} table; tables have at most "
                         f"{MAX_TABLE_BITS}-bit operands")
    return size


def _table_of_rows(rows, path: str) -> tuple[torch.Tensor, bool]:
    """The (2**n, 2**n) table of CSV rows and whether it is signed (some A or B negative); every pair once."""
    if not rows:
        raise ValueError(f"{path}: no data rows; a table has one row A,B,product per pair")
    signed = any(a < 0 or b < 0 for _, a, b, _ in rows)
    size = _table_size(rows, signed, path)
    filled = torch.zeros((size, size), dtype=torch.bool)
    table = torch.zeros((size, size), dtype=torch.int64)
    seen: dict[tuple[int, int], int] = {}
    for line, a, b, p in rows:
        if (a, b) in seen:
            raise ValueError(f"{path}: line {line}: pair A={a}, B={b} repeats line {seen[a, b]}")
        if p < 0 and not signed:
            raise ValueError(f"{path}: line {line}: product {p} is negative; an unsigned table (A, B >= 0) holds "
                             "magnitudes (give signed operands A, B for a signed circuit)")
        seen[a, b] = line
        table[a % size, b % size], filled[a % size, b % size] = p, True
    missing = (~filled).nonzero()
    if len(missing):
        a, b = (_operand(i, size, signed) for i in missing[0].tolist())
        span = f"{-size // 2}..{size // 2 - 1}" if signed else f"0..{size - 1}"
        raise ValueError(f"{path}: pair A={a}, B={b} is missing: a {size} x {size} table needs one row for every "
                         f"pair of {span}, the file has {len(rows)} rows")
    return table, signed


def _operand(index: int, size: int, signed: bool) -> int:
    """The operand a table index stands for (two's complement in a signed table)."""
    return index - size if signed and index >= size // 2 else index


def read_table_csv(path) -> tuple[torch.Tensor, bool]:
    """``(table, signed)`` of a CSV with header ``A,B,<product>`` and one row per pair (any order)."""
    path = os.fspath(path)
    return _table_of_rows(_parse_rows(path), path)


def write_table_csv(table: torch.Tensor, path, column: str = "MBM", signed: bool = False) -> None:
    """Write a table as CSV ``A,B,<column>``, A-major (the format :func:`read_table_csv` reads); a ``signed``
    table's rows carry its two's-complement operands, -2**(n-1) first."""
    size = table.shape[0]
    order = [_operand(i, size, signed) for i in range(size)]
    order = sorted(order) if signed else order
    with open(path, "w", newline="") as f:
        f.write(f"A,B,{column}\n")
        rows = table.tolist()
        for a in order:
            row = rows[a % size]
            f.write("".join(f"{a},{b},{row[b % size]}\n" for b in order))

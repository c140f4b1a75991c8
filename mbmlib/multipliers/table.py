"""Tables of products ``P(A, B) = T[A, B]``, (2**n, 2**n) non-negative integers (SPEC section 4): checked and read.

A table comes from a tensor (:func:`checked_table`) or from a CSV with columns
``A, B`` and the product (:func:`read_table_csv`, the project's ``A,B,MBM`` format).
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


def table_digest(table: torch.Tensor) -> str:
    """The content digest that identifies a table (its name when it has no file)."""
    return hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]


def _table_bits(table: torch.Tensor, where: str) -> int:
    if table.dim() != 2 or table.shape[0] != table.shape[1]:
        raise ValueError(f"{where}: a multiplier table must be square (2**n, 2**n), got shape {list(table.shape)}")
    size = table.shape[0]
    bits = size.bit_length() - 1
    if size < 2 or size != 1 << bits or bits > MAX_TABLE_BITS:
        raise ValueError(f"{where}: a multiplier table is 2**n x 2**n with 1 <= n <= {MAX_TABLE_BITS}, got "
                         f"{size} x {size}")
    return bits


def checked_table(table, where: str = "table") -> tuple[torch.Tensor, int]:
    """``(int64 table, n)`` of a (2**n, 2**n) tensor or array of non-negative integers below 2**32; ValueError else."""
    t = torch.as_tensor(table).detach().cpu()
    bits = _table_bits(t, where)
    if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not torch.equal(t, t.round())):
        raise ValueError(f"{where}: a multiplier table holds non-negative integers, got dtype {t.dtype}")
    bad = ((t < 0) | (t > _MAX_ENTRY)).nonzero()
    if len(bad):
        a, b = bad[0].tolist()
        raise ValueError(f"{where}: entry [{a}, {b}] = {t[a, b].item()} is not an integer in 0..{_MAX_ENTRY}")
    return t.to(torch.int64).contiguous(), bits


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
            if len(values) != 3 or min(values) < 0:
                raise ValueError(f"{path}: line {line}: {','.join(row)!r} must be three non-negative integers "
                                 "A,B,product")
            if values[2] > _MAX_ENTRY:
                raise ValueError(f"{path}: line {line}: product {values[2]} is above {_MAX_ENTRY}; a table holds "
                                 "products below 2**32")
            rows.append((line, *values))
    return rows


def _table_of_rows(rows, path: str) -> torch.Tensor:
    """The (2**n, 2**n) table of CSV rows, 2**n the smallest power of two above every index; every pair once."""
    if not rows:
        raise ValueError(f"{path}: no data rows; a table has one row A,B,product per pair")
    size = max(2, 1 << max(max(a, b) for _, a, b, _ in rows).bit_length())
    if size > 1 << MAX_TABLE_BITS:
        raise ValueError(f"{path}: indices up to {size - 1}; tables have at most {MAX_TABLE_BITS}-bit indices")
    table = torch.full((size, size), -1, dtype=torch.int64)
    seen: dict[tuple[int, int], int] = {}
    for line, a, b, p in rows:
        if (a, b) in seen:
            raise ValueError(f"{path}: line {line}: pair A={a}, B={b} repeats line {seen[a, b]}")
        seen[a, b] = line
        table[a, b] = p
    missing = (table < 0).nonzero()
    if len(missing):
        a, b = missing[0].tolist()
        raise ValueError(f"{path}: pair A={a}, B={b} is missing: a {size} x {size} table needs one row for every "
                         f"pair of 0..{size - 1}, the file has {len(rows)} rows")
    return table


def read_table_csv(path) -> torch.Tensor:
    """The table of a CSV with header ``A,B,<product>`` and one row per pair (any order)."""
    path = os.fspath(path)
    return _table_of_rows(_parse_rows(path), path)


def write_table_csv(table: torch.Tensor, path, column: str = "MBM") -> None:
    """Write a table as CSV ``A,B,<column>``, A-major (the format :func:`read_table_csv` reads)."""
    size = table.shape[0]
    with open(path, "w", newline="") as f:
        f.write(f"A,B,{column}\n")
        for a, row in enumerate(table.tolist()):
            f.write("".join(f"{a},{b},{p}\n" for b, p in zip(range(size), row)))

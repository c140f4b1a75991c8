"""Table multipliers: ``P(A, B) = T[A, B]`` for a (2**n, 2**n) table of non-negative integers (SPEC section 4).

Tables come from a tensor (:func:`table_multiplier`), from a CSV with columns
``A, B`` and the product (:func:`read_csv`, the project's ``A,B,MBM`` format),
or from a formula multiplier (:func:`table_from_multiplier`, :func:`write_csv`).
A table multiplier is named ``"table:<path>"`` (read from that CSV) or
``"table:sha256=<digest>"`` (built in memory in this process); both names parse
back with :func:`mbmlib.as_multiplier`.
"""
from __future__ import annotations

import csv
import hashlib
import os

import torch

from .integer import approx_mul_int
from .specs import Multiplier, MultiplierLike, as_multiplier

__all__ = ["MAX_TABLE_BITS", "table_multiplier", "read_csv", "write_csv", "table_from_multiplier", "named_table"]

MAX_TABLE_BITS = 12  # a 4096 x 4096 table; beyond, use the formula multipliers
_MAX_ENTRY = 2**32 - 1  # products above would not sum exactly in float64 over long dot products
_BY_DIGEST: dict[str, Multiplier] = {}  # every table built in this process, for "table:sha256=..." names
_BY_FILE: dict[str, tuple[tuple[int, int], Multiplier]] = {}  # path -> ((mtime_ns, size), table)


def _digest(table: torch.Tensor) -> str:
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


def table_multiplier(table, source: str | None = None) -> Multiplier:
    """A table multiplier from a (2**n, 2**n) tensor or array of non-negative integers (below 2**32)."""
    where = source or "table"
    t = torch.as_tensor(table).detach().cpu()
    bits = _table_bits(t, where)
    if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not torch.equal(t, t.round())):
        raise ValueError(f"{where}: a multiplier table holds non-negative integers, got dtype {t.dtype}")
    bad = ((t < 0) | (t > _MAX_ENTRY)).nonzero()
    if len(bad):
        a, b = bad[0].tolist()
        raise ValueError(f"{where}: entry [{a}, {b}] = {t[a, b].item()} is not an integer in 0..{_MAX_ENTRY}")
    t = t.to(torch.int64).contiguous()
    mult = Multiplier("table", bits=bits, digest=_digest(t), source=source, table=t)
    _BY_DIGEST.setdefault(mult.digest, Multiplier("table", bits=bits, digest=mult.digest, table=t))
    return mult


def _parse_rows(path: str) -> list[tuple[int, int, int, int]]:
    """(line, A, B, product) of every data row; ValueError naming the file and line of the first bad one."""
    with open(path, newline="") as f:
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


def read_csv(path) -> Multiplier:
    """A table multiplier from a CSV with header ``A,B,<product>`` and one row per pair (any order)."""
    path = os.fspath(path)
    return table_multiplier(_table_of_rows(_parse_rows(path), path), source=path)


def named_table(rest: str) -> Multiplier:
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
        cached = _BY_FILE[rest] = (stamp, read_csv(rest))
    return cached[1]


def table_from_multiplier(multiplier: MultiplierLike) -> torch.Tensor:
    """The (2**n, 2**n) int64 table ``P(A, B)`` of an integer multiplier (n <= 12)."""
    mult = as_multiplier(multiplier)
    if not mult.is_integer or mult.bits > MAX_TABLE_BITS:
        raise ValueError(f"tables are built from integer multipliers of at most {MAX_TABLE_BITS} bits such as "
                         f"'mbm-int8', got {mult.name!r}")
    if mult.kind == "table":
        return mult.table.clone()
    a = torch.arange(1 << mult.bits)
    return approx_mul_int(a[:, None], a[None, :], mult)  # (2**n, 2**n)


def write_csv(multiplier: MultiplierLike, path, column: str = "MBM") -> None:
    """Write an integer multiplier's table as CSV ``A,B,<column>``, A-major (the format :func:`read_csv` reads)."""
    table = table_from_multiplier(multiplier)
    size = table.shape[0]
    with open(path, "w", newline="") as f:
        f.write(f"A,B,{column}\n")
        for a, row in enumerate(table.tolist()):
            f.write("".join(f"{a},{b},{p}\n" for b, p in zip(range(size), row)))

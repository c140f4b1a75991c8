"""The arithmetic core: multiplier specs and bit-exact elementwise products (torch only).

``specs`` names the multipliers, ``floating`` computes float32 products bit for
bit (SPEC section 1), ``integer`` and ``table`` the integer and lookup-table
multipliers (section 4), ``stats`` measures their error.
"""
from .floating import (
    SMALLEST_NORMAL,
    approx_mul,
    check_float_tensor,
    mantissa_product,
    mbm_mul,
    mitchell_mul,
    products,
    split_operand,
)
from .integer import EXACT_SUM_LIMIT, approx_mul_int, check_int_tensor, flat_table, int_fields, int_products
from .specs import (
    MANT_BITS,
    MANT_MASK,
    MAX_TRUNCATION,
    MBM_CORRECTION,
    MULTIPLIER_KINDS,
    INT_BITS_RANGE,
    ONE,
    TABLE_PREFIX,
    Multiplier,
    MultiplierLike,
    as_multiplier,
)
from .stats import error_map, error_stats
from .table import MAX_TABLE_BITS, read_csv, table_from_multiplier, table_multiplier, write_csv

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
    "SMALLEST_NORMAL",
    "split_operand",
    "check_float_tensor",
    "mantissa_product",
    "products",
    "approx_mul",
    "mbm_mul",
    "mitchell_mul",
    "error_stats",
    "error_map",
    "INT_BITS_RANGE",
    "TABLE_PREFIX",
    "MAX_TABLE_BITS",
    "EXACT_SUM_LIMIT",
    "check_int_tensor",
    "int_fields",
    "int_products",
    "flat_table",
    "approx_mul_int",
    "table_multiplier",
    "read_csv",
    "write_csv",
    "table_from_multiplier",
]

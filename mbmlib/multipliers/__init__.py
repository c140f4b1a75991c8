"""The arithmetic core: multiplier specs and bit-exact elementwise products (torch only).

``specs`` names the multipliers, ``floating`` computes float32 products bit for
bit (SPEC section 1), ``stats`` measures their error.
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
from .specs import (
    MANT_BITS,
    MANT_MASK,
    MAX_TRUNCATION,
    MBM_CORRECTION,
    MULTIPLIER_KINDS,
    ONE,
    Multiplier,
    MultiplierLike,
    as_multiplier,
)
from .stats import error_map, error_stats

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
]

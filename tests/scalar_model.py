"""Scalar reference model of the multipliers, straight from SPEC.md section 1.

Pure Python integers, one operand pair at a time; used only by the tests to
check the vectorised ops bit for bit.
"""
import math
import struct


def f2b(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def b2f(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def _result_bits(sign: int, e: int, M: int) -> int:
    """Rule 6's result from the exponent field e and the normalised significand M: inf, zero, or the fields."""
    if e >= 255:
        return sign | 0x7F800000
    if e <= 0:
        return sign
    return sign | (e << 23) | (M % (1 << 23))


def approx_mul_bits(a_bits: int, b_bits: int, kind: str, t: int = 0) -> int:
    """Product bit pattern of two float32 bit patterns under 'mitchell' or 'mbm' with truncation t."""
    sa, ea, ma = a_bits >> 31, (a_bits >> 23) & 0xFF, a_bits & 0x7FFFFF
    sb, eb, mb = b_bits >> 31, (b_bits >> 23) & 0xFF, b_bits & 0x7FFFFF
    sign = (sa ^ sb) << 31
    a_nan = ea == 0xFF and ma != 0
    b_nan = eb == 0xFF and mb != 0
    # 1. subnormal inputs count as zero
    a_zero = ea == 0
    b_zero = eb == 0
    a_inf = ea == 0xFF and ma == 0
    b_inf = eb == 0xFF and mb == 0
    # 2. special cases
    if a_nan or b_nan:
        return 0x7FC00000
    if (a_inf and b_zero) or (b_inf and a_zero):
        return 0x7FC00000
    if a_inf or b_inf:
        return sign | 0x7F800000
    if a_zero or b_zero:
        return sign
    # 3. truncation
    if t > 0:
        ma = (ma & ~((1 << t) - 1)) | (1 << t)
        mb = (mb & ~((1 << t) - 1)) | (1 << t)
    # 4. mantissa sum
    s = ma + mb
    carry = 1 if s >= (1 << 23) else 0
    # 5. correction
    if kind == "mbm":
        corr = 0xA0000 >> carry
        if t > 16:
            corr &= ~((1 << t) - 1)
        sc = (s % (1 << 23)) + corr
        if carry and sc >= (1 << 23):
            sc = s
    elif kind == "mitchell":
        sc = s % (1 << 23)
    else:
        raise ValueError(kind)
    # 6. normalise (truncating)
    M = ((1 << 23) + sc) << carry
    norm = 1 if M >= (1 << 24) else 0
    if norm:
        M >>= 1
    return _result_bits(sign, ea + eb - 127 + norm, M)


def design_mul_bits(a_bits: int, b_bits: int, significand, t: int = 0) -> int:
    """Product bit pattern under any float design given by ``significand(ma, mb) -> G`` (Python ints).

    The frame of SPEC section 1 (rules 1-3 and 6) around a design's G: subnormal inputs are zero,
    special cases, truncation, then G truncated to 24 significant bits (each halving adds one to
    the exponent), overflow and underflow by the result exponent.
    """
    sa, ea, ma = a_bits >> 31, (a_bits >> 23) & 0xFF, a_bits & 0x7FFFFF
    sb, eb, mb = b_bits >> 31, (b_bits >> 23) & 0xFF, b_bits & 0x7FFFFF
    sign = (sa ^ sb) << 31
    if (ea == 0xFF and ma) or (eb == 0xFF and mb):
        return 0x7FC00000
    if (ea == 0xFF and eb == 0) or (eb == 0xFF and ea == 0):
        return 0x7FC00000
    if ea == 0xFF or eb == 0xFF:
        return sign | 0x7F800000
    if ea == 0 or eb == 0:
        return sign
    if t > 0:
        ma = (ma & ~((1 << t) - 1)) | (1 << t)
        mb = (mb & ~((1 << t) - 1)) | (1 << t)
    M, norm = significand(ma, mb), 0
    while M >= (1 << 24):
        M, norm = M >> 1, norm + 1
    return _result_bits(sign, ea + eb - 127 + norm, M)


def approx_mul_scalar(a: float, b: float, kind: str, t: int = 0) -> float:
    return b2f(approx_mul_bits(f2b(a), f2b(b), kind, t))


def same_float(x: float, y: float) -> bool:
    """Equal as the spec compares: NaN equals NaN, zeros by value."""
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y


# ----------------------------------------------------------------------------- integer designs (SPEC section 4)

_W = 24  # fraction bits of the fixed-point model: x has at most 15 (n <= 16), c/2 has 7


def int_products_model(A, B, kind: str):
    """P(A, B) of unsigned magnitudes under 'mbm' or 'mitchell' (numpy int64 arrays, broadcasting).

    Straight from SPEC section 4: k = floor(log2 A), x = A / 2**k - 1, carry = x1 + x2 >= 1;
    G = 1 + x1 + x2 + c without carry, 2 (x1 + x2 + c/2) after one, 2 (x1 + x2) when a carry
    and x1 + x2 + c/2 >= 2 (no correction); c = 0.078125 for MBM, 0 for Mitchell;
    P = floor(2**(k1 + k2) * G), 0 if either operand is 0.  Fixed point with 24 fraction bits.
    """
    import numpy as np

    A, B = np.broadcast_arrays(np.asarray(A, dtype=np.int64), np.asarray(B, dtype=np.int64))
    k1 = np.frexp(np.maximum(A, 1))[1].astype(np.int64) - 1
    k2 = np.frexp(np.maximum(B, 1))[1].astype(np.int64) - 1
    x1 = (A - (1 << k1)) << (_W - k1)
    x2 = (B - (1 << k2)) << (_W - k2)
    one = 1 << _W
    c = (5 << (_W - 6)) if kind == "mbm" else 0  # 2**-4 + 2**-6
    s = x1 + x2
    carry = s >= one
    g_carry = np.where(s + c // 2 >= 2 * one, 2 * s, 2 * s + c)
    g = np.where(carry, g_carry, one + s + c)
    p = (g << (k1 + k2)) >> _W
    return np.where((A == 0) | (B == 0), 0, p)


def lmul_mul_bits(a_bits: int, b_bits: int, n: int) -> int:
    """L-Mul with n mantissa bits (SPEC section 6): the top n bits of each mantissa (the rest cleared, none
    forced to 1), F = 1 + xA + xB + 2**-l with l = n (n <= 3), 3 (n = 4), 4 (n > 4), halved (truncating) at 2."""
    keep = ~((1 << (23 - n)) - 1)
    offset = (1 << 23) >> (n if n <= 3 else 3 if n == 4 else 4)
    return design_mul_bits(a_bits, b_bits, lambda ma, mb: (1 << 23) + (ma & keep) + (mb & keep) + offset)


def drum_model(A, B, k: int):
    """DRUM-k on unsigned magnitudes (SPEC section 6), numpy int64 arrays: below 2**k as they are, else the k
    bits from the leading one down with the lowest forced to 1; the reduced operands multiplied exactly."""
    import numpy as np

    def reduced(x):
        x = np.asarray(x, dtype=np.int64)
        p = np.frexp(np.maximum(x, 1))[1].astype(np.int64) - 1  # floor(log2 x)
        s = np.maximum(p - k + 1, 0)
        return np.where(x < (1 << k), x, ((x >> s) | 1) << s)

    A, B = np.broadcast_arrays(A, B)
    return reduced(A) * reduced(B)

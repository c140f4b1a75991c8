// Register-blocked bit-exact approximate GEMM for the CPU: one tile routine, the design's multiply-accumulate
// (MAC) a template parameter.
//
// out[g, m, n] = sum_k product(a[g, m, k], b[g, n, k]).  Each call computes a range of tiles; a tile is MR
// rows x NR columns of outputs held in registers.  For every k it broadcasts MR elements of A and loads one
// NR-wide vector of B (packed K-major per column panel, so the load is contiguous), with no horizontal
// reduction.  The MACs (SPEC sections 1, 4 and 6): float Mitchell, MBM and L-Mul on (scale, mantissa) fields,
// formed in the same order as mbmlib.multipliers.floating.products(flush=False) (build with -ffp-contract=off);
// Mitchell in the bit domain on words (AVX-512); integer Mitchell and MBM on (sign, exponent, mantissa)
// fields, table gathers on (sign, magnitude) and DRUM on signed reduced operands, summed exactly.  The
// instruction set is chosen at build time (-mavx512f / -mavx2 / none) by the Python loader, which passes one
// GemmArgs per call.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#ifdef _OPENMP
#define HAS_OPENMP 1  // built with -fopenmp: shares the process's libgomp (and its threads) with torch
#else
#define HAS_OPENMP 0
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
typedef __m512 vf;
typedef __m512i vi;
static inline vf f_set1(float x) { return _mm512_set1_ps(x); }
static inline vi i_set1(int32_t x) { return _mm512_set1_epi32(x); }
static inline vf f_load(const float* p) { return _mm512_loadu_ps(p); }
static inline vi i_load(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline void f_store(float* p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf f_zero() { return _mm512_setzero_ps(); }
static inline vf f_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf f_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vi i_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi i_mul(vi a, vi b) { return _mm512_mullo_epi32(a, b); }  // low 32 bits of the product
static inline vi i_shr1(vi a) { return _mm512_srai_epi32(a, 1); }
// where(x >= y, p, q) and where(x < y, p, q) on int32 lanes
static inline vi i_sel_ge(vi x, vi y, vi p, vi q) { return _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(x, y), q, p); }
static inline vi i_sel_lt(vi x, vi y, vi p, vi q) { return _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(x, y), q, p); }
static inline vf as_f(vi a) { return _mm512_castsi512_ps(a); }
static inline vf f_of_i(vi a) { return _mm512_cvtepi32_ps(a); }  // exact below 2^24 significant bits
static inline vi i_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static inline vi i_xor(vi a, vi b) { return _mm512_xor_si512(a, b); }
static inline vi i_andnot(vi a, vi b) { return _mm512_andnot_si512(a, b); }  // ~a & b
static inline vi i_shl1(vi a) { return _mm512_slli_epi32(a, 1); }
static inline vi i_shr24(vi a) { return _mm512_srli_epi32(a, 24); }
static inline vi i_shrv(vi a, vi n) { return _mm512_srlv_epi32(a, n); }  // 0 where n > 31
static inline vi i_gather(const int32_t* t, vi idx) { return _mm512_i32gather_epi32(idx, t, 4); }
static inline vi i_trunc(vf a) { return _mm512_cvttps_epi32(a); }  // toward zero; exact below 2^31
static inline void i_store(int32_t* p, vi x) { _mm512_storeu_si512(p, x); }
#define ISA 2
#define MR 6
#define FLOAT_MBM 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define VW 8
typedef __m256 vf;
typedef __m256i vi;
static inline vf f_set1(float x) { return _mm256_set1_ps(x); }
static inline vi i_set1(int32_t x) { return _mm256_set1_epi32(x); }
static inline vf f_load(const float* p) { return _mm256_loadu_ps(p); }
static inline vi i_load(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void f_store(float* p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf f_zero() { return _mm256_setzero_ps(); }
static inline vf f_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf f_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vi i_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi i_mul(vi a, vi b) { return _mm256_mullo_epi32(a, b); }
static inline vi i_shr1(vi a) { return _mm256_srai_epi32(a, 1); }
static inline vi i_sel_lt(vi x, vi y, vi p, vi q) { return _mm256_blendv_epi8(q, p, _mm256_cmpgt_epi32(y, x)); }
static inline vi i_sel_ge(vi x, vi y, vi p, vi q) { return _mm256_blendv_epi8(p, q, _mm256_cmpgt_epi32(y, x)); }
static inline vf as_f(vi a) { return _mm256_castsi256_ps(a); }
static inline vf f_of_i(vi a) { return _mm256_cvtepi32_ps(a); }
static inline vi i_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
static inline vi i_xor(vi a, vi b) { return _mm256_xor_si256(a, b); }
static inline vi i_andnot(vi a, vi b) { return _mm256_andnot_si256(a, b); }  // ~a & b
static inline vi i_shl1(vi a) { return _mm256_slli_epi32(a, 1); }
static inline vi i_shr24(vi a) { return _mm256_srli_epi32(a, 24); }
static inline vi i_shrv(vi a, vi n) { return _mm256_srlv_epi32(a, n); }  // 0 where n > 31
static inline vi i_gather(const int32_t* t, vi idx) { return _mm256_i32gather_epi32(t, idx, 4); }
static inline vi i_trunc(vf a) { return _mm256_cvttps_epi32(a); }
static inline void i_store(int32_t* p, vi x) { _mm256_storeu_si256((__m256i*)p, x); }
#define ISA 1
#else
#define VW 8
struct vf { float v[VW]; };
struct vi { int32_t v[VW]; };
#define LANES(T, expr) T r; for (int l = 0; l < VW; ++l) r.v[l] = (expr); return r
static inline vf f_set1(float x) { LANES(vf, x); }
static inline vi i_set1(int32_t x) { LANES(vi, x); }
static inline vf f_load(const float* p) { LANES(vf, p[l]); }
static inline vi i_load(const int32_t* p) { LANES(vi, p[l]); }
static inline void f_store(float* p, vf x) { for (int l = 0; l < VW; ++l) p[l] = x.v[l]; }
static inline vf f_zero() { LANES(vf, 0.0f); }
static inline vf f_add(vf a, vf b) { LANES(vf, a.v[l] + b.v[l]); }
static inline vf f_mul(vf a, vf b) { LANES(vf, a.v[l] * b.v[l]); }
static inline vi i_add(vi a, vi b) { LANES(vi, a.v[l] + b.v[l]); }
static inline vi i_mul(vi a, vi b) { LANES(vi, (int32_t)((uint32_t)a.v[l] * (uint32_t)b.v[l])); }
static inline vi i_shr1(vi a) { LANES(vi, a.v[l] >> 1); }
static inline vi i_sel_ge(vi x, vi y, vi p, vi q) { LANES(vi, x.v[l] >= y.v[l] ? p.v[l] : q.v[l]); }
static inline vi i_sel_lt(vi x, vi y, vi p, vi q) { LANES(vi, x.v[l] < y.v[l] ? p.v[l] : q.v[l]); }
static inline vf as_f(vi a) { vf r; std::memcpy(r.v, a.v, sizeof r.v); return r; }
static inline vf f_of_i(vi a) { LANES(vf, (float)a.v[l]); }
static inline vi i_sub(vi a, vi b) { LANES(vi, a.v[l] - b.v[l]); }
static inline vi i_xor(vi a, vi b) { LANES(vi, a.v[l] ^ b.v[l]); }
static inline vi i_andnot(vi a, vi b) { LANES(vi, ~a.v[l] & b.v[l]); }
static inline vi i_shl1(vi a) { LANES(vi, (int32_t)((uint32_t)a.v[l] << 1)); }
static inline vi i_shr24(vi a) { LANES(vi, (int32_t)((uint32_t)a.v[l] >> 24)); }
static inline vi i_shrv(vi a, vi n) { LANES(vi, (uint32_t)n.v[l] > 31 ? 0 : (int32_t)((uint32_t)a.v[l] >> n.v[l])); }
static inline vi i_gather(const int32_t* t, vi idx) { LANES(vi, t[idx.v[l]]); }
static inline vi i_trunc(vf a) { LANES(vi, (int32_t)a.v[l]); }
static inline void i_store(int32_t* p, vi x) { for (int l = 0; l < VW; ++l) p[l] = x.v[l]; }
#define ISA 0
#endif

#ifndef MR
#define MR 4       // rows of A per tile
#endif
#define NV 2       // vectors of B per tile
#define NR (NV * VW)
static const int32_t ONE = 1 << 23;
static const int32_t ONE_BITS = 0x3F800000;  // bits of 1.0f: mant_sum + ONE_BITS are the bits of 1 + x1 + x2

// The MAC policies' per-product functions must be inlined into the tile loop (else their operands go through memory).
#define ALWAYS_INLINE static inline __attribute__((always_inline))

// ----------------------------------------------------------------------------- one call's arguments

// The MACs (GemmArgs.mac).  Float MACs sum in float32, integer ones exactly (int32 blocks, int64 output).
enum Mac { F_MITCHELL = 0, F_MBM = 1, F_MITCHELL_WORDS = 2, I_MBM = 4, I_TABLE = 5, F_LMUL = 6,
           I_DRUM = 7, I_MITCHELL_WORDS = 8, I_TABLE16 = 9, I_MBM_FOLD = 10, I_TABLE16_MADD = 11 };

// Mirrors cpu_native.GemmArgs (ctypes).  A: element (g, m, k) of field f at a[f] + g * a_group + a_row[m]
// + a_col[k] (a plain row-major A has a_row[m] = m * K, a_col[k] = k; im2col patches read straight from a
// padded channels-last image have a_row[m] = the patch's corner, a_col[k] = the (kh, kw, channel) offset).
// B: field f in (G, Np / NR, K, NR) K-major column panels at b[f].  out: (G, M, Np), float32 or int64.
struct GemmArgs {
    const void* a[3];
    const int64_t* a_row;
    const int64_t* a_col;
    int64_t a_group;
    const void* b[3];
    void* out;
    int64_t M, Np, K;
    int32_t mac, c0, c1;   // the MAC; MBM's corrections (no carry, carry), L-Mul's c0, DRUM's split in c0
    const int32_t* table;  // I_TABLE: (2^bits)^2 int32 entries
    int32_t bits;
    int64_t kblock;        // integer MACs: steps of k summed in int32 before the int64 output (kblock * |term| < 2^31)
    const double* out_scale;  // integer MACs: null (int64 sums out), or (G, Np) scales: float32 sum * scale out
    const int64_t* out_row;   // null: out is (G, M, Np) row-major; else (g, m, n < N) goes to element
    int64_t out_col, out_group, N;  // g * out_group + out_row[m] + n * out_col (e.g. a convolution's NCHW)
};

// ----------------------------------------------------------------------------- float MACs (SPEC 1)

struct FloatConsts {
    vi two, four, corner, half, c0, c1;  // bits of 2.0f, 4.0f, 4.0f - c1; 0x20000000 (see g0); corrections
    vf c0f, c1f;                         // corrections as float addends (no carry / carry)
    int32_t a_bias;                      // added to A's mantissa field: ONE_BITS, or L-Mul's 2^23 + 2^(23-l) (c0)
    vf ulp;                              // 2^-23
};

// MBM_ONE_ADDEND: MBM whose correction is the same float addend with and without a carry (c1 = c0 / 2,
// true for t <= 16: 1 + x1 + x2 + c and 2 * (x1 + x2 + c/2) both add c).
enum FloatKind { MITCHELL = 0, MBM = 1, MBM_ONE_ADDEND = 2, LMUL = 3 };

// The significand G * 2^-23 of a product as a float, from the bits sb = mant_a + mant_b + ONE_BITS
// (the registry's significand, mbmlib.multipliers.designs).  As a float, sb is 1 + x1 + x2 below a carry
// and 2 * (x1 + x2) after one: exactly Mitchell's significand.  MBM adds the correction (halved after a
// carry), truncating the normalisation, and skips it in the corner case (carry and a sum >= 2).
template <int KIND>
static inline vf significand(vi sb, const FloatConsts& c) {
    if (KIND == MITCHELL) return as_f(sb);
    // L-Mul: sb = mA + mB + 2^23 + 2^(23-l) (mantissas already cut to n bits) is G itself, below 2^25:
    // normalised (its lowest bit dropped from 2^24 on), it has 24 significant bits and converts exactly
    if (KIND == LMUL) return f_mul(f_of_i(i_andnot(i_shr24(sb), sb)), c.ulp);
#if defined(FLOAT_MBM)
    // corner case <=> sb + c1 >= bits(4.0f); never below a carry, where sb < bits(2.0f)
    __mmask16 corrected = _mm512_cmplt_epi32_mask(sb, c.corner);
    vf corr = KIND == MBM_ONE_ADDEND ? c.c0f : _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(sb, c.two), c.c0f, c.c1f);
    return _mm512_mask_add_round_ps(as_f(sb), corrected, as_f(sb), corr, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
#else
    vi m0 = i_add(sb, c.c0);                                     // 1 + x1 + x2 + c, maybe >= 2
    // m0 >= bits(2.0f) holds 1 + x1 + x2 + c >= 2 in an overflowed mantissa field: (m0 >> 1) + half
    // re-encodes it with exponent 1, its last bit truncated as the normalising shift does
    vi g0 = i_sel_lt(m0, c.two, m0, i_add(i_shr1(m0), c.half));
    vi t1 = i_add(sb, c.c1);                                     // carry: 2 * (x1 + x2 + c/2)
    vi g1 = i_sel_lt(t1, c.four, t1, sb);                        // corner case: skip the correction
    return as_f(i_sel_ge(sb, c.two, g1, g0));
#endif
}

// A MAC policy says how an element of A (FIELDS int32-sized fields, broadcast) and a vector of B are
// read, what one multiply-accumulate does to a register sum, and how a block of sums reaches the output.
// Float MACs sum all of K in one block (their flush stores it); integer MACs flush int32 blocks to int64.
template <int KIND>
struct FloatMac {
    static const int FIELDS = 2;  // the float scale sign * 2^k, the (truncated) 23-bit mantissa field
    static const int SPAN = VW;   // columns one B operand covers
    typedef float Out;
    typedef vf Sum;
    typedef FloatConsts Consts;
    struct A { vf s; vi m; };
    struct B { vf s; vi m; };
    static Consts consts(const GemmArgs& g) {
        return {i_set1(ONE_BITS + ONE), i_set1(ONE_BITS + 2 * ONE), i_set1(ONE_BITS + 2 * ONE - g.c1),
                i_set1(0x20000000), i_set1(g.c0), i_set1(g.c1),
                f_set1((float)g.c0 / (float)ONE), f_set1((float)g.c1 / (float)(ONE / 2)),
                KIND == LMUL ? g.c0 : ONE_BITS, f_set1(1.0f / (float)ONE)};
    }
    static int64_t block(const GemmArgs& g) { return g.K > 0 ? g.K : 1; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts& c) {
        return {f_set1(((const float*)f[0])[k]), i_set1(f[1][k] + (KIND == LMUL ? c.a_bias : ONE_BITS))};
    }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) {
        return {f_load((const float*)f[0] + at), i_load(f[1] + at)};
    }
    ALWAYS_INLINE Sum zero() { return f_zero(); }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts& c) {
        return f_add(acc, f_mul(f_mul(a.s, b.s), significand<KIND>(i_add(a.m, b.m), c)));
    }
    ALWAYS_INLINE void flush(Out* out, Sum s) { f_store(out, s); }
};

#if defined(__AVX512F__)
// Mitchell in the bit domain: where scale_a * scale_b * G * 2^-23 is a normal float (the caller checks it
// for every pair of nonzero operands), its bits are bits(a) + bits(b) - bits(1.0f) of the (truncated)
// operands: the signs add mod 2 in bit 31, the mantissa sum's carry is Mitchell's normalisation.  The
// caller passes words: A's bits minus bits(1.0f), or ZERO_WORD for a zero; B's bits, or 0 for a zero.
// A zero's lanes are left out (adding +-0 to a sum that starts at +0 never changes it).  Per product:
// one masked compare, one integer add, one masked float add; same sums, same k order, as FloatMac.
static const int32_t ZERO_WORD = -ONE_BITS;  // no nonzero operand's word: its float exponent would be 0

struct WordsMac {
    static const int FIELDS = 1;
    static const int SPAN = VW;
    typedef float Out;
    typedef vf Sum;
    struct Consts { vi zero_word; };
    struct A { vi a; };
    struct B { vi b; __mmask16 nonzero; };
    static Consts consts(const GemmArgs&) { return {i_set1(ZERO_WORD)}; }
    static int64_t block(const GemmArgs& g) { return g.K > 0 ? g.K : 1; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts&) { return {i_set1(f[0][k])}; }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) {
        vi b = i_load(f[0] + at);
        return {b, _mm512_test_epi32_mask(b, b)};
    }
    ALWAYS_INLINE Sum zero() { return f_zero(); }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts& c) {
        __mmask16 keep = _mm512_mask_cmpneq_epi32_mask(b.nonzero, a.a, c.zero_word);
        return _mm512_mask_add_ps(acc, keep, acc, as_f(i_add(a.a, b.b)));
    }
    ALWAYS_INLINE void flush(Out* out, Sum s) { f_store(out, s); }
};
#endif

// ----------------------------------------------------------------------------- integer MACs (SPEC 4)
//
// sign * P(|a|, |b|), exact, summed in int32 blocks (no block sum can reach 2^31: GemmArgs.kblock) flushed to
// int64.  Formula designs (n <= 12 bits): an operand q is exactly the float q, and P(|a|, |b|) is the registry's
// (G << (k1 + k2)) >> 23, i.e. the float design's product of float(a) and float(b) (exact: a power of two times
// G, below 2^24) truncated toward zero, with the sign: so the float MACs' products, converted by one truncating
// conversion, are the integer design's terms.  Tables (n <= 8 bits): (sign mask 0/-1, |q|) fields (a signed
// table: 0 and q mod 2^n), P = table[(|a| << n) + |b|], every entry as given (row and column 0, negative ones).

// out[l] += scale * s[l] over the VW lanes of an int32 block sum: how integer MACs reach their int64 output.
ALWAYS_INLINE void add_lanes(int64_t* out, vi s, int64_t scale) {
    int32_t part[VW];
    i_store(part, s);
    for (int l = 0; l < VW; ++l) out[l] += scale * part[l];
}

// What the integer MACs with one int32 sum per lane share: VW columns a B operand, block sums of kblock steps
// flushed to the int64 output.
struct IntSums {
    static const int SPAN = VW;
    typedef int64_t Out;
    typedef vi Sum;
    static int64_t block(const GemmArgs& g) { return g.kblock < 1 ? 1 : g.kblock; }
    ALWAYS_INLINE Sum zero() { return i_set1(0); }
    ALWAYS_INLINE void flush(Out* out, Sum s) { add_lanes(out, s, 1); }
};

// Integer MBM on the float fields of float(q) where FoldMac is missing (no AVX-512, or two correction addends):
// FloatMac's product, truncated, summed in int32.  (Integer Mitchell always runs as IntWordsMac.)
template <int KIND>
struct FloorMac : FloatMac<KIND> {
    typedef int64_t Out;
    typedef vi Sum;
    typedef typename FloatMac<KIND>::A A;
    typedef typename FloatMac<KIND>::B B;
    typedef FloatConsts Consts;
    static int64_t block(const GemmArgs& g) { return g.kblock < 1 ? 1 : g.kblock; }
    ALWAYS_INLINE Sum zero() { return i_set1(0); }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts& c) {
        return i_add(acc, i_trunc(f_mul(f_mul(a.s, b.s), significand<KIND>(i_add(a.m, b.m), c))));
    }
    ALWAYS_INLINE void flush(Out* out, Sum s) { add_lanes(out, s, 1); }
};

#if defined(__AVX512F__)
// Integer MBM with A's sign and scale folded into its word (one-addend MBM, c1 = c0 / 2; AVX-512).  A's fields:
// bits(float(a)) (sign, 2^ka and mantissa field at once), FloatConsts' corner plus A's sign and exponent bits,
// and the correction sign * 2^ka * c0 / 2^23 as a float.  A's word plus B's mantissa field is the bits of
// sign * 2^ka times FloatMac's sb, so the unsigned compare with A's corner is FloatMac's corner test and the
// masked add (toward zero at any scale) gives its corrected significand already scaled by A; one multiply by
// B's scale and the truncation give the product: six operations, as many as the float MAC.  A zero is
// folded as 2^-100 (the quantiser and the loader write it so): every product with it is below 1, truncated to 0.
struct FoldMac : IntSums {
    static const int FIELDS = 3;
    struct Consts {};
    struct A { vi m, corner; vf corr; };
    struct B { vf s; vi m; };
    static Consts consts(const GemmArgs&) { return {}; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts&) {
        return {i_set1(f[0][k]), i_set1(f[1][k]), f_set1(((const float*)f[2])[k])};
    }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) {
        return {f_load((const float*)f[0] + at), i_load(f[1] + at)};
    }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts&) {
        const vi sb = i_add(a.m, b.m);
        const vf sig = _mm512_mask_add_round_ps(as_f(sb), _mm512_cmplt_epu32_mask(sb, a.corner), as_f(sb), a.corr,
                                                _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        return i_add(acc, i_trunc(f_mul(sig, b.s)));
    }
};
#endif

// Integer Mitchell in the bit domain (every ISA): A's word bits(float(a)) - bits(1.0f), B's bits(float(b)); their
// sum is the bits of the float Mitchell product (WordsMac's rule; integer exponents never leave the normal
// range), truncated.  A zero operand has the word INT_ZERO_A or INT_ZERO_B, which make every sum it is in a float
// below 2^-28 (exponent field 47 to 98), truncated to 0: one add, one conversion, one add per product.
static const int32_t INT_ZERO_A = -(40 << 23), INT_ZERO_B = 80 << 23;

struct IntWordsMac : IntSums {
    static const int FIELDS = 1;
    struct Consts {};
    struct A { vi a; };
    struct B { vi b; };
    static Consts consts(const GemmArgs&) { return {}; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts&) { return {i_set1(f[0][k])}; }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) { return {i_load(f[0] + at)}; }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts&) {
        return i_add(acc, i_trunc(as_f(i_add(a.a, b.b))));
    }
};

// Table gathers: sign * table[(|a| << bits) + |b|].
struct TableMac : IntSums {
    static const int FIELDS = 2;
    struct Consts { const int32_t* table; int bits; };
    struct A { vi sign, row; };  // row: |a| << bits, broadcast
    struct B { vi sign, f; };
    static Consts consts(const GemmArgs& g) { return {g.table, g.bits}; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts& c) {
        return {i_set1(f[0][k]), i_set1(f[1][k] << c.bits)};
    }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) { return {i_load(f[0] + at), i_load(f[1] + at)}; }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts& c) {
        vi neg = i_xor(a.sign, b.sign);  // -1 where the signs differ
        return i_add(acc, i_sub(i_xor(i_gather(c.table, i_add(a.row, b.f)), neg), neg));
    }
};

struct RegisterTable {};  // the tag of the MACs that look tables up in registers (their Shape)

#if defined(__AVX512BW__)
// Tables of up to 8 bits whose entries fit 16 bits, looked up in registers instead of gathered: A's table row
// (256 16-bit entries, 8 vectors; rows of narrower tables padded) is read once per element of A and 32 products
// come from it at once: four vpermt2w pick entry (|b| mod 64) of each 64-entry quarter, two bits of |b| choose
// among the quarters (three blends).  B: |b| as int16 (32 per k) and what the MAC needs of its signs.
struct Pair { vi lo, hi; };  // two int32 sums: columns 0..15 and 16..31 (Table16Mac), or even and odd (MaddMac)

struct Index16 { __m512i index; __mmask32 bit6, bit7; };  // 32 columns' |b| and its bits 6 and 7

// What the register-table MACs share: two fields, 2 VW columns a B operand (one lookup), two int32 sums each,
// block sums of kblock steps flushed to the int64 output, and (Shape) a 4 x 2 NR tile.
struct Table16Sums : RegisterTable {
    static const int FIELDS = 2;
    static const int SPAN = 2 * VW;
    typedef int64_t Out;
    typedef Pair Sum;
    static int64_t block(const GemmArgs& g) { return g.kblock < 1 ? 1 : g.kblock; }
    ALWAYS_INLINE Sum zero() { return {i_set1(0), i_set1(0)}; }
};

ALWAYS_INLINE Index16 load_index16(const int16_t* at) {
    const __m512i index = _mm512_loadu_si512(at);
    return {index, _mm512_test_epi16_mask(index, _mm512_set1_epi16(64)),
            _mm512_test_epi16_mask(index, _mm512_set1_epi16(128))};
}

// The 32 entries row[index] of a 256-entry int16 table row.
ALWAYS_INLINE __m512i lookup16(const __m512i* r, const Index16& b) {
    const __m512i q0 = _mm512_permutex2var_epi16(_mm512_loadu_si512(r + 0), b.index, _mm512_loadu_si512(r + 1));
    const __m512i q1 = _mm512_permutex2var_epi16(_mm512_loadu_si512(r + 2), b.index, _mm512_loadu_si512(r + 3));
    const __m512i q2 = _mm512_permutex2var_epi16(_mm512_loadu_si512(r + 4), b.index, _mm512_loadu_si512(r + 5));
    const __m512i q3 = _mm512_permutex2var_epi16(_mm512_loadu_si512(r + 6), b.index, _mm512_loadu_si512(r + 7));
    return _mm512_mask_blend_epi16(b.bit7, _mm512_mask_blend_epi16(b.bit6, q0, q1),
                                   _mm512_mask_blend_epi16(b.bit6, q2, q3));
}

// A sign-magnitude table whose entries need all 16 bits (2^15..2^16-1: no room for a negation in int16): the
// products widen to int32 (zero-extended) and add or subtract by the signs.  B's fields: |b| (int16) and its
// int32 sign masks.
struct Table16Mac : Table16Sums {
    struct Consts { const int16_t* table; };
    struct A { const __m512i* row; __mmask32 flip; };  // flip: all ones where A is negative
    struct B { Index16 index; __mmask32 neg; };
    static Consts consts(const GemmArgs& g) { return {(const int16_t*)g.table}; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts& c) {
        return {(const __m512i*)(c.table + ((int64_t)f[1][k] << 8)), (__mmask32)(f[0][k] ? 0xFFFFFFFFu : 0u)};
    }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) {
        const __mmask16 lo = _mm512_movepi32_mask(i_load(f[1] + at)), hi = _mm512_movepi32_mask(i_load(f[1] + at + VW));
        return {load_index16((const int16_t*)f[0] + at), (__mmask32)lo | ((__mmask32)hi << 16)};
    }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts&) {
        const __m512i p = lookup16(a.row, b.index);
        const __mmask32 neg = a.flip ^ b.neg;
        const vi lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(p));
        const vi hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(p, 1));
        const __mmask16 neg_lo = (__mmask16)neg, neg_hi = (__mmask16)(neg >> 16);
        return {_mm512_mask_sub_epi32(_mm512_mask_add_epi32(acc.lo, (__mmask16)~neg_lo, acc.lo, lo), neg_lo, acc.lo, lo),
                _mm512_mask_sub_epi32(_mm512_mask_add_epi32(acc.hi, (__mmask16)~neg_hi, acc.hi, hi), neg_hi, acc.hi, hi)};
    }
    ALWAYS_INLINE void flush(Out* out, Sum s) {
        add_lanes(out, s.lo, 1);
        add_lanes(out + VW, s.hi, 1);
    }
};

// Tables whose entries fit int16 with their negations (a sign-magnitude table's entries below 2^15; a signed
// table's -2^15..2^15-1, never negated): a negative A reads its row among the negated rows (the loader appends
// them, c0 rows on: 0 for a signed table), a negative B negates its products in int16 (one masked subtract for
// 32), and one vpmaddwd per half widens them to int32 (times 1 at the even lanes and 0 at the odd, or the
// reverse: the two sums hold the even and the odd columns).  B's fields: |b| and its sign masks, as int16.
struct Table16MaddMac : Table16Sums {
    struct Consts { const int16_t* table; int32_t negated_rows; };
    struct A { const __m512i* row; };
    struct B { Index16 index; __mmask32 neg; };
    static Consts consts(const GemmArgs& g) { return {(const int16_t*)g.table, (int32_t)g.c0}; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts& c) {
        return {(const __m512i*)(c.table + ((int64_t)(f[1][k] + (f[0][k] & c.negated_rows)) << 8))};
    }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) {
        const __m512i sign = _mm512_loadu_si512((const int16_t*)f[1] + at);
        return {load_index16((const int16_t*)f[0] + at), _mm512_movepi16_mask(sign)};
    }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts&) {
        const __m512i q = lookup16(a.row, b.index);
        const __m512i p = _mm512_mask_sub_epi16(q, b.neg, _mm512_setzero_si512(), q);
        return {i_add(acc.lo, _mm512_madd_epi16(p, i_set1(1))), i_add(acc.hi, _mm512_madd_epi16(p, i_set1(1 << 16)))};
    }
    ALWAYS_INLINE void flush(Out* out, Sum s) {
        int32_t even[VW], odd[VW];
        i_store(even, s.lo);
        i_store(odd, s.hi);
        for (int l = 0; l < VW; ++l) {
            out[2 * l] += even[l];
            out[2 * l + 1] += odd[l];
        }
    }
};
#endif

// A MAC's tile: MR rows x NR columns; a register table's is 4 x 2 NR (a table row, read once per element of A,
// then serves 64 columns: half the row reads per product; 16 int32 sums still fit the registers).
template <class M>
struct Shape {
    static const bool table = std::is_base_of<RegisterTable, M>::value;
    static const int rows = table ? 4 : MR, cols = table ? 2 * NR : NR;
};

// DRUM-k (SPEC 6): every operand comes as one int32 field, its reduced value with the sign, sign * A' (prepared
// once per operand), so a product is one exact multiply.  With SPLIT = 0 (up to 12 bits: products below 2^24)
// the products sum in one int32 block.  Wider operands (products below 2^32) are split on the A side,
// A = 2^SPLIT * hi + lo with lo in [0, 2^SPLIT): two int32 sums, of hi * B and of lo * B (each term below 2^24
// for 16 bits and SPLIT = 8), recombined in int64 at the flush.  The loader passes SPLIT in c0.
struct SplitSum { vi hi, lo; };

template <int SPLIT>
struct DrumMac {
    static const int FIELDS = 1;
    static const int SPAN = VW;
    typedef int64_t Out;
    typedef typename std::conditional<SPLIT != 0, SplitSum, vi>::type Sum;
    struct Consts {};
    struct A { vi hi, lo; };  // hi unused without a split
    struct B { vi b; };
    static Consts consts(const GemmArgs&) { return {}; }
    static int64_t block(const GemmArgs& g) { return g.kblock < 1 ? 1 : g.kblock; }
    ALWAYS_INLINE A load_a(const int32_t* const* f, int64_t k, const Consts&) {
        const int32_t a = f[0][k];
        if (SPLIT) return {i_set1(a >> SPLIT), i_set1(a & ((1 << SPLIT) - 1))};  // an arithmetic shift: floor
        return {i_set1(0), i_set1(a)};
    }
    ALWAYS_INLINE B load_b(const int32_t* const* f, int64_t at) { return {i_load(f[0] + at)}; }
    ALWAYS_INLINE Sum zero() {
        if constexpr (SPLIT != 0) return {i_set1(0), i_set1(0)};
        else return i_set1(0);
    }
    ALWAYS_INLINE Sum mac(Sum acc, const A& a, const B& b, const Consts&) {
        if constexpr (SPLIT != 0) return {i_add(acc.hi, i_mul(a.hi, b.b)), i_add(acc.lo, i_mul(a.lo, b.b))};
        else return i_add(acc, i_mul(a.lo, b.b));
    }
    ALWAYS_INLINE void flush(Out* out, Sum s) {
        if constexpr (SPLIT != 0) {
            add_lanes(out, s.hi, (int64_t)1 << SPLIT);
            add_lanes(out, s.lo, 1);
        } else {
            add_lanes(out, s, 1);
        }
    }
};

// ----------------------------------------------------------------------------- the one tile routine

// One sum into output element ``at``: as it is (float32, or an int64 integer sum), or, for an integer MAC given
// out_scale, as float32 sum * scale rounded once from float64 (the quantised layers' dequantisation, the same
// rounding as (float64 sum * float64 scale).float()).
template <class M>
ALWAYS_INLINE void put(const GemmArgs& g, int64_t at, typename M::Out v, const double* scale, int n) {
    if (std::is_same<typename M::Out, int64_t>::value && scale != nullptr)
        ((float*)g.out)[at] = (float)((double)v * scale[n]);
    else
        ((typename M::Out*)g.out)[at] = v;
}

// A tile's sums (rows m0.., columns n0.. of group grp) into the output: (G, M, Np) row-major, or where
// GemmArgs.out_row maps them (no padded columns there; columns outer, so a column's rows are stored together).
template <class M, int ROWS>
static void store(const GemmArgs& g, int64_t grp, int64_t m0, int64_t n0, const double* scale,
                  const typename M::Out (&acc)[ROWS][Shape<M>::cols]) {
    constexpr int NC = Shape<M>::cols;
    if (g.out_row == nullptr) {
        const int64_t at = (grp * g.M + m0) * g.Np + n0;
        for (int i = 0; i < ROWS; ++i)
            for (int n = 0; n < NC; ++n) put<M>(g, at + i * g.Np + n, acc[i][n], scale, n);
        return;
    }
    const int cols = g.N - n0 < NC ? (int)(g.N - n0) : NC;
    const int64_t base = grp * g.out_group + n0 * g.out_col;
    for (int n = 0; n < cols; ++n)
        for (int i = 0; i < ROWS; ++i) put<M>(g, base + g.out_row[m0 + i] + n * g.out_col, acc[i][n], scale, n);
}

// One ROWS x cols tile (ROWS <= Shape<M>::rows) of rows m0.. of group grp's A (at a0) against B's panels at
// ``panel`` (columns n0..); ``scale``: its columns' out_scale, or null.
template <class M, int ROWS>
static void tile(const GemmArgs& g, int64_t a0, int64_t m0, const int32_t* const* panel, int64_t grp, int64_t n0,
                 const double* scale, const typename M::Consts& c) {
    const int64_t K = g.K, step = M::block(g);
    constexpr int NC = Shape<M>::cols, NB = NC / M::SPAN;  // B operands per k (each covers SPAN columns)
    const int64_t* a_col = g.a_col;
    const int32_t* rows[ROWS][3];
    for (int i = 0; i < ROWS; ++i)
        for (int f = 0; f < M::FIELDS; ++f) rows[i][f] = (const int32_t*)g.a[f] + a0 + g.a_row[m0 + i];
    typename M::Out acc[ROWS][NC] = {};
    for (int64_t k0 = 0; k0 < K; k0 += step) {
        const int64_t k1 = k0 + step < K ? k0 + step : K;
        typename M::Sum sum[ROWS][NB];
        for (int i = 0; i < ROWS; ++i)
            for (int j = 0; j < NB; ++j) sum[i][j] = M::zero();
        for (int64_t k = k0; k < k1; ++k) {
            typename M::B b[NB];
            for (int j = 0; j < NB; ++j) b[j] = M::load_b(panel, k * NC + j * M::SPAN);
            const int64_t kc = a_col[k];
            for (int i = 0; i < ROWS; ++i) {
                const typename M::A a = M::load_a(rows[i], kc, c);
                for (int j = 0; j < NB; ++j) sum[i][j] = M::mac(sum[i][j], a, b[j], c);
            }
        }
        for (int i = 0; i < ROWS; ++i)
            for (int j = 0; j < NB; ++j) M::flush(&acc[i][j * M::SPAN], sum[i][j]);
    }
    store<M, ROWS>(g, grp, m0, n0, scale, acc);
}

// A tile of the given number of rows (the last row tile may be short).
template <class M>
static void tile_rows(int rows, const GemmArgs& g, int64_t a0, int64_t m0, const int32_t* const* panel, int64_t grp,
                      int64_t n0, const double* scale, const typename M::Consts& c) {
    constexpr int full = Shape<M>::rows;
    if (rows >= full) return tile<M, full>(g, a0, m0, panel, grp, n0, scale, c);
    switch (rows) {
        case 1: tile<M, 1>(g, a0, m0, panel, grp, n0, scale, c); break;
        case 2: tile<M, 2 < full ? 2 : 1>(g, a0, m0, panel, grp, n0, scale, c); break;
        case 3: tile<M, 3 < full ? 3 : 1>(g, a0, m0, panel, grp, n0, scale, c); break;
        case 4: tile<M, 4 < full ? 4 : 1>(g, a0, m0, panel, grp, n0, scale, c); break;
        default: tile<M, 5 < full ? 5 : 1>(g, a0, m0, panel, grp, n0, scale, c);
    }
}

// Bytes of an element of B's field f: 4 (int32 or float), but the register tables' indices are int16, and so
// are Table16MaddMac's sign masks.
template <class M>
static inline int64_t b_bytes(int) { return 4; }
#if defined(__AVX512BW__)
template <>
inline int64_t b_bytes<Table16Mac>(int f) { return f == 0 ? 2 : 4; }
template <>
inline int64_t b_bytes<Table16MaddMac>(int) { return 2; }
#endif

// Tiles [begin, end) of G x (Np / cols) x ceil(M / rows) (the MAC's Shape), row tiles innermost so a B panel is reused.
template <class M>
static void run_tiles(const GemmArgs& g, int64_t begin, int64_t end, int threads) {
    const typename M::Consts c = M::consts(g);
    const int64_t R = Shape<M>::rows, C = Shape<M>::cols, mt = (g.M + R - 1) / R, nt = g.Np / C;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t t = begin; t < end; ++t) {
        int64_t m = t % mt, n = (t / mt) % nt, grp = t / (mt * nt);
        int rows = (int)(g.M - m * R < R ? g.M - m * R : R);
        int64_t b0 = (grp * nt + n) * g.K * C;
        const int32_t* panel[3];
        for (int f = 0; f < M::FIELDS; ++f) panel[f] = (const int32_t*)((const char*)g.b[f] + b0 * b_bytes<M>(f));
        const double* scale = g.out_scale ? g.out_scale + grp * g.Np + n * C : nullptr;
        tile_rows<M>(rows, g, grp * g.a_group, m * R, panel, grp, n * C, scale, c);
    }
}

// ----------------------------------------------------------------------------- float operands split in one pass

// mbmlib.multipliers.floating.split_operand of n floats in one pass: the scale's bits (sign and exponent; +-0 for
// zeros and subnormals, x itself for NaN) and the 23-bit mantissa field, truncated for t > 0 (its top 23 - t bits
// kept, the lowest forced to 1).
extern "C" void mbm_split(const float* x, int64_t n, int32_t t, int32_t* scale, int32_t* mant, int threads) {
    const uint32_t keep = t > 0 ? ~((1u << t) - 1) : ~0u, force = t > 0 ? 1u << t : 0u;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        std::memcpy(&bits, x + i, sizeof bits);
        const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
        scale[i] = (int32_t)(nan ? bits : bits & 0xFF800000u);
        mant[i] = (int32_t)(((bits & 0x007FFFFFu) & keep) | force);
    }
}

// ----------------------------------------------------------------------------- quantisation into operand fields

// What mbm_quantise writes: float(q) split (Q_FLOAT: FloorMac's A, the B of FoldMac and FloorMac), IntWordsMac's
// A word (Q_WORDS) or B word (Q_WORDS_B), a table's sign mask and |q| (Q_TABLE) or 0 and q mod 2^param
// (Q_SIGNED_TABLE), DRUM-param's signed reduced operand (Q_DRUM), FoldMac's A fields for MBM's correction
// c0 = param (Q_FOLD).
enum QuantFields { Q_FLOAT = 0, Q_WORDS = 1, Q_TABLE = 2, Q_SIGNED_TABLE = 3, Q_DRUM = 4, Q_FOLD = 5, Q_WORDS_B = 6 };
static const float FOLDED_ZERO = 0x1p-100f;  // FoldMac's stand-in for the operand 0

// The fields of one quantised value q (an integer-valued float, maybe -0.0) at f0[i] (and f1[i]).
template <int KIND>
static inline void write_fields(float q, int32_t param, int32_t* f0, int32_t* f1, int32_t* f2, int64_t i) {
    uint32_t bits;
    std::memcpy(&bits, &q, sizeof bits);
    const int32_t iq = (int32_t)q, mag = iq < 0 ? -iq : iq;
    if (KIND == Q_FOLD) {
        const float v = q == 0.0f ? FOLDED_ZERO : q;
        std::memcpy(&bits, &v, sizeof bits);
        const uint32_t sign_exp = bits & 0xFF800000u;
        float scale;
        std::memcpy(&scale, &sign_exp, sizeof scale);
        const float corr = scale * ((float)param / (float)ONE);
        f0[i] = (int32_t)bits;
        f1[i] = (int32_t)(sign_exp + 2u * ONE - (uint32_t)(param / 2));
        std::memcpy(f2 + i, &corr, sizeof corr);
    } else if (KIND == Q_FLOAT) {
        f0[i] = q == 0.0f ? 0 : (int32_t)(bits & 0xFF800000u);  // -0.0 (rint of a small negative) is the integer 0
        f1[i] = (int32_t)(bits & 0x007FFFFFu);
    } else if (KIND == Q_WORDS) {
        f0[i] = q == 0.0f ? INT_ZERO_A : (int32_t)(bits - (uint32_t)ONE_BITS);
    } else if (KIND == Q_WORDS_B) {
        f0[i] = q == 0.0f ? INT_ZERO_B : (int32_t)bits;
    } else if (KIND == Q_TABLE) {
        f0[i] = -(int32_t)(iq < 0);
        f1[i] = mag;
    } else if (KIND == Q_SIGNED_TABLE) {
        f0[i] = 0;
        f1[i] = iq & ((1 << param) - 1);
    } else {  // Q_DRUM: below 2^k as it is, else its k bits from the leading one, the lowest forced to 1
        const int s = mag < (1 << param) ? 0 : 32 - __builtin_clz((uint32_t)mag) - param;
        const int32_t reduced = s ? ((mag >> s) | 1) << s : mag;
        f0[i] = iq < 0 ? -reduced : reduced;
    }
}

// q = clamp(rint(x / scale), lo, hi) (half to even; NaN -> 0) for x[begin, end), then its fields at the same
// indices; returns how many x were not finite.  The same q as mbmlib.quant.quantise, with no integer tensor and
// no second pass between.
template <int KIND>
static int64_t quantise_span(const float* x, int64_t begin, int64_t end, float scale, int32_t lo, int32_t hi,
                             int32_t param, int32_t* f0, int32_t* f1, int32_t* f2) {
    int64_t bad = 0;
    const float flo = (float)lo, fhi = (float)hi;
    for (int64_t i = begin; i < end; ++i) {
        const float v = x[i];
        bad += !__builtin_isfinite(v);
        float q = __builtin_rintf(v / scale);
        q = q < flo ? flo : q;
        q = q > fhi ? fhi : q;
        write_fields<KIND>(q == q ? q : 0.0f, param, f0, f1, f2, i);
    }
    return bad;
}

// quantise_span over ``rows`` rows of ``len`` floats, row r with the scale scales[r] (every row scales[0] when
// one_scale), its count of non-finite x in bad[r].  Threads split the rows, or one row's elements.
template <int KIND>
static void quantise_rows(const float* x, int64_t rows, int64_t len, const float* scales, bool one_scale, int32_t lo,
                          int32_t hi, int32_t param, int32_t* f0, int32_t* f1, int32_t* f2, int64_t* bad,
                          int threads) {
    if (rows == 1) {
        int64_t count = 0;
        const int64_t chunk = (len + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : count) if (threads > 1)
        for (int t = 0; t < threads; ++t)
            count += quantise_span<KIND>(x, t * chunk, std::min(len, (t + 1) * chunk), scales[0], lo, hi, param, f0,
                                         f1, f2);
        bad[0] = count;
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r)
        bad[r] = quantise_span<KIND>(x, r * len, (r + 1) * len, scales[one_scale ? 0 : r], lo, hi, param, f0, f1, f2);
}

extern "C" {

int mbm_isa() { return ISA; }

// The words of n operands for WordsMac (bits(scale) + mant - bias mod 2^32; -bias for a zero scale) and
// the smallest and largest biased exponent of their nonzero scales in range[0], range[1] (256 and -1 if
// every scale is zero; 255 for an infinity or NaN), in one pass.
void mbm_mitchell_words(const float* scale, const int32_t* mant, int32_t* out, int64_t n, int32_t bias,
                        int32_t* range, int threads) {
    int32_t lo = 256, hi = -1;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(min : lo) reduction(max : hi) if (threads > 1)
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        std::memcpy(&bits, scale + i, sizeof bits);
        int32_t e = (int32_t)((bits >> 23) & 0xFF);
        out[i] = e ? (int32_t)(bits + (uint32_t)mant[i] - (uint32_t)bias) : -bias;
        if (e) {
            lo = e < lo ? e : lo;
            hi = e > hi ? e : hi;
        }
    }
    range[0] = lo;
    range[1] = hi;
}
#if defined(__AVX512F__)
int mbm_has_words() { return 1; }  // whether mbm_gemm takes F_MITCHELL_WORDS (and I_MBM_FOLD)
#else
int mbm_has_words() { return 0; }
#endif
int mbm_has_openmp() { return HAS_OPENMP; }

// The constants the Python loader mirrors (cpu_native.MACS, cpu_native_int's QuantFields kinds, zero operands),
// as "NAME=value" words: its tests compare the mirror with them.
const char* mbm_constants() {
    static char text[512];
    uint32_t folded_zero;
    std::memcpy(&folded_zero, &FOLDED_ZERO, sizeof folded_zero);
    std::snprintf(text, sizeof text,
                  "F_MITCHELL=%d F_MBM=%d F_MITCHELL_WORDS=%d I_MBM=%d I_TABLE=%d F_LMUL=%d I_DRUM=%d "
                  "I_MITCHELL_WORDS=%d I_TABLE16=%d I_MBM_FOLD=%d I_TABLE16_MADD=%d Q_FLOAT=%d Q_WORDS=%d "
                  "Q_TABLE=%d Q_SIGNED_TABLE=%d Q_DRUM=%d Q_FOLD=%d Q_WORDS_B=%d INT_ZERO_A=%d INT_ZERO_B=%d "
                  "FOLDED_ZERO_BITS=%u",
                  F_MITCHELL, F_MBM, F_MITCHELL_WORDS, I_MBM, I_TABLE, F_LMUL, I_DRUM, I_MITCHELL_WORDS, I_TABLE16,
                  I_MBM_FOLD, I_TABLE16_MADD, Q_FLOAT, Q_WORDS, Q_TABLE, Q_SIGNED_TABLE, Q_DRUM, Q_FOLD, Q_WORDS_B,
                  INT_ZERO_A, INT_ZERO_B, folded_zero);
    return text;
}
#if defined(__AVX512BW__)
int mbm_has_table16() { return 1; }  // whether mbm_gemm takes I_TABLE16
#else
int mbm_has_table16() { return 0; }
#endif

// mbm_quantise: quantise_rows for the fields ``kind`` (QuantFields); the scales are read here (the caller's scale
// tensor, no device synchronisation to fetch it).  Returns 0, or -1 for an unknown kind.
int mbm_quantise(const float* x, int64_t rows, int64_t len, const float* scales, int32_t one_scale, int32_t lo,
                 int32_t hi, int32_t kind, int32_t param, int32_t* f0, int32_t* f1, int32_t* f2, int64_t* bad,
                 int threads) {
#define MBM_QUANTISE(K) quantise_rows<K>(x, rows, len, scales, one_scale != 0, lo, hi, param, f0, f1, f2, bad, threads)
    switch (kind) {
        case Q_FLOAT: MBM_QUANTISE(Q_FLOAT); return 0;
        case Q_WORDS: MBM_QUANTISE(Q_WORDS); return 0;
        case Q_WORDS_B: MBM_QUANTISE(Q_WORDS_B); return 0;
        case Q_TABLE: MBM_QUANTISE(Q_TABLE); return 0;
        case Q_SIGNED_TABLE: MBM_QUANTISE(Q_SIGNED_TABLE); return 0;
        case Q_DRUM: MBM_QUANTISE(Q_DRUM); return 0;
        case Q_FOLD: MBM_QUANTISE(Q_FOLD); return 0;
        default: return -1;
    }
#undef MBM_QUANTISE
}
// The tile (rows, columns) of the MAC ``mac`` (its Shape): B's panels are that many columns wide.
static void mac_shape(int mac, int64_t* rows, int64_t* cols) {
#if defined(__AVX512BW__)
    if (mac == I_TABLE16 || mac == I_TABLE16_MADD) {
        *rows = Shape<Table16Mac>::rows;
        *cols = Shape<Table16Mac>::cols;
        return;
    }
#endif
    (void)mac;
    *rows = MR;
    *cols = NR;
}

int64_t mbm_tile_cols(int mac) {
    int64_t rows, cols;
    mac_shape(mac, &rows, &cols);
    return cols;
}
int64_t mbm_args_size() { return (int64_t)sizeof(GemmArgs); }  // the loader checks its ctypes mirror against it

// Number of tiles of the MAC ``mac`` for M rows and Np columns per group.
int64_t mbm_tiles(int mac, int64_t M, int64_t Np) {
    int64_t rows, cols;
    mac_shape(mac, &rows, &cols);
    return ((M + rows - 1) / rows) * (Np / cols);
}

// Tiles [begin, end) of the GEMM ``g`` describes, by its MAC; with OpenMP, ``threads`` split the range.
// Returns 0, or -1 for a MAC this build does not have.
int mbm_gemm(const GemmArgs* g, int64_t begin, int64_t end, int threads) {
    switch (g->mac) {
        case F_MITCHELL: run_tiles<FloatMac<MITCHELL>>(*g, begin, end, threads); return 0;
        case F_MBM:
            if (2 * g->c1 == g->c0) run_tiles<FloatMac<MBM_ONE_ADDEND>>(*g, begin, end, threads);
            else run_tiles<FloatMac<MBM>>(*g, begin, end, threads);
            return 0;
#if defined(__AVX512F__)
        case F_MITCHELL_WORDS: run_tiles<WordsMac>(*g, begin, end, threads); return 0;
#endif
        case I_MBM:
            if (2 * g->c1 == g->c0) run_tiles<FloorMac<MBM_ONE_ADDEND>>(*g, begin, end, threads);
            else run_tiles<FloorMac<MBM>>(*g, begin, end, threads);
            return 0;
        case I_MITCHELL_WORDS: run_tiles<IntWordsMac>(*g, begin, end, threads); return 0;
        case I_TABLE: run_tiles<TableMac>(*g, begin, end, threads); return 0;
#if defined(__AVX512BW__)
        case I_TABLE16: run_tiles<Table16Mac>(*g, begin, end, threads); return 0;
        case I_TABLE16_MADD: run_tiles<Table16MaddMac>(*g, begin, end, threads); return 0;
#endif
#if defined(__AVX512F__)
        case I_MBM_FOLD: run_tiles<FoldMac>(*g, begin, end, threads); return 0;
#endif
        case F_LMUL: run_tiles<FloatMac<LMUL>>(*g, begin, end, threads); return 0;
        case I_DRUM:
            if (g->c0 == 0) run_tiles<DrumMac<0>>(*g, begin, end, threads);
            else if (g->c0 == 8) run_tiles<DrumMac<8>>(*g, begin, end, threads);
            else return -1;
            return 0;
        default: return -1;
    }
}

}  // extern "C"

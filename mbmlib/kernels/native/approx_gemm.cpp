// Register-blocked bit-exact approximate GEMM (MBM / Mitchell, SPEC section 1) for the CPU.
//
// out[g, m, n] = sum_k (sa[m,k] * sb[k,n]) * (G(ma[m,k] + mb[k,n]) * 2^-23), float32 sums.
// Each call computes a range of tiles; a tile is MR rows x NR columns of outputs held in registers.
// For every k it broadcasts MR values of A and loads one NR-wide vector of B (packed K-major per
// column panel, so the load is contiguous), with no horizontal reduction.  The product is formed in
// the same order as mbmlib.multipliers.products(flush=False); build with -ffp-contract=off.
// The instruction set is chosen at build time (-mavx512f / -mavx2 / none) by the Python loader.
#include <cstdint>
#include <cstring>
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
static inline vi i_shr1(vi a) { return _mm512_srai_epi32(a, 1); }
// where(x >= y, p, q) and where(x < y, p, q) on int32 lanes
static inline vi i_sel_ge(vi x, vi y, vi p, vi q) { return _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(x, y), q, p); }
static inline vi i_sel_lt(vi x, vi y, vi p, vi q) { return _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(x, y), q, p); }
static inline vf as_f(vi a) { return _mm512_castsi512_ps(a); }
static inline vi i_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static inline vi i_xor(vi a, vi b) { return _mm512_xor_si512(a, b); }
static inline vi i_andnot(vi a, vi b) { return _mm512_andnot_si512(a, b); }  // ~a & b
static inline vi i_shl1(vi a) { return _mm512_slli_epi32(a, 1); }
static inline vi i_shr24(vi a) { return _mm512_srli_epi32(a, 24); }
static inline vi i_shrv(vi a, vi n) { return _mm512_srlv_epi32(a, n); }  // 0 where n > 31
static inline vi i_gather(const int32_t* t, vi idx) { return _mm512_i32gather_epi32(idx, t, 4); }
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
static inline vi i_shr1(vi a) { return _mm256_srai_epi32(a, 1); }
static inline vi i_sel_lt(vi x, vi y, vi p, vi q) { return _mm256_blendv_epi8(q, p, _mm256_cmpgt_epi32(y, x)); }
static inline vi i_sel_ge(vi x, vi y, vi p, vi q) { return _mm256_blendv_epi8(p, q, _mm256_cmpgt_epi32(y, x)); }
static inline vf as_f(vi a) { return _mm256_castsi256_ps(a); }
static inline vi i_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
static inline vi i_xor(vi a, vi b) { return _mm256_xor_si256(a, b); }
static inline vi i_andnot(vi a, vi b) { return _mm256_andnot_si256(a, b); }  // ~a & b
static inline vi i_shl1(vi a) { return _mm256_slli_epi32(a, 1); }
static inline vi i_shr24(vi a) { return _mm256_srli_epi32(a, 24); }
static inline vi i_shrv(vi a, vi n) { return _mm256_srlv_epi32(a, n); }  // 0 where n > 31
static inline vi i_gather(const int32_t* t, vi idx) { return _mm256_i32gather_epi32(t, idx, 4); }
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
static inline vi i_shr1(vi a) { LANES(vi, a.v[l] >> 1); }
static inline vi i_sel_ge(vi x, vi y, vi p, vi q) { LANES(vi, x.v[l] >= y.v[l] ? p.v[l] : q.v[l]); }
static inline vi i_sel_lt(vi x, vi y, vi p, vi q) { LANES(vi, x.v[l] < y.v[l] ? p.v[l] : q.v[l]); }
static inline vf as_f(vi a) { vf r; std::memcpy(r.v, a.v, sizeof r.v); return r; }
static inline vi i_sub(vi a, vi b) { LANES(vi, a.v[l] - b.v[l]); }
static inline vi i_xor(vi a, vi b) { LANES(vi, a.v[l] ^ b.v[l]); }
static inline vi i_andnot(vi a, vi b) { LANES(vi, ~a.v[l] & b.v[l]); }
static inline vi i_shl1(vi a) { LANES(vi, (int32_t)((uint32_t)a.v[l] << 1)); }
static inline vi i_shr24(vi a) { LANES(vi, (int32_t)((uint32_t)a.v[l] >> 24)); }
static inline vi i_shrv(vi a, vi n) { LANES(vi, (uint32_t)n.v[l] > 31 ? 0 : (int32_t)((uint32_t)a.v[l] >> n.v[l])); }
static inline vi i_gather(const int32_t* t, vi idx) { LANES(vi, t[idx.v[l]]); }
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

struct Consts {
    vi two, four, corner, half, c0, c1;  // bits of 2.0f, 4.0f, 4.0f - c1; 0x20000000 (see g0); corrections
    vf c0f, c1f;                         // corrections as float addends (no carry / carry)
};

// What a kernel computes: Mitchell, MBM, or MBM whose correction is the same float addend with and
// without a carry (c1 = c0 / 2, true for t <= 16: 1 + x1 + x2 + c and 2 * (x1 + x2 + c/2) both add c).
// MITCHELL_WORDS: Mitchell in the bit domain, for calls whose products are all normal floats (see
// words_tile); AVX-512 only.
enum Kind { MITCHELL = 0, MBM = 1, MBM_ONE_ADDEND = 2, MITCHELL_WORDS = 3 };

// The significand G * 2^-23 of a product as a float, from the bits sb = mant_a + mant_b + ONE_BITS
// (mantissa_product in floating.py).  As a float, sb is 1 + x1 + x2 below a carry and 2 * (x1 + x2)
// after one: exactly Mitchell's significand.  MBM adds the correction (halved after a carry),
// truncating the normalisation, and skips it in the corner case (carry and a sum >= 2).
template <int KIND>
static inline vf significand(vi sb, const Consts& c) {
    if (KIND == MITCHELL) return as_f(sb);
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

// Where the A operand's elements are: (m, k) at offset row[m] + col[k] (plus a per-group offset).
// A plain row-major A has row[m] = m * K, col[k] = k; im2col patches read straight from a padded
// channels-last image have row[m] = the patch's corner, col[k] = the (kh, kw, channel) offset.
struct AOperand {
    const float* s;
    const int32_t* m;
    const int64_t* row;
    const int64_t* col;
};

// One ROWS x NR tile (ROWS <= MR) of rows m0.. of A (offset a0) against a packed B panel (K, NR).
template <int KIND, int ROWS>
static void tile(const AOperand& a, int64_t a0, int64_t m0, const float* sb, const int32_t* mb, float* out,
                 int64_t K, int64_t ldo, const Consts& c) {
    const float* as_row[ROWS];
    const int32_t* am_row[ROWS];
    for (int i = 0; i < ROWS; ++i) {
        as_row[i] = a.s + a0 + a.row[m0 + i];
        am_row[i] = a.m + a0 + a.row[m0 + i];
    }
    vf acc[ROWS][NV];
    for (int i = 0; i < ROWS; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = f_zero();
    for (int64_t k = 0; k < K; ++k) {
        vf bs[NV];
        vi bm[NV];
        for (int j = 0; j < NV; ++j) {
            bs[j] = f_load(sb + k * NR + j * VW);
            bm[j] = i_load(mb + k * NR + j * VW);
        }
        int64_t kc = a.col[k];
        for (int i = 0; i < ROWS; ++i) {
            vf as = f_set1(as_row[i][kc]);
            vi am = i_set1(am_row[i][kc] + ONE_BITS);
            for (int j = 0; j < NV; ++j) {
                vf g = significand<KIND>(i_add(am, bm[j]), c);
                acc[i][j] = f_add(acc[i][j], f_mul(f_mul(as, bs[j]), g));
            }
        }
    }
    for (int i = 0; i < ROWS; ++i)
        for (int j = 0; j < NV; ++j) f_store(out + i * ldo + j * VW, acc[i][j]);
}

#if defined(__AVX512F__)
// Mitchell in the bit domain: where scale_a * scale_b * G * 2^-23 is a normal float (the caller checks it
// for every pair of nonzero operands), its bits are bits(a) + bits(b) - bits(1.0f) of the (truncated)
// operands: the signs add mod 2 in bit 31, the mantissa sum's carry is Mitchell's normalisation.  The
// caller passes words: A's bits minus bits(1.0f), or ZERO_WORD for a zero; B's bits, or 0 for a zero.
// A zero's lanes are left out (adding +-0 to a sum that starts at +0 never changes it).  Per product:
// one masked compare, one integer add, one masked float add; same sums, same k order, as tile().
static const int32_t ZERO_WORD = -ONE_BITS;  // no nonzero operand's word: its float exponent would be 0

template <int ROWS>
static void words_tile(const int32_t* aw, const int64_t* a_row, const int64_t* a_col, int64_t a0, int64_t m0,
                       const int32_t* bw, float* out, int64_t K, int64_t ldo) {
    const int32_t* rows[ROWS];
    for (int i = 0; i < ROWS; ++i) rows[i] = aw + a0 + a_row[m0 + i];
    vf acc[ROWS][NV];
    for (int i = 0; i < ROWS; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = f_zero();
    const vi zero_word = i_set1(ZERO_WORD);
    for (int64_t k = 0; k < K; ++k) {
        vi b[NV];
        __mmask16 b_nonzero[NV];
        for (int j = 0; j < NV; ++j) {
            b[j] = i_load(bw + k * NR + j * VW);
            b_nonzero[j] = _mm512_test_epi32_mask(b[j], b[j]);
        }
        int64_t kc = a_col[k];
        for (int i = 0; i < ROWS; ++i) {
            vi a = i_set1(rows[i][kc]);
            for (int j = 0; j < NV; ++j) {
                __mmask16 keep = _mm512_mask_cmpneq_epi32_mask(b_nonzero[j], a, zero_word);
                acc[i][j] = _mm512_mask_add_ps(acc[i][j], keep, acc[i][j], as_f(i_add(a, b[j])));
            }
        }
    }
    for (int i = 0; i < ROWS; ++i)
        for (int j = 0; j < NV; ++j) f_store(out + i * ldo + j * VW, acc[i][j]);
}

static void words_tile_rows(int rows, const int32_t* aw, const int64_t* a_row, const int64_t* a_col, int64_t a0,
                            int64_t m0, const int32_t* bw, float* out, int64_t K, int64_t ldo) {
    switch (rows) {
        case 1: words_tile<1>(aw, a_row, a_col, a0, m0, bw, out, K, ldo); break;
        case 2: words_tile<2>(aw, a_row, a_col, a0, m0, bw, out, K, ldo); break;
        case 3: words_tile<3>(aw, a_row, a_col, a0, m0, bw, out, K, ldo); break;
        case 4: words_tile<4>(aw, a_row, a_col, a0, m0, bw, out, K, ldo); break;
        case 5: words_tile<5>(aw, a_row, a_col, a0, m0, bw, out, K, ldo); break;
        default: words_tile<MR>(aw, a_row, a_col, a0, m0, bw, out, K, ldo);
    }
}
#endif

// A tile of the given number of rows (the last row tile may be short).
template <int KIND>
static void tile_rows(int rows, const AOperand& a, int64_t a0, int64_t m0, const float* sb, const int32_t* mb,
                      float* out, int64_t K, int64_t ldo, const Consts& c) {
    switch (rows) {
        case 1: tile<KIND, 1>(a, a0, m0, sb, mb, out, K, ldo, c); break;
        case 2: tile<KIND, 2>(a, a0, m0, sb, mb, out, K, ldo, c); break;
        case 3: tile<KIND, 3>(a, a0, m0, sb, mb, out, K, ldo, c); break;
#if MR > 4
        case 4: tile<KIND, 4>(a, a0, m0, sb, mb, out, K, ldo, c); break;
        case 5: tile<KIND, 5>(a, a0, m0, sb, mb, out, K, ldo, c); break;
#endif
        default: tile<KIND, MR>(a, a0, m0, sb, mb, out, K, ldo, c);
    }
}

// ----------------------------------------------------------------------------- integer multipliers (SPEC 4)
//
// out[g, m, n] = sum_k sign * P(|a[m,k]|, |b[k,n]|), exact int64 sums.  Every operand comes as three int32
// fields: a sign mask (0 or -1), f and h.  Formula designs (n <= 12 bits): f = k + 1 for |q| = 2^k (1 + x)
// (-64 for q = 0, which shifts the product out), h = the 23-bit mantissa field of float(|q|); then
// P = G >> (25 - f_a - f_b), G the significand of mantissa_product (floating.py) in integer form.
// Tables (n <= 8 bits): f = |q|, P = table[(f_a << n) + f_b] from a table whose row and column 0 are 0.
// Products are summed in int32 for ``kblock`` steps at a time (kblock * max |P| < 2^31), then in int64.
enum IntKind { INT_MITCHELL = 0, INT_MBM = 1, INT_TABLE = 2 };

struct IntConsts {
    vi one, one_c0, two_one, c1;  // ONE; ONE + c0; 2 * ONE; c1 (mantissa_product's constants)
    const int32_t* table;
    int bits;
    int64_t kblock;
};

template <int KIND>
static inline vi int_magnitude(int32_t fa, int32_t ha, vi fb, vi hb, vi shift_base, const IntConsts& c) {
    if (KIND == INT_TABLE) return i_gather(c.table, i_add(i_set1(fa << c.bits), fb));
    vi s = i_add(i_set1(ha), hb);  // mant_a + mant_b
    vi g;
    if (KIND == INT_MITCHELL) {
        g = i_sel_ge(s, c.one, i_shl1(s), i_add(s, c.one));
    } else {
        vi m0 = i_add(s, c.one_c0);        // no carry: 1 + x1 + x2 + c, maybe >= 2
        vi g0 = i_andnot(i_shr24(m0), m0);  // >= 2: drop the bit the normalising shift truncates
        vi t1 = i_add(s, c.c1);            // carry: 2 * (x1 + x2 + c/2); corner case: skip the correction
        g = i_sel_ge(s, c.one, i_shl1(i_sel_lt(t1, c.two_one, t1, s)), g0);
    }
    return i_shrv(g, i_sub(shift_base, fb));  // shift_base = 25 - f_a
}

// The A operand of an integer GEMM: three int32 fields, (m, k) at offset row[m] + col[k] (see AOperand).
struct IntAOperand {
    const int32_t* f[3];
    const int64_t* row;
    const int64_t* col;
};

template <int KIND, int ROWS>
static void int_tile(const IntAOperand& a, int64_t a0, int64_t m0, int64_t K, const int32_t* const* b, int64_t* out,
                     int64_t ldo, const IntConsts& c) {
    const int32_t* rows[3][ROWS];
    for (int f = 0; f < 3; ++f)
        for (int i = 0; i < ROWS; ++i) rows[f][i] = a.f[f] + a0 + a.row[m0 + i];
    int64_t acc[ROWS][NR] = {};
    int32_t part[VW];
    for (int64_t k0 = 0; k0 < K; k0 += c.kblock) {
        int64_t k1 = k0 + c.kblock < K ? k0 + c.kblock : K;
        vi sum[ROWS][NV];
        for (int i = 0; i < ROWS; ++i)
            for (int j = 0; j < NV; ++j) sum[i][j] = i_set1(0);
        for (int64_t k = k0; k < k1; ++k) {
            vi bsg[NV], bf[NV], bh[NV];
            for (int j = 0; j < NV; ++j) {
                bsg[j] = i_load(b[0] + k * NR + j * VW);
                bf[j] = i_load(b[1] + k * NR + j * VW);
                bh[j] = i_load(b[2] + k * NR + j * VW);
            }
            int64_t kc = a.col[k];
            for (int i = 0; i < ROWS; ++i) {
                int32_t fa = rows[1][i][kc], ha = rows[2][i][kc];
                vi asg = i_set1(rows[0][i][kc]), shift_base = i_set1(25 - fa);
                for (int j = 0; j < NV; ++j) {
                    vi p = int_magnitude<KIND>(fa, ha, bf[j], bh[j], shift_base, c);
                    vi neg = i_xor(asg, bsg[j]);  // -1 where the signs differ
                    sum[i][j] = i_add(sum[i][j], i_sub(i_xor(p, neg), neg));
                }
            }
        }
        for (int i = 0; i < ROWS; ++i)
            for (int j = 0; j < NV; ++j) {
                i_store(part, sum[i][j]);
                for (int l = 0; l < VW; ++l) acc[i][j * VW + l] += part[l];
            }
    }
    for (int i = 0; i < ROWS; ++i)
        for (int n = 0; n < NR; ++n) out[i * ldo + n] = acc[i][n];
}

template <int KIND>
static void int_tile_rows(int rows, const IntAOperand& a, int64_t a0, int64_t m0, int64_t K,
                          const int32_t* const* b, int64_t* out, int64_t ldo, const IntConsts& c) {
    switch (rows) {
        case 1: int_tile<KIND, 1>(a, a0, m0, K, b, out, ldo, c); break;
        case 2: int_tile<KIND, 2>(a, a0, m0, K, b, out, ldo, c); break;
        case 3: int_tile<KIND, 3>(a, a0, m0, K, b, out, ldo, c); break;
#if MR > 4
        case 4: int_tile<KIND, 4>(a, a0, m0, K, b, out, ldo, c); break;
        case 5: int_tile<KIND, 5>(a, a0, m0, K, b, out, ldo, c); break;
#endif
        default: int_tile<KIND, MR>(a, a0, m0, K, b, out, ldo, c);
    }
}

extern "C" {

int mbm_isa() { return ISA; }

// The words of n operands for words_tile (bits(scale) + mant - bias mod 2^32; -bias for a zero scale) and
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
int mbm_has_words() { return 1; }  // whether mbm_gemm_tiles takes mbm = 3 (words_tile)
#else
int mbm_has_words() { return 0; }
#endif
int mbm_has_openmp() { return HAS_OPENMP; }
int mbm_tile_cols() { return NR; }

// Number of tiles for M rows and Np columns per group.
int64_t mbm_tiles(int64_t M, int64_t Np) { return ((M + MR - 1) / MR) * (Np / NR); }

// Tiles [begin, end) of G x (Np / NR) x ceil(M / MR), row tiles innermost so a B panel is reused.
// A: element (g, m, k) at g * a_group + a_row[m] + a_col[k] of sa / ma; sb, mb: (G, Np / NR, K, NR)
// K-major column panels; out: (G, M, Np).  Np % NR == 0.  With OpenMP, ``threads`` split the range.
// mbm: 1 MBM, 0 Mitchell, 3 Mitchell from words (words_tile: ma and mb hold the words, sa and sb unused).
void mbm_gemm_tiles(const float* sa, const int32_t* ma, const int64_t* a_row, const int64_t* a_col, int64_t a_group,
                    const float* sb, const int32_t* mb, float* out, int64_t M, int64_t Np, int64_t K,
                    int64_t begin, int64_t end, int mbm, int32_t c0, int32_t c1, int threads) {
    Consts c{i_set1(ONE_BITS + ONE), i_set1(ONE_BITS + 2 * ONE), i_set1(ONE_BITS + 2 * ONE - c1), i_set1(0x20000000),
             i_set1(c0), i_set1(c1),
             f_set1((float)c0 / (float)ONE), f_set1((float)c1 / (float)(ONE / 2))};
    AOperand a{sa, ma, a_row, a_col};
    int kind = mbm != 1 ? MITCHELL : (2 * c1 == c0 ? MBM_ONE_ADDEND : MBM);
    int64_t mt = (M + MR - 1) / MR, nt = Np / NR;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t t = begin; t < end; ++t) {
        int64_t m = t % mt, n = (t / mt) % nt, g = t / (mt * nt);
        int rows = (int)(M - m * MR < MR ? M - m * MR : MR);
        int64_t b0 = (g * nt + n) * K * NR;
        float* o = out + (g * M + m * MR) * Np + n * NR;
        const float* bs = sb + b0;
        const int32_t* bm = mb + b0;
#if defined(__AVX512F__)
        if (mbm == MITCHELL_WORDS) words_tile_rows(rows, ma, a_row, a_col, g * a_group, m * MR, bm, o, K, Np);
        else
#endif
        if (kind == MBM_ONE_ADDEND) tile_rows<MBM_ONE_ADDEND>(rows, a, g * a_group, m * MR, bs, bm, o, K, Np, c);
        else if (kind == MBM) tile_rows<MBM>(rows, a, g * a_group, m * MR, bs, bm, o, K, Np, c);
        else tile_rows<MITCHELL>(rows, a, g * a_group, m * MR, bs, bm, o, K, Np, c);
    }
}

// Tiles [begin, end) as mbm_gemm_tiles, for an integer multiplier.  A: the int32 fields (sign mask, f, h),
// element (g, m, k) at g * a_group + a_row[m] + a_col[k]; b_*: (G, Np / NR, K, NR) K-major column panels of
// the same fields; out: (G, M, Np) int64.  kind: 0 Mitchell, 1 MBM (corrections c0, c1), 2 table
// (``table``: (2^bits)^2 int32 entries, row and column 0 zero).
void mbm_gemm_int_tiles(const int32_t* a_sign, const int32_t* a_f, const int32_t* a_h, const int64_t* a_row,
                        const int64_t* a_col, int64_t a_group, const int32_t* b_sign, const int32_t* b_f,
                        const int32_t* b_h, int64_t* out, int64_t M, int64_t Np, int64_t K,
                        int64_t begin, int64_t end, int kind, int32_t c0, int32_t c1, const int32_t* table,
                        int bits, int64_t kblock, int threads) {
    IntConsts c{i_set1(ONE), i_set1(ONE + c0), i_set1(2 * ONE), i_set1(c1), table, bits, kblock < 1 ? 1 : kblock};
    IntAOperand a{{a_sign, a_f, a_h}, a_row, a_col};
    int64_t mt = (M + MR - 1) / MR, nt = Np / NR;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t t = begin; t < end; ++t) {
        int64_t m = t % mt, n = (t / mt) % nt, g = t / (mt * nt);
        int rows = (int)(M - m * MR < MR ? M - m * MR : MR);
        int64_t b0 = (g * nt + n) * K * NR;
        const int32_t* b[3] = {b_sign + b0, b_f + b0, b_h + b0};
        int64_t* o = out + (g * M + m * MR) * Np + n * NR;
        if (kind == INT_TABLE) int_tile_rows<INT_TABLE>(rows, a, g * a_group, m * MR, K, b, o, Np, c);
        else if (kind == INT_MBM) int_tile_rows<INT_MBM>(rows, a, g * a_group, m * MR, K, b, o, Np, c);
        else int_tile_rows<INT_MITCHELL>(rows, a, g * a_group, m * MR, K, b, o, Np, c);
    }
}

}  // extern "C"

/* The fused linear-combination update for CPU tensors, as one loop over the elements.

   Compiled at run time by cpu_codegen.py (once per process, with the C compiler found on the
   machine) and called through ctypes with raw pointers. Every pointer addresses a contiguous
   run of elements of dtype 0 = float32, 1 = bfloat16, 2 = float16.

   The elements are worked through in blocks of BLOCK. For each block, every distinct output row
   is accumulated in fp32 into its own L1-resident buffer before anything is stored, so an output
   may overwrite one of the inputs in place; then each row is rounded once to each destination's
   dtype (round to nearest even, bit for bit torch's scalar conversions) and stored. A zero
   coefficient is not a term: its input is never read, so a nan/inf in an unused input cannot
   reach a row. Up to four terms of one dtype are summed in registers in one loop
   (c0*x0 + c1*x1 + ..., left to right, as the PyTorch path adds them).

   With stream != 0 (large tensors) stores bypass the cache (non-temporal), as the libc copy the
   benchmarks call the floor does; otherwise every written cache line would first be read. */

#include <math.h> /* isfinite: a macro, no libm */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 2048 /* elements: 8 KiB of fp32 per row */

static inline float f32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

static inline float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) { /* c10::detail::round_to_nearest_even */
    uint32_t u = f32_to_bits(f);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : r);
}

static inline float f16_to_f32(uint16_t h) { /* c10::detail::fp16_ieee_to_fp32_value */
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t nb = f32_to_bits(normalized), db = f32_to_bits(denormalized);
    return f32_from_bits(sign | (two_w < (1u << 27) ? db : nb));
}

static inline uint16_t f32_to_f16(float f) { /* c10::detail::fp16_ieee_from_fp32_value */
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

#define LD0(p, k) (((const float *)(p))[k])
#define LD1(p, k) bf16_to_f32(((const uint16_t *)(p))[k])
#define LD2(p, k) f16_to_f32(((const uint16_t *)(p))[k])

/* acc (=|+=) sum of nt <= 4 terms c[i] * x[i], all of dtype D, over m elements */
#define DEF_TERMS(D)                                                                               \
    static void terms##D(float *restrict acc, const void *const *x, const float *c, int nt,       \
                         int64_t m, int first) {                                                  \
        const void *restrict x0 = x[0], *restrict x1 = nt > 1 ? x[1] : 0;                          \
        const void *restrict x2 = nt > 2 ? x[2] : 0, *restrict x3 = nt > 3 ? x[3] : 0;             \
        const float c0 = c[0], c1 = nt > 1 ? c[1] : 0.f, c2 = nt > 2 ? c[2] : 0.f,                \
                    c3 = nt > 3 ? c[3] : 0.f;                                                      \
        if (first) {                                                                               \
            switch (nt) {                                                                          \
            case 1: { for (int64_t k = 0; k < m; k++) acc[k] = c0 * LD##D(x0, k); } break;             \
            case 2: { for (int64_t k = 0; k < m; k++) acc[k] = c0 * LD##D(x0, k) + c1 * LD##D(x1, k); } break; \
            case 3: { for (int64_t k = 0; k < m; k++)                                                \
                    acc[k] = c0 * LD##D(x0, k) + c1 * LD##D(x1, k) + c2 * LD##D(x2, k); } break;      \
            default: { for (int64_t k = 0; k < m; k++)                                               \
                    acc[k] = c0 * LD##D(x0, k) + c1 * LD##D(x1, k) + c2 * LD##D(x2, k)              \
                             + c3 * LD##D(x3, k); } break;                                            \
            }                                                                                      \
        } else {                                                                                   \
            switch (nt) {                                                                          \
            case 1: { for (int64_t k = 0; k < m; k++) acc[k] = acc[k] + c0 * LD##D(x0, k); } break;    \
            case 2: { for (int64_t k = 0; k < m; k++)                                                \
                    acc[k] = acc[k] + c0 * LD##D(x0, k) + c1 * LD##D(x1, k); } break;                 \
            case 3: { for (int64_t k = 0; k < m; k++)                                                \
                    acc[k] = acc[k] + c0 * LD##D(x0, k) + c1 * LD##D(x1, k) + c2 * LD##D(x2, k); } break; \
            default: { for (int64_t k = 0; k < m; k++)                                               \
                    acc[k] = acc[k] + c0 * LD##D(x0, k) + c1 * LD##D(x1, k) + c2 * LD##D(x2, k)     \
                             + c3 * LD##D(x3, k); } break;                                            \
            }                                                                                      \
        }                                                                                          \
    }
DEF_TERMS(0)
DEF_TERMS(1)
DEF_TERMS(2)

#define ST0(v) (v)
#define ST1(v) f32_to_bf16(v)
#define ST2(v) f32_to_f16(v)
#define T0 float
#define T1 uint16_t
#define T2 uint16_t

/* q <- round(sum of nt <= 4 terms c[i] * x[i]): inputs and destination all of dtype D, over m
   elements, in one pass (used when no destination of the call is one of its inputs) */
#define DEF_DIRECT(D)                                                                              \
    static void direct##D(void *dst, const void *const *x, const float *c, int nt, int64_t m) {    \
        T##D *restrict q = (T##D *)dst;                                                            \
        const void *restrict x0 = x[0], *restrict x1 = nt > 1 ? x[1] : 0;                          \
        const void *restrict x2 = nt > 2 ? x[2] : 0, *restrict x3 = nt > 3 ? x[3] : 0;             \
        const float c0 = c[0], c1 = nt > 1 ? c[1] : 0.f, c2 = nt > 2 ? c[2] : 0.f,                \
                    c3 = nt > 3 ? c[3] : 0.f;                                                      \
        switch (nt) {                                                                              \
        case 1: { for (int64_t k = 0; k < m; k++) q[k] = ST##D(c0 * LD##D(x0, k)); } break;        \
        case 2: { for (int64_t k = 0; k < m; k++)                                                  \
                      q[k] = ST##D(c0 * LD##D(x0, k) + c1 * LD##D(x1, k)); } break;                 \
        case 3: { for (int64_t k = 0; k < m; k++)                                                  \
                      q[k] = ST##D(c0 * LD##D(x0, k) + c1 * LD##D(x1, k) + c2 * LD##D(x2, k)); } break; \
        default: { for (int64_t k = 0; k < m; k++)                                                 \
                      q[k] = ST##D(c0 * LD##D(x0, k) + c1 * LD##D(x1, k) + c2 * LD##D(x2, k)       \
                                   + c3 * LD##D(x3, k)); } break;                                   \
        }                                                                                          \
    }
DEF_DIRECT(0)
DEF_DIRECT(1)
DEF_DIRECT(2)

/* acc rounded to dtype dt into dst, ordinary stores */
static void store_plain(void *restrict dst, const float *restrict acc, int dt, int64_t m) {
    if (dt == 0) {
        memcpy(dst, acc, (size_t)m * 4);
    } else if (dt == 1) {
        uint16_t *restrict q = (uint16_t *)dst;
        for (int64_t k = 0; k < m; k++) q[k] = f32_to_bf16(acc[k]);
    } else {
        uint16_t *restrict q = (uint16_t *)dst;
        for (int64_t k = 0; k < m; k++) q[k] = f32_to_f16(acc[k]);
    }
}

#if defined(__AVX2__)
static inline __m256i bf16_round8(__m256 v) { /* 8 x u32, bf16 bits in the low half */
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256 ordered = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
    return _mm256_blendv_epi8(_mm256_set1_epi32(0x7fc0), r, _mm256_castps_si256(ordered));
}
#endif

/* acc rounded to dtype dt into dst with non-temporal stores where dst is 32-byte aligned */
static void store_stream(void *restrict dst, const float *restrict acc, int dt, int64_t m) {
#if defined(__AVX2__)
    const int size = dt == 0 ? 4 : 2;
    int64_t head = (int64_t)(((32 - ((uintptr_t)dst % 32)) % 32) / size);
    if ((uintptr_t)dst % size) head = m; /* misaligned elements: no streaming */
    if (head > m) head = m;
    store_plain(dst, acc, dt, head);
    int64_t k = head;
    if (dt == 0) {
        float *q = (float *)dst;
        for (; k + 8 <= m; k += 8) _mm256_stream_ps(q + k, _mm256_loadu_ps(acc + k));
    } else if (dt == 1) {
        uint16_t *q = (uint16_t *)dst;
        for (; k + 16 <= m; k += 16) {
            __m256i p = _mm256_packus_epi32(bf16_round8(_mm256_loadu_ps(acc + k)),
                                            bf16_round8(_mm256_loadu_ps(acc + k + 8)));
            _mm256_stream_si256((__m256i *)(q + k), _mm256_permute4x64_epi64(p, 0xD8));
        }
    } else {
        uint16_t stage[16] __attribute__((aligned(32)));
        uint16_t *q = (uint16_t *)dst;
        for (; k + 16 <= m; k += 16) {
            for (int i = 0; i < 16; i++) stage[i] = f32_to_f16(acc[k + i]);
            _mm256_stream_si256((__m256i *)(q + k), _mm256_load_si256((const __m256i *)stage));
        }
    }
    store_plain((char *)dst + k * size, acc + k, dt, m - k);
#else
    store_plain(dst, acc, dt, m);
#endif
}

/* nbytes from src to dst, non-temporal stores where dst is 32-byte aligned */
static void copy_stream(char *restrict dst, const char *restrict src, size_t nbytes) {
#if defined(__AVX2__)
    size_t head = (32 - ((uintptr_t)dst % 32)) % 32;
    if (head > nbytes) head = nbytes;
    memcpy(dst, src, head);
    size_t k = head;
    for (; k + 32 <= nbytes; k += 32)
        _mm256_stream_si256((__m256i *)(dst + k), _mm256_loadu_si256((const __m256i *)(src + k)));
    memcpy(dst + k, src + k, nbytes - k);
#else
    memcpy(dst, src, nbytes);
#endif
}

/* The nonzero terms of row cr when there are 1..4 and all are of dtype dt: their inputs (at
   element s) into xs, coefficients into cs; returns how many, or 0 when the row does not fit. */
static int gather(const float *cr, int n_in, void *const *in, const int *in_dt, int dt, int64_t s,
                  const void **xs, float *cs) {
    static const int size_of[3] = {4, 2, 2};
    int nt = 0;
    for (int j = 0; j < n_in; j++) {
        if (cr[j] == 0.0f) continue;
        if (in_dt[j] != dt || nt == 4) return 0;
        xs[nt] = (const char *)in[j] + s * size_of[dt];
        cs[nt++] = cr[j];
    }
    return nt;
}

#if defined(__AVX2__) && defined(__FMA__)
/* bf16 inputs to a bf16 destination, 16 elements a step. Widening by interleaving with zeros
   and narrowing with packus are both per 128-bit lane, so together they keep element order
   without a cross-lane shuffle. */
static inline __attribute__((always_inline)) void bf16_steps(uint16_t *q, const void *const *xs, const float *cs,
                                                             const int nt, int64_t k0, int64_t m, int stream) {
    const __m256i zero = _mm256_setzero_si256();
    __m256 c[4];
    for (int i = 0; i < nt; i++) c[i] = _mm256_set1_ps(cs[i]);
    for (int64_t k = k0; k + 16 <= m; k += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)xs[0] + k));
        __m256 lo = _mm256_mul_ps(c[0], _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)));
        __m256 hi = _mm256_mul_ps(c[0], _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)));
        for (int i = 1; i < nt; i++) {
            v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)xs[i] + k));
            lo = _mm256_fmadd_ps(c[i], _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), lo);
            hi = _mm256_fmadd_ps(c[i], _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), hi);
        }
        __m256i r = _mm256_packus_epi32(bf16_round8(lo), bf16_round8(hi));
        if (stream) _mm256_stream_si256((__m256i *)(q + k), r);
        else _mm256_storeu_si256((__m256i *)(q + k), r);
    }
}

static void bf16_direct(uint16_t *q, const void *const *xs, const float *cs, int nt, int64_t m, int stream) {
    int64_t head = 0;
    if (stream) {
        head = (int64_t)(((32 - ((uintptr_t)q % 32)) % 32) / 2);
        if ((uintptr_t)q % 2 || head > m) head = m;
        direct1(q, xs, cs, nt, head);
    }
    switch (nt) {
    case 1: bf16_steps(q, xs, cs, 1, head, m, stream); break;
    case 2: bf16_steps(q, xs, cs, 2, head, m, stream); break;
    case 3: bf16_steps(q, xs, cs, 3, head, m, stream); break;
    default: bf16_steps(q, xs, cs, 4, head, m, stream); break;
    }
    int64_t done = head + (m - head) / 16 * 16;
    const void *rest[4];
    for (int i = 0; i < nt; i++) rest[i] = (const uint16_t *)xs[i] + done;
    direct1(q + done, rest, cs, nt, m - done);
}
#endif

/* dst (at the block) <- the row of terms xs/cs rounded to dt, in one pass where possible */
static void store_direct(char *p, int dt, const void **xs, const float *cs, int nt, int64_t m, int stream,
                         float *scratch) {
#if defined(__AVX2__) && defined(__FMA__)
    if (dt == 1) { bf16_direct((uint16_t *)p, xs, cs, nt, m, stream); return; }
#endif
    if (!stream) {
        if (dt == 0) direct0(p, xs, cs, nt, m);
        else if (dt == 1) direct1(p, xs, cs, nt, m);
        else direct2(p, xs, cs, nt, m);
        return;
    }
    if (dt == 0) terms0(scratch, xs, cs, nt, m, 1);
    else if (dt == 1) terms1(scratch, xs, cs, nt, m, 1);
    else terms2(scratch, xs, cs, nt, m, 1);
    store_stream(p, scratch, dt, m);
}

/* acc[0..m) <- sum_j cr[j] * in[j][s ..] over the nonzero coefficients, in fp32, left to right,
   in groups of up to 4 terms of one dtype (zero when every coefficient is 0) */
static void form_row(float *acc, const float *cr, int n_in, void *const *in, const int *in_dt, int64_t s,
                     int64_t m) {
    static const int size_of[3] = {4, 2, 2};
    const void *xs[4];
    float cs[4];
    int first = 1, j = 0;
    while (j < n_in) {
        /* the next group: up to 4 nonzero terms of one dtype */
        int dt = -1, nt = 0;
        for (; j < n_in && nt < 4; j++) {
            if (cr[j] == 0.0f) continue;
            if (dt >= 0 && in_dt[j] != dt) break;
            dt = in_dt[j];
            xs[nt] = (const char *)in[j] + s * size_of[dt];
            cs[nt++] = cr[j];
        }
        if (nt == 0) continue;
        if (dt == 0) terms0(acc, xs, cs, nt, m, first);
        else if (dt == 1) terms1(acc, xs, cs, nt, m, first);
        else terms2(acc, xs, cs, nt, m, first);
        first = 0;
    }
    if (first) memset(acc, 0, (size_t)m * sizeof(float));
}

/* The refitted slope of FoCa "calibrated" (ops/fit.py), in two passes over n elements.
   coef: five rows of n_in coefficients over the inputs: r, u, q, U, V. Pass 1 forms r, u, q in
   fp32 block by block and sums the five products u.u, u.q, q.q, r.u, r.q in double; the 2x2
   normal system is solved as reference/foca_calibrated.py does (parallel test det <= par uu qq:
   phi = r.u / u.u alone, theta = 1/2) and clipped to bounds (phi lo, hi, theta lo, hi); when a
   sum is not finite (a nan/inf in r, u or q) phi, theta = bounds[4], bounds[5] (the method's
   fixed weights) instead; pass 2 writes phi U + theta V, rounded once to dst's dtype.
   Returns 0, or -1 when the block buffers cannot be allocated. */
int foca_fit(int64_t n, int n_in, void *const *in, const int *in_dt, const float *coef, const double *bounds,
             double par, void *dst, int dst_dt) {
    static const int size_of[3] = {4, 2, 2};
    float *buf = (float *)aligned_alloc(64, (size_t)3 * BLOCK * sizeof(float));
    if (!buf) return -1;
    float *r = buf, *u = buf + BLOCK, *q = buf + 2 * BLOCK;
    double uu = 0, uq = 0, qq = 0, ru = 0, rq = 0;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        form_row(r, coef, n_in, in, in_dt, s, m);
        form_row(u, coef + n_in, n_in, in, in_dt, s, m);
        form_row(q, coef + 2 * n_in, n_in, in, in_dt, s, m);
        /* per block, four lanes per sum (independent chains the compiler can vectorise without
           reassociating), then added: less latency, less rounding drift */
        double a[4] = {0}, b[4] = {0}, c[4] = {0}, d[4] = {0}, e[4] = {0};
        int64_t k = 0;
        for (; k + 4 <= m; k += 4) {
            for (int l = 0; l < 4; l++) {
                double rk = r[k + l], uk = u[k + l], qk = q[k + l];
                a[l] += uk * uk; b[l] += uk * qk; c[l] += qk * qk; d[l] += rk * uk; e[l] += rk * qk;
            }
        }
        for (; k < m; k++) {
            double rk = r[k], uk = u[k], qk = q[k];
            a[0] += uk * uk; b[0] += uk * qk; c[0] += qk * qk; d[0] += rk * uk; e[0] += rk * qk;
        }
        uu += (a[0] + a[1]) + (a[2] + a[3]); uq += (b[0] + b[1]) + (b[2] + b[3]);
        qq += (c[0] + c[1]) + (c[2] + c[3]); ru += (d[0] + d[1]) + (d[2] + d[3]);
        rq += (e[0] + e[1]) + (e[2] + e[3]);
    }
    double det = uu * qq - uq * uq, phi, theta;
    if (det > par * uu * qq) {
        phi = (ru * qq - rq * uq) / det;
        theta = (rq * uu - ru * uq) / det;
    } else {
        phi = uu > 0 ? ru / uu : 0.0;
        theta = 0.5;
    }
    phi = phi < bounds[0] ? bounds[0] : (phi > bounds[1] ? bounds[1] : phi);
    theta = theta < bounds[2] ? bounds[2] : (theta > bounds[3] ? bounds[3] : theta);
    if (!(isfinite(uu) && isfinite(uq) && isfinite(qq) && isfinite(ru) && isfinite(rq))) {
        phi = bounds[4];
        theta = bounds[5];
    }
    const float fphi = (float)phi, ftheta = (float)theta;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        form_row(u, coef + 3 * n_in, n_in, in, in_dt, s, m);
        form_row(q, coef + 4 * n_in, n_in, in, in_dt, s, m);
        for (int64_t k = 0; k < m; k++) r[k] = u[k] * fphi + q[k] * ftheta;
        store_plain((char *)dst + s * size_of[dst_dt], r, dst_dt, m);
    }
    free(buf);
    return 0;
}

/* One update over elements [begin, end).
   ptrs: the n_in inputs, then the n_dst destinations.
   meta: in_dt[n_in], row_start[n_rows + 1], dst_dt[n_dst], row_copy[n_rows], row_hazard[n_rows]:
   row r has coefficients coef[r*n_in ..] and destinations row_start[r] .. row_start[r+1].
   row_copy[r] >= 0: the row is input row_copy[r] times 1 into destinations of its dtype, and that
   input is no destination of the call: its bytes are copied as they are (widening and rounding
   back is exact). row_hazard[r]: some destination of the row is an input of the call, so the
   row is stored only after every row of the block has been formed; the other rows are stored
   as soon as they are formed (in one pass when they have a single destination).
   Returns 0, or -1 when the block buffers cannot be allocated. */
int foca_lincomb(int64_t begin, int64_t end, int n_in, int n_rows, int n_dst, void *const *ptrs,
                 const int *meta, const float *coef, int stream) {
    static const int size_of[3] = {4, 2, 2};
    const int *in_dt = meta, *row_start = meta + n_in, *dst_dt = row_start + n_rows + 1;
    const int *row_copy = dst_dt + n_dst, *row_hazard = row_copy + n_rows;
    void *const *in = ptrs, *const *dst = ptrs + n_in;
    float *buf = (float *)aligned_alloc(64, (size_t)(n_rows + 1) * BLOCK * sizeof(float));
    if (!buf) return -1;
    float *scratch = buf + (size_t)n_rows * BLOCK;
    for (int r = 0; r < n_rows; r++) { /* unit copies into non-inputs: the whole range at once */
        if (row_copy[r] < 0 || row_hazard[r]) continue;
        for (int d = row_start[r]; d < row_start[r + 1]; d++) {
            int size = size_of[dst_dt[d]];
            char *p = (char *)dst[d] + begin * size;
            const char *q = (const char *)in[row_copy[r]] + begin * size;
            if (stream) copy_stream(p, q, (size_t)((end - begin) * size));
            else memcpy(p, q, (size_t)((end - begin) * size));
        }
    }
    for (int64_t s = begin; s < end; s += BLOCK) {
        int64_t m = end - s < BLOCK ? end - s : BLOCK;
        for (int r = 0; r < n_rows; r++) {
            if (row_copy[r] >= 0) continue;
            int d0 = row_start[r], nd = row_start[r + 1] - d0;
            const float *cr = coef + (size_t)r * n_in;
            const void *xs[4];
            float cs[4];
            int nt;
            if (!row_hazard[r] && nd == 1 && (nt = gather(cr, n_in, in, in_dt, dst_dt[d0], s, xs, cs)) > 0) {
                store_direct((char *)dst[d0] + s * size_of[dst_dt[d0]], dst_dt[d0], xs, cs, nt, m, stream, scratch);
                continue;
            }
            float *acc = buf + (size_t)r * BLOCK;
            form_row(acc, cr, n_in, in, in_dt, s, m);
            if (row_hazard[r]) continue; /* stored below */
            for (int d = d0; d < d0 + nd; d++) {
                char *p = (char *)dst[d] + s * size_of[dst_dt[d]];
                if (stream) store_stream(p, acc, dst_dt[d], m);
                else store_plain(p, acc, dst_dt[d], m);
            }
        }
        for (int r = 0; r < n_rows; r++) { /* every row is formed: now the inputs may change */
            if (!row_hazard[r]) continue;
            const float *acc = buf + (size_t)r * BLOCK;
            for (int d = row_start[r]; d < row_start[r + 1]; d++) {
                int size = size_of[dst_dt[d]];
                char *p = (char *)dst[d] + s * size;
                if (row_copy[r] >= 0) {
                    const char *q = (const char *)in[row_copy[r]] + s * size;
                    if (stream) copy_stream(p, q, (size_t)(m * size));
                    else memcpy(p, q, (size_t)(m * size));
                } else if (stream) {
                    store_stream(p, acc, dst_dt[d], m);
                } else {
                    store_plain(p, acc, dst_dt[d], m);
                }
            }
        }
    }
#if defined(__AVX2__)
    if (stream) _mm_sfence();
#endif
    free(buf);
    return 0;
}

/* ---- The fp8 state (foca_kernels/fp8.py; rules: reference/fp8.py) -------------------------------
   A 16-bit anchor (dtype 1 or 2) and e4m3 increments with one power-of-two float32 scale per row
   of c elements. Codes are made and read with the same integer / float32 steps as the Triton
   kernel (ops/triton_fp8.py), which are torch's own e4m3 rounding (to nearest even) for the
   values that occur here (|v| < 256, or non-finite: stored as nan, code 0x7f). */

static inline float fp8_load(const void *p, int dt, int64_t i) {
    if (dt == 0) return ((const float *)p)[i];
    if (dt == 1) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

static inline void fp8_store(void *p, int dt, int64_t i, float v) {
    if (dt == 0) ((float *)p)[i] = v;
    else if (dt == 1) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((uint16_t *)p)[i] = f32_to_f16(v);
}

static inline int f32_finite(float v) { return (f32_to_bits(v) & 0x7f800000u) != 0x7f800000u; }

static inline float e4m3_decode(uint8_t b) {
    const uint32_t ef = (b >> 3) & 15u, mf = b & 7u;
    if ((b & 127u) == 127u) return NAN;
    const float mag = ef == 0 ? (float)mf * 0.001953125f : f32_from_bits(((ef + 120u) << 23) | (mf << 20));
    return (b & 128u) ? -mag : mag;
}

static inline uint8_t e4m3_encode(float v) { /* |v| < 256 or non-finite */
    if (!f32_finite(v)) return 127u;
    const uint32_t sign = f32_to_bits(v) >> 31;
    const float a = __builtin_fabsf(v);
    const uint32_t ea = f32_to_bits(a) >> 23;
    const float big = f32_from_bits(((ea < 121u ? 121u : ea) + 20u) << 23);
    const float r = (a + big) - big; /* to nearest even at e4m3's spacing (no -ffast-math: not folded) */
    const uint32_t rb = f32_to_bits(r), er = rb >> 23;
    const uint32_t code = er < 121u ? (uint32_t)(r * 512.0f) : (((er - 120u) << 3) | ((rb >> 20) & 7u));
    return (uint8_t)(code | (sign << 7));
}

/* e4m3_decode with selects instead of branches (vectorizes), and no float32 subnormal on the way
   (each costs a microcode assist on x86): a normal code's 7 low bits shifted to float32's
   exponent and top mantissa bits, the exponent rebased by 120; a subnormal one is mf * 2^-9;
   0x7f / 0xff are nan. */
static inline float e4m3_value(uint8_t b) {
    const uint32_t lo = b & 127u;
    const float norm = f32_from_bits((lo << 20) + (120u << 23));
    const float mag = lo < 8u ? (float)lo * 0.001953125f : norm;
    const float v = f32_from_bits(f32_to_bits(mag) | ((uint32_t)(b & 128u) << 24));
    return lo == 127u ? NAN : v;
}

/* acc[0..m) = a0 * (p[e0..e0+m) of dtype dt, widened) */
static void load_scaled(float *restrict acc, const void *p, int dt, int64_t e0, int64_t m, float a0) {
    if (dt == 0) {
        const float *restrict x = (const float *)p + e0;
        for (int64_t k = 0; k < m; k++) acc[k] = x[k] * a0;
    } else if (dt == 1) {
        const uint16_t *restrict x = (const uint16_t *)p + e0;
        for (int64_t k = 0; k < m; k++) acc[k] = bf16_to_f32(x[k]) * a0;
    } else {
        const uint16_t *restrict x = (const uint16_t *)p + e0;
        for (int64_t k = 0; k < m; k++) acc[k] = f16_to_f32(x[k]) * a0;
    }
}

/* out[e] = a0 * anchor[e] + sum_d (b[d] * scales[d][row]) * q_d[e], rows x c elements, in
   blocks of BLOCK elements of a row: the anchor term first, then each increment's, in order */
#if defined(__AVX2__) && defined(__F16C__)
/* 8 e4m3 codes as float32: their bits shifted into float16's (sign to bit 15, the rest to bits
   7..13) are the value / 256, subnormals included, widened exactly by the F16C conversion;
   0x7f / 0xff become nan. */
static inline __m256 e4m3_decode8(const uint8_t *q) {
    const __m128i m7f = _mm_set1_epi16(0x7f), m80 = _mm_set1_epi16(0x80);
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)q));
    const __m128i lo = _mm_and_si128(b, m7f);
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, m80), 8), _mm_slli_epi16(lo, 7));
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
    const __m256 bad = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm_cmpeq_epi16(lo, m7f)));
    return _mm256_blendv_ps(v, _mm256_set1_ps(NAN), bad);
}

/* The first (m / 8) * 8 elements of a block with a bfloat16 anchor in one pass, 8 at a time:
   anchor * a0, then + q_d * w_d for each d (mul then add, the scalar loop's order: the same
   bits), rounded once to float32 / bfloat16 (odt 0 / 1). Returns the elements done. */
static int64_t fp8_skip_bf16_anchor8(const uint16_t *anc, float a0, int nd, const uint8_t *const *incs,
                                     const float *w, int64_t e0, int64_t m, void *out, int odt) {
    const __m256 va0 = _mm256_set1_ps(a0);
    __m256 vw[16];
    for (int d = 0; d < nd; d++) vw[d] = _mm256_set1_ps(w[d]);
    int64_t k = 0;
    for (; k + 8 <= m; k += 8) {
        const __m128i a16 = _mm_loadu_si128((const __m128i *)(anc + e0 + k));
        __m256 acc = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a16), 16)), va0);
        for (int d = 0; d < nd; d++) acc = _mm256_add_ps(acc, _mm256_mul_ps(e4m3_decode8(incs[d] + e0 + k), vw[d]));
        if (odt == 0) {
            _mm256_storeu_ps((float *)out + e0 + k, acc);
        } else {
            const __m256i r = bf16_round8(acc);
            const __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storeu_si128((__m128i *)((uint16_t *)out + e0 + k), p);
        }
    }
    return k;
}
#endif

/* out[e] = a0 * anchor[e] + sum_d (b[d] * scales[d][row]) * q_d[e], rows x c elements, in
   blocks of BLOCK elements of a row: the anchor term first, then each increment's, in order */
int foca_fp8_skip(int64_t rows, int64_t c, const void *anchor, int adt, float a0, int nd,
                  const uint8_t *const *incs, const float *const *scales, const float *b, void *out, int odt) {
    float w[16];
    float acc[BLOCK];
    if (nd > 16) return 1;
    const size_t osize = odt == 0 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        for (int d = 0; d < nd; d++) w[d] = scales[d][r] * b[d];
        for (int64_t j0 = 0; j0 < c; j0 += BLOCK) {
            const int64_t m0 = c - j0 < BLOCK ? c - j0 : BLOCK;
            int64_t e0 = r * c + j0, m = m0;
#if defined(__AVX2__) && defined(__F16C__)
            if (adt == 1 && odt <= 1 && a0 != 0.0f) { /* the common case in one pass; the rest below */
                const int64_t done = fp8_skip_bf16_anchor8((const uint16_t *)anchor, a0, nd, incs, w, e0, m0, out, odt);
                e0 += done;
                m -= done;
            }
#endif
            if (m == 0) continue;
            if (a0 != 0.0f) load_scaled(acc, anchor, adt, e0, m, a0);
            else memset(acc, 0, (size_t)m * 4);
            for (int d = 0; d < nd; d++) {
                const uint8_t *restrict q = incs[d] + e0;
                const float wd = w[d];
                int64_t k = 0;
#if defined(__AVX2__) && defined(__F16C__)
                for (; k + 8 <= m; k += 8) {
                    const __m256 v = e4m3_decode8(q + k);
                    _mm256_storeu_ps(acc + k, _mm256_add_ps(_mm256_loadu_ps(acc + k), _mm256_mul_ps(v, _mm256_set1_ps(wd))));
                }
#endif
                for (; k < m; k++) acc[k] += e4m3_value(q[k]) * wd;
            }
            store_plain((char *)out + (size_t)e0 * osize, acc, odt, m);
        }
    }
    return 0;
}

/* The full step: anchor <- feature (rounded to the anchor's dtype); with has_prev also the
   increment (new - old anchor, float32) coded into inc with the row's scale in scale. */
int foca_fp8_full(int64_t rows, int64_t c, const void *feat, int fdt, void *anchor, int adt, int has_prev,
                  uint8_t *inc, float *scale) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t e0 = r * c;
        if (has_prev) {
            float amax = 0.0f;
            for (int64_t j = 0; j < c; j++) {
                float nw = fp8_load(feat, fdt, e0 + j);
                nw = adt == 1 ? bf16_to_f32(f32_to_bf16(nw)) : f16_to_f32(f32_to_f16(nw));
                const float d = nw - fp8_load(anchor, adt, e0 + j);
                const float ad = __builtin_fabsf(d);
                if (f32_finite(d) && ad > amax) amax = ad;
            }
            int32_t k = (int32_t)(f32_to_bits(amax) >> 23) - 7;
            if (k < 1) k = 1;
            scale[r] = f32_from_bits((uint32_t)k << 23);
            const float inv = f32_from_bits((uint32_t)(254 - k) << 23);
            for (int64_t j = 0; j < c; j++) {
                const float nw = fp8_load(feat, fdt, e0 + j);
                const float na = adt == 1 ? bf16_to_f32(f32_to_bf16(nw)) : f16_to_f32(f32_to_f16(nw));
                inc[e0 + j] = e4m3_encode((na - fp8_load(anchor, adt, e0 + j)) * inv);
                fp8_store(anchor, adt, e0 + j, na);
            }
        } else {
            for (int64_t j = 0; j < c; j++) fp8_store(anchor, adt, e0 + j, fp8_load(feat, fdt, e0 + j));
        }
    }
    return 0;
}

/*
 * CPU kernels that torch does not offer, loaded with ctypes (no Python API in here; the Python side is
 * models/cpukernels.py, which also decides when they run).
 *
 * bf16_linear_f32: y[M,N] = x[M,K] @ w[N,K]^T (+ bias[N]); x, y and bias float32, w bfloat16 in the
 * nn.Linear layout; products and sums in float32. This is a decode step of several sequences over a
 * weight stored in bfloat16 on a CPU without bf16 instructions (AVX2): torch's bf16 GEMV reads the
 * weight near the memory bandwidth at one row but makes one pass over it per row, and oneDNN has no
 * bf16 on AVX2, so at 8 rows a bf16 weight reads at ~5 GB/s. Here each weight element is read from
 * memory once for all rows and widened to float32 in a register (a 16-bit shift): a group of weight rows
 * is multiplied with up to MB rows of x per pass (rows*MB accumulators, the weight vectors and one x
 * vector in the 16 AVX2 registers: groups of 3 weight rows for 3+ rows of x). For 1-2 rows of x, where
 * the step is bound by reading the weight, each thread reads its weight rows one after the other (one
 * sequential stream) with four independent accumulators per row of x along K. Either way the weight
 * PF_GROUPS groups ahead is prefetched into L2 (not L1) while one group runs: measured on Zen 4 from
 * DRAM, against prefetching into L1 two groups ahead, 8 rows 1.12-1.35x (95-103 -> 110-138 GFLOP/s), 4
 * rows 1.3-1.5x, 2 rows 1.3-1.5x (the stream had no software prefetch: 31-43 -> 47-55 GFLOP/s, i.e.
 * the memory bandwidth); one row reads the weight without it.
 *
 * attn_scores_f32 / attn_values_f32 (and the _bf16kv pair for bfloat16 caches): one decode step of
 * attention for several sequences, each over its own KV cache (grouped-query: the G query heads of a
 * kv head read its keys and values once).
 * torch's batched matmuls read a cache at 8-9 GB/s at these shapes (one query row per head, a few
 * thousand positions), and a step of 8 sequences pays ~7 small ops per sequence and layer. Between the
 * two calls the caller runs torch's softmax over the padded scores, so the probabilities are torch's.
 * A bfloat16 cache is read 16 values per load and widened in a permuted order (even elements by a
 * shift, odd ones by a mask), the queries and outputs permuted to match: on Zen 4 (avx512-bf16) that is
 * 1.7-2x the in-order widening for the value pass at 8 query heads per kv head, 1.25x at one, and
 * PaddleOCR-VL's 8-row step ~1.15x.
 *
 * Threads: OpenMP over the output features (each thread streams one contiguous part of the weight).
 * Linked against libgomp.so.1 by soname, so in a process where torch already loaded its libgomp the
 * loader reuses that one and the call runs on torch's own thread team (a second OpenMP runtime would
 * keep a second team of threads spinning beside torch's).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* the ABI the Python side checks before it calls anything */
int dsocr_kernels_abi(void) { return 4; }

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#define TGT __attribute__((target("avx2,fma")))
#define MB 4        /* rows of x per pass */
#define MAX_M 64    /* rows the caller may pass */
#define PF_GROUPS 6 /* how many groups ahead the weight is prefetched */

int dsocr_kernels_x86(void) { return 1; }

TGT static inline __m256 load_bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

TGT static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R rows of x (row stride ldx) against the NB weight rows w[0..NB): out[j * MAX_M + i] = x_i . w_j.
 * pf: element offset of the weight to prefetch (0: none; the first pass over a group prefetches the
 * group PF_GROUPS ahead into L2, later passes find the group in L1). NB and R are constants in each instance,
 * so the accumulators stay in registers. */
#define DEFINE_PASS(NAME, NB, R)                                                                          \
    TGT static void NAME(const float *x, int64_t ldx, const uint16_t *const *w, int64_t K, float *out,  \
                         int64_t pf) {                                                                   \
        __m256 a[NB][R];                                                                                  \
        for (int j = 0; j < NB; j++)                                                                      \
            for (int i = 0; i < R; i++) a[j][i] = _mm256_setzero_ps();                                    \
        int64_t k = 0;                                                                                    \
        for (; k + 8 <= K; k += 8) {                                                                      \
            if (pf && (k & 31) == 0)                                                                      \
                for (int j = 0; j < NB; j++) _mm_prefetch((const char *)(w[j] + k + pf), _MM_HINT_T1);   \
            __m256 v[NB];                                                                                 \
            for (int j = 0; j < NB; j++) v[j] = load_bf16x8(w[j] + k);                                    \
            for (int i = 0; i < R; i++) {                                                                 \
                /* in a register, not folded into each FMA as a memory operand (one load instead of NB) */      \
                __m256 xv = _mm256_loadu_ps(x + i * ldx + k);                                             \
                __asm__("" : "+x"(xv));                                                                   \
                for (int j = 0; j < NB; j++) a[j][i] = _mm256_fmadd_ps(v[j], xv, a[j][i]);                \
            }                                                                                             \
        }                                                                                                 \
        for (int j = 0; j < NB; j++)                                                                      \
            for (int i = 0; i < R; i++) {                                                                 \
                float s = hsum8(a[j][i]);                                                                 \
                for (int64_t t = k; t < K; t++) s += x[i * ldx + t] * bf16_to_f32(w[j][t]);               \
                out[j * MAX_M + i] = s;                                                                   \
            }                                                                                             \
    }

DEFINE_PASS(pass3x1, 3, 1)
DEFINE_PASS(pass3x2, 3, 2)
DEFINE_PASS(pass3x3, 3, 3)
DEFINE_PASS(pass3x4, 3, 4)

/* R (1-2) rows of x against ONE weight row w[0] over K, four accumulators along K per row of x; at 2
 * rows the weight pf elements ahead is prefetched into L2, one cache line per step (at one row the
 * hardware prefetcher alone keeps up: a software prefetch there cost DeepSeek-OCR's step ~10 %). */
#define DEFINE_STREAM(NAME, R)                                                                            \
    TGT static void NAME(const float *x, int64_t ldx, const uint16_t *const *w, int64_t K, float *out,   \
                         int64_t pf) {                                                                   \
        const uint16_t *w0 = w[0];                                                                        \
        __m256 a[R][4];                                                                                   \
        for (int i = 0; i < R; i++)                                                                       \
            for (int u = 0; u < 4; u++) a[i][u] = _mm256_setzero_ps();                                    \
        int64_t k = 0;                                                                                    \
        for (; k + 32 <= K; k += 32) {                                                                    \
            if (R > 1 && pf) _mm_prefetch((const char *)(w0 + k + pf), _MM_HINT_T1);                      \
            for (int u = 0; u < 4; u++) {                                                                 \
                __m256 v = load_bf16x8(w0 + k + 8 * u);                                                   \
                for (int i = 0; i < R; i++)                                                               \
                    a[i][u] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + i * ldx + k + 8 * u), a[i][u]);      \
            }                                                                                             \
        }                                                                                                 \
        for (; k + 8 <= K; k += 8) {                                                                      \
            __m256 v = load_bf16x8(w0 + k);                                                               \
            for (int i = 0; i < R; i++)                                                                   \
                a[i][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + i * ldx + k), a[i][0]);                  \
        }                                                                                                 \
        for (int i = 0; i < R; i++) {                                                                     \
            __m256 t = _mm256_add_ps(_mm256_add_ps(a[i][0], a[i][1]), _mm256_add_ps(a[i][2], a[i][3]));   \
            float s = hsum8(t);                                                                           \
            for (int64_t q = k; q < K; q++) s += x[i * ldx + q] * bf16_to_f32(w0[q]);                     \
            out[i] = s;                                                                                   \
        }                                                                                                 \
    }

DEFINE_STREAM(stream1, 1)
DEFINE_STREAM(stream2, 2)

typedef void (*pass_fn)(const float *, int64_t, const uint16_t *const *, int64_t, float *, int64_t);

/* Output features g*NB .. g*NB+NB-1 of y = x @ w^T + bias (M rows), with passes[r - 1] multiplying r
 * rows of x (r <= MB) against the group's NB weight rows. */
TGT static void one_group(int NB, const pass_fn *passes, const float *x, int64_t ldx, const uint16_t *w,
                          int64_t ldw, const float *bias, float *y, int64_t ldy, int64_t M, int64_t N,
                          int64_t K, int64_t g) {
    const uint16_t *rows[3];
    for (int j = 0; j < NB; j++) {
        int64_t n = g * NB + j < N ? g * NB + j : N - 1; /* a short last group repeats its last row */
        rows[j] = w + n * ldw;
    }
    /* prefetch only inside the weight */
    int64_t pf = (g + PF_GROUPS + 1) * NB <= N ? PF_GROUPS * NB * ldw : 0;
    float out[3 * MAX_M];
    for (int64_t m = 0; m < M; m += MB) {
        int64_t r = M - m >= MB ? MB : M - m;
        passes[r - 1](x + m * ldx, ldx, rows, K, out + m, m == 0 ? pf : 0);
    }
    for (int j = 0; j < NB && g * NB + j < N; j++) {
        int64_t n = g * NB + j;
        float b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; m++) y[m * ldy + n] = out[j * MAX_M + m] + b;
    }
}

static const pass_fn by3[MB] = {pass3x1, pass3x2, pass3x3, pass3x4};
static const pass_fn by1[2] = {stream1, stream2};

/* the group size and passes for M rows of x: one sequential weight stream for 1-2 rows, groups of 3 */
static inline int group_rows(int64_t M, const pass_fn **passes) {
    *passes = M <= 2 ? by1 : by3;
    return M <= 2 ? 1 : 3;
}

/* Returns 0, or -1 for shapes it does not take (the caller then runs torch's kernel). */
int bf16_linear_f32(const float *x, int64_t ldx, const uint16_t *w, int64_t ldw, const float *bias, float *y,
                    int64_t ldy, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M < 1 || M > MAX_M || N < 1 || K < 1 || ldx < K || ldw < K || ldy < N) return -1;
    if (nthreads < 1) nthreads = 1;
    const pass_fn *passes;
    int NB = group_rows(M, &passes);
    int64_t groups = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) one_group(NB, passes, x, ldx, w, ldw, bias, y, ldy, M, N, K, g);
    return 0;
}

/* The experts of a mixture-of-experts step in one call: expert e multiplies rows start[e] ..
 * start[e] + count[e] - 1 of x by its own weight w[e] ([N, K], contiguous) into the same rows of y (no
 * bias). The work (every expert's groups, in expert order) is split into one contiguous share per
 * thread, so each thread streams its experts' weights back to back. Returns 0, or -1 when it does not
 * take the call. */
int bf16_grouped_linear_f32(const float *x, int64_t ldx, const int64_t *w, const int64_t *start,
                            const int64_t *count, int64_t E, float *y, int64_t ldy, int64_t N, int64_t K,
                            int nthreads) {
    if (E < 1 || E > 4096 || N < 1 || K < 1 || ldx < K || ldy < N) return -1;
    int64_t first[4097]; /* first[e]: index of expert e's first group in the flattened work */
    first[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        if (count[e] < 1 || count[e] > MAX_M || start[e] < 0) return -1;
        const pass_fn *passes;
        int NB = group_rows(count[e], &passes);
        first[e + 1] = first[e] + (N + NB - 1) / NB;
    }
    int64_t total = first[E];
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t lo = total * t / nt, hi = total * (t + 1) / nt;
        int64_t e = 0;
        while (e < E && first[e + 1] <= lo) e++;
        for (int64_t i = lo; i < hi; i++) {
            while (i >= first[e + 1]) e++;
            const pass_fn *passes;
            int NB = group_rows(count[e], &passes);
            one_group(NB, passes, x + start[e] * ldx, ldx, (const uint16_t *)(intptr_t)w[e], K, NULL,
                      y + start[e] * ldy, ldy, count[e], N, K, i - first[e]);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * decode attention over float32 or bfloat16 caches (MODE 0: float32, 1: bf16 widened in order, 2: bf16
 * widened in a permuted order; a constant in every instance; bf16 cache rows are widened to float32 as
 * they are loaded, so the products are the same float32 ones: a bf16 cache holds exactly the bf16 keys
 * and values a bf16-computing model writes)
 * ------------------------------------------------------------------------------------------------- */
#define AINL TGT static inline __attribute__((always_inline))
/* 8 cache elements at element index i of row base as float32 */
#define LDC(BF, base, i) \
    ((BF) ? load_bf16x8((const uint16_t *)(base) + (i)) : _mm256_loadu_ps((const float *)(base) + (i)))

static inline float cache_at(const void *base, int64_t i, int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* float32 -> bfloat16, round to nearest even (exact for values that are bf16 already) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* row `at` of a cache block (d elements) := src */
static inline void put_row(void *base, int64_t at, const float *src, int64_t d, int bf) {
    if (!bf) {
        memcpy((float *)base + at * d, src, d * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)base + at * d;
    for (int64_t t = 0; t < d; t++) dst[t] = f32_to_bf16(src[t]);
}

/* Keys of a bfloat16 cache with d % 16 == 0 can be read in a PERMUTED order (MODE 2, the trick of
 * DEFINE_PV): one 256-bit load of 16 bf16 keys widens with a shift (the even elements) and a mask (the
 * odd ones) instead of two zero-extending shuffles and two shifts, against query rows permuted the same
 * way per 16 elements (8 even, then 8 odd: permute16); each accumulator then takes two products per 16
 * elements. MODE 0: float32 keys; 1: bf16 keys widened in order (q as it is). */
AINL __m256 keys16(const uint16_t *k, __m256 *odd) {
    __m256i u = _mm256_loadu_si256((const __m256i *)k);
    *odd = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

/* lane j = the sum of a[j]'s lanes (8 reductions at once instead of 8 horizontal sums) */
AINL __m256 reduce8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    /* u0 lanes: k0 k1 k2 k3 (low half) | k0 k1 k2 k3 (high half), partial sums; u1 the same for k4..k7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* One query row against 8 consecutive key rows (row stride d, d % 8 == 0): lane j = q . k_j. */
AINL __m256 qk8(const float *q, const void *K, int64_t l, int64_t d, int MODE) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    if (MODE == 2) {
        for (int64_t t = 0; t < d; t += 16) {
            __m256 xe = _mm256_loadu_ps(q + t), xo = _mm256_loadu_ps(q + t + 8);
            __asm__("" : "+x"(xe), "+x"(xo));
            for (int j = 0; j < 8; j++) {
                __m256 ko, ke = keys16((const uint16_t *)K + (l + j) * d + t, &ko);
                a[j] = _mm256_fmadd_ps(ko, xo, _mm256_fmadd_ps(ke, xe, a[j]));
            }
        }
    } else {
        for (int64_t t = 0; t < d; t += 8) {
            __m256 qv = _mm256_loadu_ps(q + t);
            __asm__("" : "+x"(qv));
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(LDC(MODE, K, (l + j) * d + t), qv, a[j]);
        }
    }
    return reduce8(a);
}

/* Two query rows q0, q1 against 4 consecutive key rows: lanes 0-3 = q0 . k_j, lanes 4-7 = q1 . k_j
 * (8 accumulators, 6 loads per 8 FMAs). */
AINL __m256 qk4x2(const float *q0, const float *q1, const void *K, int64_t l, int64_t d, int MODE) {
    __m256 a[8]; /* a[0..3]: q0, a[4..7]: q1 */
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    if (MODE == 2) {
        for (int64_t t = 0; t < d; t += 16) {
            __m256 x0e = _mm256_loadu_ps(q0 + t), x0o = _mm256_loadu_ps(q0 + t + 8);
            __m256 x1e = _mm256_loadu_ps(q1 + t), x1o = _mm256_loadu_ps(q1 + t + 8);
            __asm__("" : "+x"(x0e), "+x"(x0o), "+x"(x1e), "+x"(x1o));
            for (int j = 0; j < 4; j++) {
                __m256 ko, ke = keys16((const uint16_t *)K + (l + j) * d + t, &ko);
                a[j] = _mm256_fmadd_ps(ko, x0o, _mm256_fmadd_ps(ke, x0e, a[j]));
                a[4 + j] = _mm256_fmadd_ps(ko, x1o, _mm256_fmadd_ps(ke, x1e, a[4 + j]));
            }
        }
    } else {
        for (int64_t t = 0; t < d; t += 8) {
            __m256 x0 = _mm256_loadu_ps(q0 + t), x1 = _mm256_loadu_ps(q1 + t);
            __asm__("" : "+x"(x0), "+x"(x1));
            for (int j = 0; j < 4; j++) {
                __m256 kv = LDC(MODE, K, (l + j) * d + t);
                a[j] = _mm256_fmadd_ps(kv, x0, a[j]);
                a[4 + j] = _mm256_fmadd_ps(kv, x1, a[4 + j]);
            }
        }
    }
    /* hadd pairs: per 128-bit half, lanes (a0 a1 a2 a3) partial sums, then halves added */
    __m256 ua = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 ub = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ua, ub, 0x20), _mm256_permute2f128_ps(ua, ub, 0x31));
}

/* the G query rows of an item permuted per 16 elements (even, then odd) for MODE 2 */
#define QP_MAX 8192 /* floats: G * d of the items that take the permuted path (32 KB on the stack) */
static void permute16(const float *q, int64_t n, float *qp) {
    for (int64_t i = 0; i < n; i += 16)
        for (int j = 0; j < 8; j++) {
            qp[i + j] = q[i + 2 * j];
            qp[i + 8 + j] = q[i + 2 * j + 1];
        }
}

/* one (sequence, kv head) item of step 1 (see attn_scores): qb the query rows, qx the same as the
 * products of MODE read them (permuted for MODE 2) */
AINL void scores_item(const float *qb, const float *qx, const float *kn, const float *vn, void *K, void *V,
                      int64_t pos, int64_t G, int64_t d, float *sc, int64_t lmax, int MODE) {
    int BF = MODE != 0;
    int64_t L = pos + 1;
    put_row(K, pos, kn, d, BF);
    put_row(V, pos, vn, d, BF);
    int64_t l = 0;
    if (G % 2 == 0) { /* pairs of query rows against 4 key rows: fewer loads per product */
        for (; l + 4 <= L; l += 4)
            for (int64_t g = 0; g < G; g += 2) {
                float r[8];
                _mm256_storeu_ps(r, qk4x2(qx + g * d, qx + (g + 1) * d, K, l, d, MODE));
                memcpy(sc + g * lmax + l, r, 4 * sizeof(float));
                memcpy(sc + (g + 1) * lmax + l, r + 4, 4 * sizeof(float));
            }
    }
    for (; l + 8 <= L; l += 8)
        for (int64_t g = 0; g < G; g++) _mm256_storeu_ps(sc + g * lmax + l, qk8(qx + g * d, K, l, d, MODE));
    for (; l < L; l++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t t = 0; t < d; t++) s += qb[g * d + t] * cache_at(K, l * d + t, BF);
            sc[g * lmax + l] = s;
        }
    for (int64_t g = 0; g < G; g++)
        for (int64_t l2 = L; l2 < lmax; l2++) sc[g * lmax + l2] = -__builtin_inff();
}

/* Step 1. For sequence b (of B) and kv head h: writes its new key and value (knew/vnew [B, kvh, d],
 * float32; rounded to bf16 in a bf16 cache) at position pos[b] of its cache, then scores[b, h, g, l] =
 * q[b, h, g, :] . K[l, :] for l <= pos[b] and -inf for pos[b] < l < lmax (q [B, kvh, G, d], already
 * scaled). Sequence b's cache of this layer: keys at element kptr[b] + h * hstride[b] + l * d (values
 * at vptr[b], same layout), float32 or (bf16kv) bfloat16 elements. Returns 0, or -1. */
TGT static int attn_scores(const float *q, const float *knew, const float *vnew, const int64_t *kptr,
                       const int64_t *vptr, const int64_t *pos, const int64_t *hstride, int64_t B, int64_t kvh,
                       int64_t G, int64_t d, float *scores, int64_t lmax, int nthreads, int bf16kv) {
    if (B < 1 || kvh < 1 || G < 1 || G > MAX_M || d < 8 || d % 8) return -1;
    for (int64_t b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= lmax || hstride[b] < (pos[b] + 1) * d) return -1;
    if (nthreads < 1) nthreads = 1;
    size_t es = bf16kv ? 2 : 4;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t item = 0; item < B * kvh; item++) {
        int64_t b = item / kvh, h = item % kvh;
        void *K = (char *)(intptr_t)kptr[b] + h * hstride[b] * es;
        void *V = (char *)(intptr_t)vptr[b] + h * hstride[b] * es;
        const float *qb = q + item * G * d, *kn = knew + item * d, *vn = vnew + item * d;
        float *sc = scores + item * G * lmax;
        if (!bf16kv) {
            scores_item(qb, qb, kn, vn, K, V, pos[b], G, d, sc, lmax, 0);
        } else if (d % 16 == 0 && G * d <= QP_MAX) {
            float qp[QP_MAX];
            permute16(qb, G * d, qp);
            scores_item(qb, qp, kn, vn, K, V, pos[b], G, d, sc, lmax, 2);
        } else {
            scores_item(qb, qb, kn, vn, K, V, pos[b], G, d, sc, lmax, 1);
        }
    }
    return 0;
}

int attn_scores_f32(const float *q, const float *knew, const float *vnew, const int64_t *kptr, const int64_t *vptr,
                    const int64_t *pos, const int64_t *hstride, int64_t B, int64_t kvh, int64_t G, int64_t d,
                    float *scores, int64_t lmax, int nthreads) {
    return attn_scores(q, knew, vnew, kptr, vptr, pos, hstride, B, kvh, G, d, scores, lmax, nthreads, 0);
}

int attn_scores_bf16kv(const float *q, const float *knew, const float *vnew, const int64_t *kptr,
                       const int64_t *vptr, const int64_t *pos, const int64_t *hstride, int64_t B, int64_t kvh,
                       int64_t G, int64_t d, float *scores, int64_t lmax, int nthreads) {
    return attn_scores(q, knew, vnew, kptr, vptr, pos, hstride, B, kvh, G, d, scores, lmax, nthreads, 1);
}

/* GB query rows x CW 8-float column chunks of one block of positions [l0, l1): ob[g, c..] += sum_l
 * p[g, l] * V[l, c..] (GB * CW accumulators in registers; constants in each instance). MODE 0: a
 * float32 cache; 1: bfloat16, widened in order; 2: bfloat16 with CW even and the columns of every
 * 16-column group of ob PERMUTED (its 8 even columns, then its 8 odd ones): one 256-bit load holds 16
 * bf16 values, and the even ones widen with a shift, the odd ones with a mask (two ALU ops per 16
 * values, where widening in order costs a zero-extending shuffle and a shift per 8; on Zen 4 the
 * shuffles compete with the FMAs). unpermute16 puts the columns back in order once the item is done. */
#define DEFINE_PV(NAME, GB, CW, MODE)                                                                     \
    TGT static void NAME(const float *pb, int64_t lmax, const void *V, int64_t d, int64_t l0, int64_t l1, \
                         int64_t c, float *ob) {                                                         \
        const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);                                           \
        __m256 acc[GB][CW];                                                                               \
        for (int g = 0; g < GB; g++)                                                                      \
            for (int w = 0; w < CW; w++) acc[g][w] = _mm256_loadu_ps(ob + g * d + c + 8 * w);             \
        for (int64_t l = l0; l < l1; l++) {                                                               \
            __m256 v[CW];                                                                                 \
            if (MODE == 2) {                                                                              \
                const uint16_t *row = (const uint16_t *)V + l * d + c;                                    \
                for (int w = 0; w + 1 < CW; w += 2) {                                                     \
                    __m256i u = _mm256_loadu_si256((const __m256i *)(row + 8 * w));                       \
                    v[w] = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));                                 \
                    v[w + 1] = _mm256_castsi256_ps(_mm256_and_si256(u, hi));                              \
                }                                                                                         \
            } else {                                                                                      \
                for (int w = 0; w < CW; w++) v[w] = LDC(MODE, V, l * d + c + 8 * w);                      \
            }                                                                                             \
            for (int g = 0; g < GB; g++) {                                                                \
                __m256 pg = _mm256_broadcast_ss(pb + g * lmax + l);                                       \
                for (int w = 0; w < CW; w++) acc[g][w] = _mm256_fmadd_ps(pg, v[w], acc[g][w]);            \
            }                                                                                             \
        }                                                                                                 \
        for (int g = 0; g < GB; g++)                                                                      \
            for (int w = 0; w < CW; w++) _mm256_storeu_ps(ob + g * d + c + 8 * w, acc[g][w]);             \
    }

DEFINE_PV(pv8x1, 8, 1, 0)
DEFINE_PV(pv4x2, 4, 2, 0)
DEFINE_PV(pv2x4, 2, 4, 0)
DEFINE_PV(pv1x8, 1, 8, 0)
DEFINE_PV(pv1x1, 1, 1, 0)
DEFINE_PV(pv8x1_bf, 8, 1, 1)
DEFINE_PV(pv4x2_bf, 4, 2, 1)
DEFINE_PV(pv2x4_bf, 2, 4, 1)
DEFINE_PV(pv1x8_bf, 1, 8, 1)
DEFINE_PV(pv1x1_bf, 1, 1, 1)

DEFINE_PV(pvp4x2, 4, 2, 2)
DEFINE_PV(pvp2x4, 2, 4, 2)
DEFINE_PV(pvp1x8, 1, 8, 2)

/* n floats (n % 16 == 0) in groups of 16 held as (8 even columns, 8 odd columns) -> in order */
TGT static void unpermute16(float *o, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __m256 e = _mm256_loadu_ps(o + i), q = _mm256_loadu_ps(o + i + 8);
        __m256 lo = _mm256_unpacklo_ps(e, q), hi = _mm256_unpackhi_ps(e, q); /* 0-3|8-11, 4-7|12-15 */
        _mm256_storeu_ps(o + i, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(o + i + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
}

typedef void (*pv_fn)(const float *, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, float *);

/* Step 2. out[b, h, g, :] = sum over l <= pos[b] of p[b, h, g, l] * V[l, :] (p [B, kvh, G, lmax], the
 * softmax of step 1's scores; out [B, kvh, G, d]). Values are read in blocks of 32 positions (at most
 * 16 KB) that stay in L1 while every query row and column chunk of the block is accumulated. */
TGT static int attn_values(const float *p, const int64_t *vptr, const int64_t *pos, const int64_t *hstride, int64_t B,
                       int64_t kvh, int64_t G, int64_t d, int64_t lmax, float *out, int nthreads, int bf16kv) {
    if (B < 1 || kvh < 1 || G < 1 || G > MAX_M || d < 8 || d % 8) return -1;
    /* the register tile with the widest column chunk that divides the columns (then the query rows):
     * a pass reading 64 contiguous floats of each value row streams far better than 8 query rows over 8
     * floats (measured at 8 query heads per kv head: 2.4-2.6 against 4.2 ms for 8 sequences x 4000
     * positions) */
    static const struct { int gb, cw; pv_fn fn[3]; } tiles[] = {
        {1, 8, {pv1x8, pv1x8_bf, pvp1x8}}, {2, 4, {pv2x4, pv2x4_bf, pvp2x4}}, {4, 2, {pv4x2, pv4x2_bf, pvp4x2}},
        {8, 1, {pv8x1, pv8x1_bf, NULL}}, {1, 1, {pv1x1, pv1x1_bf, NULL}}};
    int t = 0;
    while (G % tiles[t].gb || d % (8 * tiles[t].cw)) t++;
    int gb = tiles[t].gb, cw = tiles[t].cw;
    /* a bf16 cache: the permuted tile where there is one (even column chunks) */
    int perm = bf16kv && tiles[t].fn[2] != NULL;
    pv_fn fn = tiles[t].fn[perm ? 2 : bf16kv ? 1 : 0];
    size_t es = bf16kv ? 2 : 4;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t item = 0; item < B * kvh; item++) {
        int64_t b = item / kvh, h = item % kvh, L = pos[b] + 1;
        const void *V = (const char *)(intptr_t)vptr[b] + h * hstride[b] * es;
        const float *pb = p + item * G * lmax;
        float *ob = out + item * G * d;
        memset(ob, 0, G * d * sizeof(float));
        for (int64_t l0 = 0; l0 < L; l0 += 32) {
            int64_t l1 = l0 + 32 < L ? l0 + 32 : L;
            for (int64_t g = 0; g < G; g += gb)
                for (int64_t c = 0; c < d; c += 8 * cw) fn(pb + g * lmax, lmax, V, d, l0, l1, c, ob + g * d);
        }
        if (perm) unpermute16(ob, G * d);
    }
    return 0;
}

int attn_values_f32(const float *p, const int64_t *vptr, const int64_t *pos, const int64_t *hstride, int64_t B,
                    int64_t kvh, int64_t G, int64_t d, int64_t lmax, float *out, int nthreads) {
    return attn_values(p, vptr, pos, hstride, B, kvh, G, d, lmax, out, nthreads, 0);
}

int attn_values_bf16kv(const float *p, const int64_t *vptr, const int64_t *pos, const int64_t *hstride,
                       int64_t B, int64_t kvh, int64_t G, int64_t d, int64_t lmax, float *out, int nthreads) {
    return attn_values(p, vptr, pos, hstride, B, kvh, G, d, lmax, out, nthreads, 1);
}

#else /* not x86-64: nothing here; the Python side keeps torch's kernels */

int dsocr_kernels_x86(void) { return 0; }

#endif

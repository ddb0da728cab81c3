/* The CPU's integer-weight matmuls in C: x [rows, k] times a 4-bit or 8-bit weight [n, k] in groups
 * of 32 inputs.
 *
 * Why our own: torch's int4 kernel reads bfloat16 activations and rounds each group's scale and
 * zero to bfloat16 (about 3e-3 relative error on a layer's output, measured), its int8 kernel takes
 * one scale per row (a GGUF Q8_0 tensor's 32-input scales are requantized away), and with their
 * dispatch around them they cost a step more than reading the weights. Here each group of 32
 * activations of a row is quantized to 16-bit integers (scale = max |x| / 32767: about 2e-5 of the
 * group's largest value), multiplied by the integer weights in exact integer arithmetic, and the
 * group's integer sum is scaled in float32. Scales (and the 4-bit minimums) are stored as float16,
 * which holds a GGUF Q4_0/Q4_1/Q8_0 block's exactly, so such a weight is read as its file wrote it.
 *
 * Why the bits depend on nothing but a row's own inputs: a row's quantization reads that row
 * alone; a group's dot product is an exact 32-bit integer (converted to float32 with round to
 * nearest even, in plain C and vector code alike); and each output adds its groups' terms in group
 * order, each term as
 *     (d * dx) * isum + m * sx       (4-bit: weight = d * q + m, q in 0..15)
 *     (d * dx) * isum                (8-bit: weight = d * q, q in -127..127)
 * with IEEE multiplies and adds only (-ffp-contract=off). The vector code (AVX2: 8 outputs a
 * vector; AVX-512 with VNNI: a tile's 16) computes lane-wise with the same float operations in the
 * same order as the plain C code, and its integer sums are exact in any order, so the result is
 * the same on any x86-64 (tests compare each with the plain C code) and at any number of rows or
 * threads.
 *
 * Weight layouts (`cpu_native.pack_int4` / `pack_int8` write them): outputs in tiles of 16; per tile
 * and group of 32 inputs, for the 4-bit weights 256 bytes ordered [pair 8][output 16][e 2], the
 * byte holding input 2 * pair + e in its low nibble and input 16 + 2 * pair + e in its high nibble,
 * then 16 float16 scales d and 16 float16 minimums m; for the 8-bit weights 512 bytes ordered
 * [pair 16][output 16][e 2] (input 2 * pair + e), then 16 float16 scales d. A pair's 32 bytes are
 * one AVX-512 load, or two AVX2 loads of 8 outputs each.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define GROUP 32
#define TILE 16
#define INT4_BYTES 256 /* a tile's 16 x 32 4-bit weights, two to a byte */
#define INT8_BYTES 512
#define ROW_BLOCK 64 /* rows a thread takes through its tiles at once (their activations stay in cache) */
#define PARALLEL_WORK (1 << 18) /* multiply-adds a call must do before it wakes a second thread */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    float f;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else {
        f = (float)mantissa * 5.9604644775390625e-08f; /* a subnormal: mantissa * 2^-24, exact */
        return sign ? -f : f;
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float input_at(const void *x, int bf16, int64_t i) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One row's groups of 32 as 16-bit integers q, with each group's scale dx and dx * sum(q). */
static void quantize_row(const void *x, int bf16, int64_t k, int16_t *q, float *dx, float *sx) {
    for (int64_t g = 0; g < k / GROUP; g++) {
        float v[GROUP], amax = 0.0f;
        for (int i = 0; i < GROUP; i++) {
            v[i] = input_at(x, bf16, g * GROUP + i);
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        float scale = amax / 32767.0f, inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < GROUP; i++) {
            int32_t value = (int32_t)lrintf(v[i] * inverse); /* nearest, ties to even */
            q[g * GROUP + i] = (int16_t)value;
            total += value;
        }
        dx[g] = scale;
        sx[g] = scale * (float)total;
    }
}

typedef struct {
    const int16_t *q; /* [rows, k] */
    const float *dx, *sx; /* [rows, groups] */
    int64_t k, groups;
} Activations;

/* Rows r0..r1-1 of one 4-bit tile: out[r][0..15], in plain C. */
static void int4_tile_plain(const uint8_t *w, const uint16_t *s, const Activations *a, int64_t r0, int64_t r1, float *out,
                       int64_t out_stride) {
    for (int64_t r = r0; r < r1; r++) {
        float acc[TILE] = {0};
        const int16_t *q = a->q + r * a->k;
        for (int64_t g = 0; g < a->groups; g++) {
            const uint8_t *wg = w + g * INT4_BYTES;
            float dx = a->dx[r * a->groups + g], sx = a->sx[r * a->groups + g];
            for (int n = 0; n < TILE; n++) {
                int32_t isum = 0;
                for (int pair = 0; pair < 8; pair++) {
                    for (int e = 0; e < 2; e++) {
                        uint8_t byte = wg[pair * 32 + n * 2 + e];
                        isum += (int32_t)(byte & 0x0f) * q[g * GROUP + 2 * pair + e];
                        isum += (int32_t)(byte >> 4) * q[g * GROUP + 16 + 2 * pair + e];
                    }
                }
                float d = half_to_float(s[g * 32 + n]), m = half_to_float(s[g * 32 + 16 + n]);
                float term = (d * dx) * (float)isum;
                term = term + m * sx;
                acc[n] = acc[n] + term;
            }
        }
        memcpy(out + r * out_stride, acc, sizeof acc);
    }
}

/* Rows r0..r1-1 of one 8-bit tile: out[r][0..15], in plain C. */
static void int8_tile_plain(const uint8_t *w, const uint16_t *s, const Activations *a, int64_t r0, int64_t r1,
                            float *out, int64_t out_stride) {
    for (int64_t r = r0; r < r1; r++) {
        float acc[TILE] = {0};
        const int16_t *q = a->q + r * a->k;
        for (int64_t g = 0; g < a->groups; g++) {
            const int8_t *wg = (const int8_t *)w + g * INT8_BYTES;
            float dx = a->dx[r * a->groups + g];
            for (int n = 0; n < TILE; n++) {
                int32_t isum = 0;
                for (int pair = 0; pair < 16; pair++)
                    for (int e = 0; e < 2; e++)
                        isum += (int32_t)wg[pair * 32 + n * 2 + e] * q[g * GROUP + 2 * pair + e];
                float term = (half_to_float(s[g * 16 + n]) * dx) * (float)isum;
                acc[n] = acc[n] + term;
            }
        }
        memcpy(out + r * out_stride, acc, sizeof acc);
    }
}

#if defined(__x86_64__)
/* Activations x[0] and x[1] in each 32-bit lane. */
__attribute__((target("avx2"))) static inline __m256i broadcast_pair(const int16_t *x) {
    int32_t pair;
    memcpy(&pair, x, sizeof pair);
    return _mm256_set1_epi32(pair);
}

/* A group's 8 integer sums, as float32: sum over the 16 input pairs p of weights[p] (8 lanes of
 * (even, odd) 16-bit weights) times the pair x[2p], x[2p + 1]. Exact in 32 bits (|sum| < 2^28), and
 * converted with round to nearest even, as the plain C code's (float)isum. */
__attribute__((target("avx2"))) static inline __m256 group_dot(const __m256i weights[16], const int16_t *x) {
    __m256i even = _mm256_madd_epi16(weights[0], broadcast_pair(x));
    __m256i odd = _mm256_madd_epi16(weights[1], broadcast_pair(x + 2));
    for (int p = 2; p < 16; p += 2) {
        even = _mm256_add_epi32(even, _mm256_madd_epi16(weights[p], broadcast_pair(x + 2 * p)));
        odd = _mm256_add_epi32(odd, _mm256_madd_epi16(weights[p + 1], broadcast_pair(x + 2 * p + 2)));
    }
    return _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd));
}

/* Up to 4 rows' 16 outputs from their accumulators (two vectors of 8 each). */
__attribute__((target("avx2"))) static inline void store_rows(__m256 acc[4][2], int count, float *out,
                                                              int64_t out_stride) {
    for (int j = 0; j < count; j++) {
        _mm256_storeu_ps(out + j * out_stride, acc[j][0]);
        _mm256_storeu_ps(out + j * out_stride + 8, acc[j][1]);
    }
}

/* The same as int4_tile_plain, 8 outputs a vector: each group's 16 weight vectors are unpacked once
 * and used by 4 rows (`group_dot`). */
__attribute__((target("avx2,f16c"))) static void int4_tile_avx2(const uint8_t *w, const uint16_t *s, const Activations *a,
                                                          int64_t r0, int64_t r1, float *out, int64_t out_stride) {
    const __m256i low_nibble = _mm256_set1_epi16(0x0f);
    for (int64_t first = r0; first < r1; first += 4) {
        int count = r1 - first < 4 ? (int)(r1 - first) : 4;
        __m256 acc[4][2];
        for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
        for (int64_t g = 0; g < a->groups; g++) {
            for (int half = 0; half < 2; half++) {
                const uint8_t *wg = w + g * INT4_BYTES + half * 16;
                __m256i weights[16];
                for (int pair = 0; pair < 8; pair++) {
                    __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wg + 32 * pair)));
                    weights[pair] = _mm256_and_si256(bytes, low_nibble);
                    weights[8 + pair] = _mm256_srli_epi16(bytes, 4);
                }
                __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g * 32 + 8 * half)));
                __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g * 32 + 16 + 8 * half)));
                for (int j = 0; j < count; j++) {
                    int64_t r = first + j;
                    __m256 isum = group_dot(weights, a->q + r * a->k + g * GROUP);
                    __m256 dx = _mm256_set1_ps(a->dx[r * a->groups + g]), sx = _mm256_set1_ps(a->sx[r * a->groups + g]);
                    __m256 term = _mm256_mul_ps(_mm256_mul_ps(d, dx), isum);
                    term = _mm256_add_ps(term, _mm256_mul_ps(m, sx));
                    acc[j][half] = _mm256_add_ps(acc[j][half], term);
                }
            }
        }
        store_rows(acc, count, out + first * out_stride, out_stride);
    }
}

/* The same as int8_tile_plain, 8 outputs a vector, each group's 16 pairs of inputs sign-extended
 * once for 4 rows (`group_dot`). */
__attribute__((target("avx2,f16c"))) static void int8_tile_avx2(const uint8_t *w, const uint16_t *s,
                                                               const Activations *a, int64_t r0, int64_t r1,
                                                               float *out, int64_t out_stride) {
    for (int64_t first = r0; first < r1; first += 4) {
        int count = r1 - first < 4 ? (int)(r1 - first) : 4;
        __m256 acc[4][2];
        for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
        for (int64_t g = 0; g < a->groups; g++) {
            for (int half = 0; half < 2; half++) {
                const uint8_t *wg = w + g * INT8_BYTES + half * 16;
                __m256i weights[16];
                for (int pair = 0; pair < 16; pair++)
                    weights[pair] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + 32 * pair)));
                __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g * 16 + 8 * half)));
                for (int j = 0; j < count; j++) {
                    int64_t r = first + j;
                    __m256 isum = group_dot(weights, a->q + r * a->k + g * GROUP);
                    __m256 dx = _mm256_set1_ps(a->dx[r * a->groups + g]);
                    acc[j][half] = _mm256_add_ps(acc[j][half], _mm256_mul_ps(_mm256_mul_ps(d, dx), isum));
                }
            }
        }
        store_rows(acc, count, out + first * out_stride, out_stride);
    }
}

#define AVX512 "avx512f,avx512bw,avx512vl,avx512vnni,f16c"

/* `group_dot` for a whole tile: 16 outputs a vector, each pair's multiply and add one VNNI
 * instruction (vpdpwssd: exact, non-saturating 32-bit sums). */
__attribute__((target(AVX512))) static inline __m512 group_dot16(const __m512i weights[16], const int16_t *x) {
    int32_t pairs[16];
    memcpy(pairs, x, sizeof pairs);
    __m512i even = _mm512_dpwssd_epi32(_mm512_setzero_si512(), weights[0], _mm512_set1_epi32(pairs[0]));
    __m512i odd = _mm512_dpwssd_epi32(_mm512_setzero_si512(), weights[1], _mm512_set1_epi32(pairs[1]));
    for (int p = 2; p < 16; p += 2) {
        even = _mm512_dpwssd_epi32(even, weights[p], _mm512_set1_epi32(pairs[p]));
        odd = _mm512_dpwssd_epi32(odd, weights[p + 1], _mm512_set1_epi32(pairs[p + 1]));
    }
    return _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
}

/* The same as int4_tile_plain, a tile's 16 outputs a vector, each group's weights unpacked once
 * for 4 rows. */
__attribute__((target(AVX512))) static void int4_tile_avx512(const uint8_t *w, const uint16_t *s, const Activations *a,
                                                            int64_t r0, int64_t r1, float *out, int64_t out_stride) {
    const __m512i low_nibble = _mm512_set1_epi16(0x0f);
    for (int64_t first = r0; first < r1; first += 4) {
        int count = r1 - first < 4 ? (int)(r1 - first) : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t g = 0; g < a->groups; g++) {
            const uint8_t *wg = w + g * INT4_BYTES;
            __m512i weights[16];
            for (int pair = 0; pair < 8; pair++) {
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wg + 32 * pair)));
                weights[pair] = _mm512_and_si512(bytes, low_nibble);
                weights[8 + pair] = _mm512_srli_epi16(bytes, 4);
            }
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g * 32)));
            __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g * 32 + 16)));
            for (int j = 0; j < count; j++) {
                int64_t r = first + j;
                __m512 isum = group_dot16(weights, a->q + r * a->k + g * GROUP);
                __m512 dx = _mm512_set1_ps(a->dx[r * a->groups + g]), sx = _mm512_set1_ps(a->sx[r * a->groups + g]);
                __m512 term = _mm512_mul_ps(_mm512_mul_ps(d, dx), isum);
                term = _mm512_add_ps(term, _mm512_mul_ps(m, sx));
                acc[j] = _mm512_add_ps(acc[j], term);
            }
        }
        for (int j = 0; j < count; j++) _mm512_storeu_ps(out + (first + j) * out_stride, acc[j]);
    }
}

/* The same as int8_tile_plain, a tile's 16 outputs a vector. */
__attribute__((target(AVX512))) static void int8_tile_avx512(const uint8_t *w, const uint16_t *s, const Activations *a,
                                                            int64_t r0, int64_t r1, float *out, int64_t out_stride) {
    for (int64_t first = r0; first < r1; first += 4) {
        int count = r1 - first < 4 ? (int)(r1 - first) : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t g = 0; g < a->groups; g++) {
            const uint8_t *wg = w + g * INT8_BYTES;
            __m512i weights[16];
            for (int pair = 0; pair < 16; pair++)
                weights[pair] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wg + 32 * pair)));
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g * 16)));
            for (int j = 0; j < count; j++) {
                int64_t r = first + j;
                __m512 isum = group_dot16(weights, a->q + r * a->k + g * GROUP);
                __m512 dx = _mm512_set1_ps(a->dx[r * a->groups + g]);
                acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(_mm512_mul_ps(d, dx), isum));
            }
        }
        for (int j = 0; j < count; j++) _mm512_storeu_ps(out + (first + j) * out_stride, acc[j]);
    }
}

/* The widest code this CPU runs: 0 plain C, 1 AVX2, 2 AVX-512 with VNNI. */
int matmul_isa(void) {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") ? 1 : 0;
}
#else
int matmul_isa(void) { return 0; }
#endif

typedef void (*TileFn)(const uint8_t *, const uint16_t *, const Activations *, int64_t, int64_t, float *, int64_t);

/* A weight's tiles: their bytes and float16 scales a group, and the code that multiplies one, by
 * `matmul_isa` level. */
typedef struct {
    int64_t bytes, scales;
    TileFn tile[3];
} Format;

/* x [rows, k] (float32, or bfloat16 if x_bf16; rows x_stride elements apart) times a weight [n, k]
 * of `format` -> out float32 [rows, n]; k a multiple of 32, n of 16. The code is the widest this
 * CPU runs up to `max_isa` (tests run each level: the same bits). Returns 0, or -1 if out of
 * memory. */
static int matmul(const Format *format, const void *x, int x_bf16, int64_t x_stride, int64_t rows, int64_t k,
                  const uint8_t *weights, const uint16_t *scales, int64_t n, float *out, int max_isa) {
    int64_t groups = k / GROUP, tiles = n / TILE;
    int16_t *q = malloc((size_t)(rows * k) * sizeof *q);
    float *dx = malloc((size_t)(rows * groups) * sizeof *dx), *sx = malloc((size_t)(rows * groups) * sizeof *sx);
    if (!q || !dx || !sx) {
        free(q), free(dx), free(sx);
        return -1;
    }
    int element = x_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows * k >= GROUP * 64)
    for (int64_t r = 0; r < rows; r++)
        quantize_row((const char *)x + r * x_stride * element, x_bf16, k, q + r * k, dx + r * groups, sx + r * groups);
    Activations a = {q, dx, sx, k, groups};
    int isa = matmul_isa();
    TileFn tile = format->tile[isa < max_isa ? isa : max_isa];
#pragma omp parallel if (rows * n * k >= PARALLEL_WORK)
    {
#ifdef _OPENMP
        int thread = omp_get_thread_num(), threads = omp_get_num_threads();
#else
        int thread = 0, threads = 1;
#endif
        int64_t t0 = tiles * thread / threads, t1 = tiles * (thread + 1) / threads;
        for (int64_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
            int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
            for (int64_t t = t0; t < t1; t++)
                tile(weights + t * groups * format->bytes, scales + t * groups * format->scales, &a, r0, r1,
                     out + t * TILE, n);
        }
    }
    free(q), free(dx), free(sx);
    return 0;
}

#if defined(__x86_64__)
static const Format INT4 = {INT4_BYTES, 32, {int4_tile_plain, int4_tile_avx2, int4_tile_avx512}};
static const Format INT8 = {INT8_BYTES, 16, {int8_tile_plain, int8_tile_avx2, int8_tile_avx512}};
#else
static const Format INT4 = {INT4_BYTES, 32, {int4_tile_plain}};
static const Format INT8 = {INT8_BYTES, 16, {int8_tile_plain}};
#endif

int int4_linear(const void *x, int x_bf16, int64_t x_stride, int64_t rows, int64_t k, const uint8_t *weights,
                const uint16_t *scales, int64_t n, float *out, int max_isa) {
    return matmul(&INT4, x, x_bf16, x_stride, rows, k, weights, scales, n, out, max_isa);
}

int int8_linear(const void *x, int x_bf16, int64_t x_stride, int64_t rows, int64_t k, const uint8_t *weights,
                const uint16_t *scales, int64_t n, float *out, int max_isa) {
    return matmul(&INT8, x, x_bf16, x_stride, rows, k, weights, scales, n, out, max_isa);
}

/* The CPU's row ops in C: RMSNorm, SiLU-mul, RoPE and attention over the paged KV cache; and over
 * the logits, the greedy argmax and the log-softmax of logprobs.
 *
 * Why C: a decode step of a small model on a CPU is mostly host time, about 1,800 dispatched torch
 * ops of 2-5 us each (measured). One call per op here, each a loop over rows.
 *
 * Why the bits depend on nothing but a row's own inputs: every output row (every query of the
 * attention) is computed by the same code in the same order whatever the number of rows, and with
 * IEEE operations only: no fused multiply-add (compiled with -ffp-contract=off), no reassociation
 * (no -ffast-math), and exp as a polynomial of adds and multiplies (`exp_poly`). A vector lane then
 * gives the bits of the scalar code, so the results are the same whatever the compiler vectorizes,
 * on any x86-64 ISA level. Reductions run in LANES interleaved partial sums (element i goes to lane
 * i % LANES), folded pairwise (`fold`): the order is fixed by the row length alone.
 *
 * Attention: a query at position p attends to keys 0..p of its sequence, read through the block
 * table, with a two-pass softmax: the max over all its scores, then exp, the normalizer and the
 * weighted values summed in key order. A query is computed alike whether it is a decode, one of a
 * prefill chunk, or its keys were cached by an earlier request: it reads the same keys in the same
 * order. Every row is independent, so rows are shared among threads (OpenMP) freely.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define PARALLEL_WORK 32768 /* elements a call must touch before it wakes a second thread (about 10 us) */

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, NaN to 0x7fc0: torch's float -> bfloat16 conversion. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static void load_row(const void *src, int bf16, int64_t n, float *dst) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static void store_row(const float *src, int64_t n, void *dst, int bf16) {
    if (bf16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = float_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void *row_at(void *base, int bf16, int64_t index) {
    return (char *)base + index * (bf16 ? 2 : 4);
}

/* e^x from adds, multiplies and an exponent shift (Cephes' expf): within 2 ulp, 0 below -87,
 * e^88 above 88. */
static inline float exp_poly(float x) {
    float xc = x > 88.0f ? 88.0f : x;
    xc = xc < -87.0f ? -87.0f : xc;
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = (p * r) * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : y * scale;
}

/* Eight float lanes: GCC's generic vectors, lowered to whatever the ISA has (lane-wise IEEE ops). */
typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The LANES partial sums added pairwise, lane j + width to lane j, halving the width: a fixed
 * order of depth 4 (a fold in lane order would chain 15 dependent adds). As vector shuffles. */
static inline float fold(vec8 low, vec8 high) {
    vec8 a = low + high; /* lanes j and j + 8 */
    vec8 b = a + __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3);
    vec8 c = b + __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5);
    vec8 e = c + __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6);
    return e[0];
}

/* Sum of x[i] * y[i], i < n, in LANES interleaved partial sums (lane i % LANES), folded. */
static inline float dot(const float *x, const float *y, int64_t n) {
    vec8 low = {0}, high = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        low += load8(x + i) * load8(y + i);
        high += load8(x + i + 8) * load8(y + i + 8);
    }
    float tail[LANES] = {0};
    for (int j = 0; i + j < n; j++) tail[j] = x[i + j] * y[i + j];
    return fold(low + load8(tail), high + load8(tail + 8));
}

/* `dot` of x with eight rows y[0..7] at once: the same partial sums and the same pairwise fold,
 * done for the eight together by a transposing network (lane k of the result is dot(x, y[k])). The
 * rows' partial sums advance together, four rows at a time, so that the adds of different rows
 * overlap instead of each row's short chain waiting on its own previous add (a head is 64 wide:
 * four adds a chain). */
static inline __attribute__((always_inline)) vec8 dot8(const float *x, const float *const *y, int64_t n) {
    vec8 a[8];
    for (int k0 = 0; k0 < 8; k0 += 4) {
        vec8 low[4] = {{0}}, high[4] = {{0}};
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) {
            vec8 x_low = load8(x + i), x_high = load8(x + i + 8);
            for (int k = 0; k < 4; k++) {
                low[k] += x_low * load8(y[k0 + k] + i);
                high[k] += x_high * load8(y[k0 + k] + i + 8);
            }
        }
        for (int k = 0; k < 4; k++) {
            float tail[LANES] = {0};
            for (int j = 0; i + j < n; j++) tail[j] = x[i + j] * y[k0 + k][i + j];
            a[k0 + k] = (low[k] + load8(tail)) + (high[k] + load8(tail + 8)); /* lanes j and j + 8 */
        }
    }
    vec8 b[4], c[2];
    for (int k = 0; k < 4; k++) /* lanes j and j + 4: keys 2k, 2k + 1 in halves */
        b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int k = 0; k < 2; k++) /* lanes j and j + 2: keys 4k..4k + 3 in quarters */
        c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
               __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) + /* lanes 0 and 1 */
           __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

static inline float sum(const float *x, int64_t n) {
    vec8 low = {0}, high = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        low += load8(x + i);
        high += load8(x + i + 8);
    }
    float tail[LANES] = {0};
    for (int j = 0; i + j < n; j++) tail[j] = x[i + j];
    return fold(low + load8(tail), high + load8(tail + 8));
}

static void norm_row(const float *x, const float *weight, int64_t n, float eps, float *out) {
    float inv = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] * inv) * weight[i];
}

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for rows x[t] of n (row stride in elements). */
void rms_norm(const void *x, int x_bf16, int64_t x_stride, const float *weight, int64_t rows, int64_t n,
              float eps, void *out, int out_bf16) {
#pragma omp parallel if (rows > 1 && rows * n > PARALLEL_WORK)
    {
        float *row = malloc(2 * (size_t)n * sizeof(float)), *normed = row + n;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            load_row(row_at((void *)x, x_bf16, t * x_stride), x_bf16, n, row);
            norm_row(row, weight, n, eps, normed);
            store_row(normed, n, row_at(out, out_bf16, t * n), out_bf16);
        }
        free(row);
    }
}

/* total[t] = x[t] + residual[t] (float32, written to `total`), out[t] = rms_norm(total[t]). */
void add_rms_norm(const void *x, int x_bf16, int64_t x_stride, const float *residual, int64_t residual_stride,
                  const float *weight, int64_t rows, int64_t n, float eps, float *total, void *out, int out_bf16) {
#pragma omp parallel if (rows > 1 && rows * n > PARALLEL_WORK)
    {
        float *row = malloc(2 * (size_t)n * sizeof(float)), *normed = row + n;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            load_row(row_at((void *)x, x_bf16, t * x_stride), x_bf16, n, row);
            const float *res = residual + t * residual_stride;
            float *sum_row = total + t * n;
            for (int64_t i = 0; i < n; i++) sum_row[i] = row[i] + res[i];
            norm_row(sum_row, weight, n, eps, normed);
            store_row(normed, n, row_at(out, out_bf16, t * n), out_bf16);
        }
        free(row);
    }
}

/* out[t] = silu(gate) * up for x[t] = [gate | up] of 2 * n, silu(g) = g / (1 + e^-g). */
void silu_mul(const void *x, int x_bf16, int64_t x_stride, int64_t rows, int64_t n, void *out, int out_bf16) {
#pragma omp parallel if (rows > 1 && rows * n > PARALLEL_WORK)
    {
        float *row = malloc(3 * (size_t)n * sizeof(float)), *result = row + 2 * n;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            load_row(row_at((void *)x, x_bf16, t * x_stride), x_bf16, 2 * n, row);
            for (int64_t i = 0; i < n; i++) result[i] = exp_poly(-row[i]);
            for (int64_t i = 0; i < n; i++) result[i] = (row[i] / (result[i] + 1.0f)) * row[n + i];
            store_row(result, n, row_at(out, out_bf16, t * n), out_bf16);
        }
        free(row);
    }
}

/* Rotate-half RoPE of one row's `heads` heads of dim d, float32 x [heads, d] into y [heads, d], with
 * the row's (cos | cos) and (-sin | sin): y = x * cc + roll(x, d / 2) * ss, torch's order of ops. */
static void rope_row(const float *x, int64_t heads, int64_t d, const float *cc, const float *ss, float *y) {
    int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++, x += d, y += d) {
        for (int64_t i = 0; i < half; i++) y[i] = x[i] * cc[i] + x[i + half] * ss[i];
        for (int64_t i = half; i < d; i++) y[i] = x[i] * cc[i] + x[i - half] * ss[i];
    }
}

/* RoPE of rows' heads [rows, heads, d] at src (row stride src_stride) into float32 dst. */
void rope(const void *src, int src_bf16, int64_t src_stride, int64_t rows, int64_t heads, int64_t d,
          const float *cos_cos, const float *minus_sin_sin, float *dst) {
#pragma omp parallel if (rows > 1 && rows * heads * d > PARALLEL_WORK)
    {
        float *row = malloc((size_t)(heads * d) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            load_row(row_at((void *)src, src_bf16, t * src_stride), src_bf16, heads * d, row);
            rope_row(row, heads, d, cos_cos + t * d, minus_sin_sin + t * d, dst + t * heads * d);
        }
        free(row);
    }
}

/* Keys (float32 [rows, width], row stride k_stride) and values (float32 or bfloat16) of each row
 * into its cache slot: caches [slots, width]. */
void kv_store(const float *k, int64_t k_stride, const void *v, int v_bf16, int64_t v_stride, int64_t rows,
              int64_t width, const int64_t *slots, float *k_cache, float *v_cache) {
    for (int64_t t = 0; t < rows; t++) {
        memcpy(k_cache + slots[t] * width, k + t * k_stride, (size_t)width * sizeof(float));
        load_row(row_at((void *)v, v_bf16, t * v_stride), v_bf16, width, v_cache + slots[t] * width);
    }
}

/* Up to 4 heads' weighted values in dims j0..j0 + LANES - 1: out[g][j] = sum of p[g][i] * v_i[j] over
 * keys i in order, the accumulators held in registers across the keys. */
static void weigh_values(const float *scores, int64_t count, int64_t heads, const float *v_cache,
                         const int32_t *table, int64_t block_size, int64_t key_stride, int64_t offset, float *out,
                         int64_t d) {
    vec8 acc[4][2] = {{{0}}};
    for (int64_t start = 0; start < count; start += block_size) {
        const float *v = v_cache + (int64_t)table[start / block_size] * block_size * key_stride + offset;
        for (int64_t i = start; i < count && i < start + block_size; i++, v += key_stride) {
            vec8 low = load8(v), high = load8(v + 8);
            for (int64_t g = 0; g < 4; g++) {
                if (g < heads) {
                    float p = scores[g * count + i];
                    acc[g][0] += p * low;
                    acc[g][1] += p * high;
                }
            }
        }
    }
    for (int64_t g = 0; g < heads; g++) {
        memcpy(out + g * d, &acc[g][0], sizeof(vec8));
        memcpy(out + g * d + 8, &acc[g][1], sizeof(vec8));
    }
}

/* Ask the memory for one key's rows of a KV head (its key and its value) before they are read.
 * A decode step's keys and values come from memory, not cache (every layer's weights pass between
 * two reads of them), and a head's rows lie kv_heads * d apart: read only as they are needed, they
 * stall the attention (a batch-1 call took about twice as long with its cache flushed as warm, on
 * a Zen 1 core). The key PREFETCH_KEYS ahead of the one read is asked for, a key at a time (a
 * burst of a block's rows at once did not help). A prefetch changes no result. */
#define PREFETCH_KEYS 16
static inline void prefetch_key(const float *k_row, const float *v_row, int64_t d) {
    for (int64_t byte = 0; byte < d * (int64_t)sizeof(float); byte += 64) {
        __builtin_prefetch((const char *)k_row + byte);
        __builtin_prefetch((const char *)v_row + byte);
    }
}

/* One query row's heads of one KV head: G query heads q [G, d] against keys 0..count-1, whose
 * blocks are `table`; scores [G, count] is scratch, out [G, d]. */
static inline __attribute__((always_inline)) void attend_group_of(
    const float *q, int64_t group, int64_t d, const float *k_cache, const float *v_cache, const int32_t *table,
    int64_t block_size, int64_t kv_heads, int64_t kv_head, int64_t count, float scale, float *scores, float *out) {
    int64_t key_stride = kv_heads * d;
    const float *keys[8];
    /* a key's block and place in it (no division a key): the next one read, and the one asked for */
    int64_t block = 0, offset = 0, ahead_block = PREFETCH_KEYS / block_size, ahead_offset = PREFETCH_KEYS % block_size;
    for (int64_t i0 = 0; i0 < count; i0 += 8) {
        int64_t batch = count - i0 < 8 ? count - i0 : 8;
        for (int64_t k = 0; k < batch; k++) {
            if (i0 + k + PREFETCH_KEYS < count) {
                int64_t row = (((int64_t)table[ahead_block] * block_size + ahead_offset) * kv_heads + kv_head) * d;
                prefetch_key(k_cache + row, v_cache + row, d);
                if (++ahead_offset == block_size) ahead_offset = 0, ahead_block++;
            }
            keys[k] = k_cache + (((int64_t)table[block] * block_size + offset) * kv_heads + kv_head) * d;
            if (++offset == block_size) offset = 0, block++;
        }
        for (int64_t g = 0; g < group; g++) {
            float *s = scores + g * count + i0;
            if (batch == 8) {
                vec8 dots = dot8(q + g * d, keys, d) * scale;
                memcpy(s, &dots, sizeof dots);
            } else {
                for (int64_t k = 0; k < batch; k++) s[k] = dot(q + g * d, keys[k], d) * scale;
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * count, m = s[0];
        for (int64_t i = 1; i < count; i++) m = s[i] > m ? s[i] : m;
        for (int64_t i = 0; i < count; i++) s[i] = exp_poly(s[i] - m);
    }
    int64_t vector_dims = d - d % LANES;
    for (int64_t j0 = 0; j0 < vector_dims; j0 += LANES)
        for (int64_t g = 0; g < group; g += 4)
            weigh_values(scores + g * count, count, group - g < 4 ? group - g : 4, v_cache, table, block_size,
                         key_stride, kv_head * d + j0, out + g * d + j0, d);
    for (int64_t g = 0; g < group; g++)
        for (int64_t j = vector_dims; j < d; j++) {
            float o = 0.0f;
            for (int64_t i = 0; i < count; i++) {
                int64_t slot = (int64_t)table[i / block_size] * block_size + i % block_size;
                o += scores[g * count + i] * v_cache[(slot * kv_heads + kv_head) * d + j];
            }
            out[g * d + j] = o;
        }
    for (int64_t g = 0; g < group; g++) {
        float l = sum(scores + g * count, count), *o = out + g * d;
        for (int64_t j = 0; j < d; j++) o[j] = o[j] / l;
    }
}

/* `attend_group_of`, compiled apart for the common head sizes so that the loops over a head's
 * dims unroll (the same operations in the same order: the same bits). */
static void attend_group(const float *q, int64_t group, int64_t d, const float *k_cache, const float *v_cache,
                         const int32_t *table, int64_t block_size, int64_t kv_heads, int64_t kv_head, int64_t count,
                         float scale, float *scores, float *out) {
    if (d == 64)
        attend_group_of(q, group, 64, k_cache, v_cache, table, block_size, kv_heads, kv_head, count, scale, scores,
                        out);
    else if (d == 128)
        attend_group_of(q, group, 128, k_cache, v_cache, table, block_size, kv_heads, kv_head, count, scale, scores,
                        out);
    else
        attend_group_of(q, group, d, k_cache, v_cache, table, block_size, kv_heads, kv_head, count, scale, scores,
                        out);
}

/* Causal attention of q [rows, heads, d] (float32) over the paged cache [blocks, block_size,
 * kv_heads, d]: row t is the query at position positions[t] of sequence seqs[t], whose blocks are
 * block_tables[seqs[t]] (row stride table_stride). out [rows, heads, d], float32 or bfloat16. */
void attention(const float *q, const float *k_cache, const float *v_cache, int64_t block_size, int64_t kv_heads,
               int64_t heads, int64_t d, int64_t rows, const int32_t *block_tables, int64_t table_stride,
               const int32_t *seqs, const int64_t *positions, int64_t max_keys, float scale, void *out, int out_bf16) {
    int64_t group = heads / kv_heads;
#pragma omp parallel if (rows * kv_heads > 1 && rows * heads * max_keys * d > PARALLEL_WORK)
    {
        float *scores = malloc((size_t)(group * max_keys + group * d) * sizeof(float));
        float *result = scores + group * max_keys;
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t t = 0; t < rows; t++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                attend_group(q + (t * heads + h * group) * d, group, d, k_cache, v_cache,
                             block_tables + (int64_t)seqs[t] * table_stride, block_size, kv_heads, h,
                             positions[t] + 1, scale, scores, result);
                store_row(result, group * d, row_at(out, out_bf16, (t * heads + h * group) * d), out_bf16);
            }
        }
        free(scores);
    }
}

/* A step's attention in one call: each row's q and k rotated (RoPE), its k and v written to its
 * cache slot, then `attention` over the cache. q, k, v are rows of float32 or bfloat16 (row strides
 * given, heads contiguous within a row: views of the fused q|k|v projection). */
void rope_store_attention(const void *q, const void *k, const void *v, int qkv_bf16, int64_t q_stride,
                          int64_t k_stride, int64_t v_stride, int64_t rows, int64_t heads, int64_t kv_heads,
                          int64_t d, const float *cos_cos, const float *minus_sin_sin, const int64_t *slots,
                          float *k_cache, float *v_cache, int64_t block_size, const int32_t *block_tables,
                          int64_t table_stride, const int32_t *seqs, const int64_t *positions, int64_t max_keys,
                          float scale, void *out, int out_bf16) {
    int64_t width = kv_heads * d;
    float *row = malloc((size_t)((heads + kv_heads) * d) * sizeof(float));
    float *q_scratch = malloc((size_t)(rows * heads * d) * sizeof(float)); /* the rotated queries */
    for (int64_t t = 0; t < rows; t++) {
        const float *cc = cos_cos + t * d, *ss = minus_sin_sin + t * d;
        load_row(row_at((void *)q, qkv_bf16, t * q_stride), qkv_bf16, heads * d, row);
        rope_row(row, heads, d, cc, ss, q_scratch + t * heads * d);
        load_row(row_at((void *)k, qkv_bf16, t * k_stride), qkv_bf16, width, row);
        rope_row(row, kv_heads, d, cc, ss, k_cache + slots[t] * width);
        load_row(row_at((void *)v, qkv_bf16, t * v_stride), qkv_bf16, width, v_cache + slots[t] * width);
    }
    free(row);
    attention(q_scratch, k_cache, v_cache, block_size, kv_heads, heads, d, rows, block_tables, table_stride, seqs,
              positions, max_keys, scale, out, out_bf16);
    free(q_scratch);
}

/* The first index of the largest of x[0..n-1], a NaN counting as larger than any number (as
 * torch.argmax): a vector pass for the largest value (or whether there is a NaN), then a vector scan
 * for its first occurrence, SCAN elements a test. Exact, so a greedy token is the same whatever
 * computes it (torch's argmax takes 50-200 us over a 49k vocabulary here, this a few). */
#define SCAN 64
typedef int32_t ivec8 __attribute__((vector_size(32)));

static inline int matches(float value, float m, int nan) {
    return nan ? value != value : value == m;
}

/* The largest of x[0..n-1] (exact in any order), and whether any is a NaN (which it skips). */
static float max_of(const float *x, int64_t n, int *nan) {
    vec8 top = {x[0], x[0], x[0], x[0], x[0], x[0], x[0], x[0]};
    ivec8 nan8 = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        vec8 v = load8(x + i);
        ivec8 greater = v > top;
        top = (vec8)(((ivec8)v & greater) | ((ivec8)top & ~greater));
        nan8 |= v != v;
    }
    float m = top[0];
    *nan = 0;
    for (int j = 0; j < 8; j++) {
        m = top[j] > m ? top[j] : m;
        *nan |= nan8[j] != 0;
    }
    for (; i < n; i++) {
        m = x[i] > m ? x[i] : m;
        *nan |= x[i] != x[i];
    }
    return m;
}

static int64_t argmax_row(const float *x, int64_t n) {
    int nan;
    float m = max_of(x, n, &nan);
    vec8 target = {m, m, m, m, m, m, m, m};
    int64_t start = 0;
    for (; start + SCAN <= n; start += SCAN) {
        ivec8 hit = {0};
        for (int j = 0; j < SCAN; j += 8) {
            vec8 v = load8(x + start + j);
            hit |= nan ? v != v : v == target;
        }
        int any = 0;
        for (int j = 0; j < 8; j++) any |= hit[j] != 0;
        if (any) break;
    }
    for (int64_t i = start; i < n; i++)
        if (matches(x[i], m, nan)) return i;
    return 0;
}

/* out[r] = argmax_row of row r of x [rows, n] (float32, rows n apart). */
void argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * n, n);
}

/* ln x for x > 0 from IEEE operations (Cephes' logf: within about 1 ulp): frexpf splits off the
 * exponent exactly, a polynomial does the rest; libm's logf may differ by CPU (glibc picks an FMA
 * build where the CPU has FMA). */
static float log_poly(float x) {
    int e;
    float m = frexpf(x, &e); /* x = m * 2^e, m in [0.5, 1) */
    if (m < 0.707106781186547524f) {
        e -= 1;
        m = m + m - 1.0f;
    } else {
        m = m - 1.0f;
    }
    float z = m * m, y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    float fe = (float)e;
    y = y + fe * -2.12194440e-4f;
    y = y - 0.5f * z;
    return (m + y) + fe * 0.693359375f;
}

/* out = (x - m) - ln(sum of e^(x - m)) over a row of n, m its largest: the sum in LANES partial sums
 * (`sum`), so a row's bits depend on its own values and length alone, on any CPU. (torch's CPU
 * log-softmax picks its vector width, hence its summation order, by the CPU: AVX2 and AVX-512
 * machines reported different logprob bits for the same tokens, measured.) */
static void log_softmax_row(const float *x, int64_t n, float *out) {
    int nan;
    float m = max_of(x, n, &nan);
    for (int64_t i = 0; i < n; i++) out[i] = exp_poly(x[i] - m);
    float log_total = log_poly(sum(out, n));
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - m) - log_total;
}

/* log_softmax_row of each row of x [rows, n] (float32, rows n apart) -> out [rows, n]. */
void log_softmax(const float *x, int64_t rows, int64_t n, float *out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n > PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) log_softmax_row(x + r * n, n, out + r * n);
}

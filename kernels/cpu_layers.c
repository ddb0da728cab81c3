/* A dense Llama-family model's decoder layers in one call: the CPU's decode step without Python.
 *
 * Why: with every op of a layer in C, what was left of a batch-1 step outside the matmuls was the
 * Python between them, about 10 us a call and 12 calls a layer (measured). Here the same C functions
 * run in the same order on the same float32 buffers as the per-op path (`engine/models/llama.py`
 * with the C ops), so the bits are those of that path (a test compares them); this file adds no
 * arithmetic of its own beyond a bias add, elementwise as torch does it, and a sign flip.
 *
 * Per layer, for rows x [rows, hidden] and the residual stream:
 *   h = rms_norm(x) and residual = x (the first layer), else h = rms_norm(x + residual), residual += x
 *   qkv = h @ Wqkv (+ bias); attn = attention(rope(q), rope(k) and v into the cache)
 *   h = rms_norm(attn @ Wo + residual), residual += attn @ Wo
 *   x = silu_mul(h @ Wgate_up) @ Wdown
 * and last the model's final norm, out = rms_norm(x + residual), of the rows that give logits.
 * The step's rotation rows are gathered here from the model's cos | sin table (copies and a
 * negation, as `RotaryInputs.of` gathers them), and the final norm reads the rows that give logits
 * in place: the dozen torch ops Python ran around the call (5-10 us each on a Zen 1 core, caches
 * cold from the weights) are gone from the step.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* cpu_rows.c and cpu_matmul.c */
void rms_norm(const void *x, int x_bf16, int64_t x_stride, const float *weight, int64_t rows, int64_t n, float eps,
              void *out, int out_bf16);
void add_rms_norm(const void *x, int x_bf16, int64_t x_stride, const float *residual, int64_t residual_stride,
                  const float *weight, int64_t rows, int64_t n, float eps, float *total, void *out, int out_bf16);
void silu_mul(const void *x, int x_bf16, int64_t x_stride, int64_t rows, int64_t n, void *out, int out_bf16);
void rope_store_attention(const void *q, const void *k, const void *v, int qkv_bf16, int64_t q_stride,
                          int64_t k_stride, int64_t v_stride, int64_t rows, int64_t heads, int64_t kv_heads,
                          int64_t d, const float *cos_cos, const float *minus_sin_sin, const int64_t *slots,
                          float *k_cache, float *v_cache, int64_t block_size, const int32_t *block_tables,
                          int64_t table_stride, const int32_t *seqs, const int64_t *positions, int64_t max_keys,
                          float scale, void *out, int out_bf16);
int int4_linear(const void *x, int x_bf16, int64_t x_stride, int64_t rows, int64_t k, const uint8_t *weights,
                const uint16_t *scales, int64_t n, float *out, int max_isa);
int matmul_isa(void);

typedef struct {
    const uint8_t *nibbles;
    const uint16_t *scales;
} Int4Weight; /* packed by cpu_native.pack_int4 */

typedef struct {
    const float *input_norm, *post_attention_norm; /* [hidden] */
    const float *qkv_bias; /* [heads * d + 2 * kv_heads * d], or NULL */
    Int4Weight qkv, o, gate_up, down;
    float *k_cache, *v_cache; /* [blocks, block_size, kv_heads, d] */
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
} Shape;

typedef struct {
    const float *cos_sin; /* [max_positions, d]: each position's cos | sin halves */
    const int64_t *rope_positions; /* [rows]: each row's token position */
    const int64_t *slots; /* [rows]: each row's cache slot */
    const int32_t *block_tables, *seqs; /* the attention plan (cpu_native.NativePlan) */
    int64_t table_stride;
    const int64_t *positions;
    int64_t max_keys;
} Step;

static void add_bias(float *rows_out, int64_t rows, int64_t n, const float *bias) {
    for (int64_t t = 0; t < rows; t++)
        for (int64_t j = 0; j < n; j++) rows_out[t * n + j] = rows_out[t * n + j] + bias[j];
}

/* Each row's (cos | cos) and (-sin | sin) [rows, d], from its position's row of the cos | sin table. */
static void rotation_rows(const float *cos_sin, const int64_t *positions, int64_t rows, int64_t d, float *cos_cos,
                          float *minus_sin_sin) {
    int64_t half = d / 2;
    for (int64_t t = 0; t < rows; t++) {
        const float *cos = cos_sin + positions[t] * d, *sin = cos + half;
        float *cc = cos_cos + t * d, *ss = minus_sin_sin + t * d;
        for (int64_t i = 0; i < half; i++) {
            cc[i] = cc[half + i] = cos[i];
            ss[i] = -sin[i];
            ss[half + i] = sin[i];
        }
    }
}

/* A step's activations, each [rows, ...], in one allocation reused by every layer. */
typedef struct {
    float *residual, *h, *qkv, *attn, *gate_up, *act, *cos_cos, *minus_sin_sin;
} Activations;

static float *activations(const Shape *s, int64_t rows, Activations *a) {
    int64_t q_size = s->heads * s->head_dim, qkv_size = q_size + 2 * s->kv_heads * s->head_dim;
    int64_t sizes[8] = {s->hidden, s->hidden, qkv_size, q_size, 2 * s->intermediate, s->intermediate, s->head_dim,
                        s->head_dim};
    float **parts[8] = {&a->residual, &a->h, &a->qkv, &a->attn, &a->gate_up, &a->act, &a->cos_cos, &a->minus_sin_sin};
    int64_t total = 0;
    for (int i = 0; i < 8; i++) total += rows * sizes[i];
    float *block = malloc((size_t)total * sizeof(float));
    for (int64_t i = 0, offset = 0; block && i < 8; offset += rows * sizes[i], i++) *parts[i] = block + offset;
    return block;
}

/* One layer over x [rows, hidden] and the residual stream; returns 0, or -1 if out of memory. */
static int decoder_layer(const Layer *l, int first, const Shape *s, const Step *step, int64_t rows, float *x,
                         const Activations *a, int isa) {
    int64_t q_size = s->heads * s->head_dim, kv_size = s->kv_heads * s->head_dim, qkv_size = q_size + 2 * kv_size;
    int status = 0;
    if (first) {
        memcpy(a->residual, x, (size_t)(rows * s->hidden) * sizeof(float));
        rms_norm(x, 0, s->hidden, l->input_norm, rows, s->hidden, s->eps, a->h, 0);
    } else {
        add_rms_norm(x, 0, s->hidden, a->residual, s->hidden, l->input_norm, rows, s->hidden, s->eps, a->residual, a->h,
                     0);
    }
    status |= int4_linear(a->h, 0, s->hidden, rows, s->hidden, l->qkv.nibbles, l->qkv.scales, qkv_size, a->qkv, isa);
    if (l->qkv_bias) add_bias(a->qkv, rows, qkv_size, l->qkv_bias);
    rope_store_attention(a->qkv, a->qkv + q_size, a->qkv + q_size + kv_size, 0, qkv_size, qkv_size, qkv_size, rows,
                         s->heads, s->kv_heads, s->head_dim, a->cos_cos, a->minus_sin_sin, step->slots, l->k_cache,
                         l->v_cache, s->block_size, step->block_tables, step->table_stride, step->seqs,
                         step->positions, step->max_keys, s->scale, a->attn, 0);
    status |= int4_linear(a->attn, 0, q_size, rows, q_size, l->o.nibbles, l->o.scales, s->hidden, x, isa);
    add_rms_norm(x, 0, s->hidden, a->residual, s->hidden, l->post_attention_norm, rows, s->hidden, s->eps,
                 a->residual, a->h, 0);
    status |= int4_linear(a->h, 0, s->hidden, rows, s->hidden, l->gate_up.nibbles, l->gate_up.scales,
                          2 * s->intermediate, a->gate_up, isa);
    silu_mul(a->gate_up, 0, 2 * s->intermediate, rows, s->intermediate, a->act, 0);
    status |= int4_linear(a->act, 0, s->intermediate, rows, s->intermediate, l->down.nibbles, l->down.scales,
                          s->hidden, x, isa);
    return status;
}

/* x [rows, hidden]: the embeddings in, overwritten. out [num_out, hidden]: the final norm of rows
 * out_rows (each computed alone: the same bits as with the others). Returns 0, or -1 if out of
 * memory. */
int dense_layers(const Layer *layers, int64_t num_layers, const Shape *s, const Step *step, int64_t rows, float *x,
                 const float *final_norm, const int64_t *out_rows, int64_t num_out, float *out) {
    Activations a;
    float *block = activations(s, rows, &a);
    int status = block ? 0 : -1, isa = matmul_isa();
    if (status == 0) rotation_rows(step->cos_sin, step->rope_positions, rows, s->head_dim, a.cos_cos, a.minus_sin_sin);
    for (int64_t i = 0; i < num_layers && status == 0; i++)
        status = decoder_layer(&layers[i], i == 0, s, step, rows, x, &a, isa);
    for (int64_t j = 0; j < num_out && status == 0; j++) {
        int64_t r = out_rows[j];
        add_rms_norm(x + r * s->hidden, 0, s->hidden, a.residual + r * s->hidden, s->hidden, final_norm, 1, s->hidden,
                     s->eps, a.h, out + j * s->hidden, 0);
    }
    free(block);
    return status;
}

/* Paged attention on CPU: every query row attends over its sequence's K/V, read in place from the block pool.
 *
 * Pool layout (per layer): K and V are [num_blocks, block_size, kv_heads, head_dim]; token j of a sequence lives
 * in block tables[seq][j / block_size], row j % block_size. Row t of q ([rows, heads, head_dim]) belongs to
 * sequence row_seq[t] and sees its first row_len[t] tokens (a decode: all of them; a prefill row: up to itself).
 * Work is split over rows; each reads its blocks front to back (a block row holds every kv head, so the pool
 * streams from memory), computes the scores of every query head against its kv head (grouped-query attention),
 * a float32 softmax and the weighted sum of V, without copying K/V anywhere. float32 and bfloat16 (bf16 values
 * are the upper 16 bits of a float32; everything accumulates in float32; outputs are rounded to nearest even).
 * Built on first use with the system C compiler (attention_backends/kernel.py); no torch headers needed.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float bf16_load(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline uint16_t bf16_store(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

/* One query row over all heads: qf [hq, d] scaled queries, scores [hq, len] and acc [hq, d] float32 scratch.
 * Each block is read front to back (its rows hold every kv head side by side), so the pool streams from memory. */
#define DEFINE_ATTEND(NAME, T, LOAD, STORE)                                                                       \
    static void NAME(const T *restrict q, const T *restrict kc, const T *restrict vc,                             \
                     const int64_t *restrict table, int64_t len, T *restrict out, int64_t hq, int64_t hk,         \
                     int64_t d, int64_t bs, float scale, float *restrict scores, float *restrict qf,              \
                     float *restrict acc) {                                                                       \
        const int64_t group = hq / hk, stride = hk * d; /* stride: one token row of a block */                 \
        for (int64_t i = 0; i < hq * d; i++) qf[i] = LOAD(q[i]) * scale;                                        \
        for (int64_t b = 0; b * bs < len; b++) {                                                                  \
            const int64_t rows = len - b * bs < bs ? len - b * bs : bs;                                          \
            const T *restrict kb = kc + table[b] * bs * stride;                                                   \
            for (int64_t r = 0; r < rows; r++) {                                                                  \
                for (int64_t h = 0; h < hq; h++) {                                                                \
                    const T *restrict key = kb + r * stride + (h / group) * d;                                    \
                    const float *restrict qh = qf + h * d;                                                        \
                    float s = 0.0f;                                                                               \
                    _Pragma("omp simd reduction(+ : s)") for (int64_t x = 0; x < d; x++) s += qh[x] * LOAD(key[x]); \
                    scores[h * len + b * bs + r] = s;                                                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        for (int64_t h = 0; h < hq; h++) {                                                                        \
            float *restrict sh = scores + h * len, mx = -INFINITY, total = 0.0f;                                  \
            for (int64_t j = 0; j < len; j++) mx = sh[j] > mx ? sh[j] : mx;                                      \
            for (int64_t j = 0; j < len; j++) {                                                                   \
                sh[j] = expf(sh[j] - mx);                                                                         \
                total += sh[j];                                                                                   \
            }                                                                                                     \
            const float inv = 1.0f / total;                                                                       \
            for (int64_t j = 0; j < len; j++) sh[j] *= inv;                                                       \
            for (int64_t x = 0; x < d; x++) acc[h * d + x] = 0.0f;                                               \
        }                                                                                                         \
        for (int64_t b = 0; b * bs < len; b++) {                                                                  \
            const int64_t rows = len - b * bs < bs ? len - b * bs : bs;                                          \
            const T *restrict vb = vc + table[b] * bs * stride;                                                   \
            for (int64_t r = 0; r < rows; r++) {                                                                  \
                for (int64_t h = 0; h < hq; h++) {                                                                \
                    const float p = scores[h * len + b * bs + r];                                                 \
                    const T *restrict val = vb + r * stride + (h / group) * d;                                    \
                    float *restrict ah = acc + h * d;                                                             \
                    _Pragma("omp simd") for (int64_t x = 0; x < d; x++) ah[x] += p * LOAD(val[x]);                \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        for (int64_t i = 0; i < hq * d; i++) out[i] = STORE(acc[i]);                                             \
    }

DEFINE_ATTEND(attend_f32, float, f32_load, f32_store)
DEFINE_ATTEND(attend_bf16, uint16_t, bf16_load, bf16_store)

/* Every query row, split over `threads` OpenMP threads. Returns 0, or 1 when scratch allocation failed. */
#define DEFINE_ENTRY(NAME, T, ATTEND)                                                                             \
    int NAME(const T *q, const T *kc, const T *vc, const int64_t *tables, const int64_t *row_seq,                 \
             const int64_t *row_len, T *out, int64_t rows, int64_t hq, int64_t hk, int64_t d, int64_t bs,         \
             int64_t width, float scale, int threads) {                                                           \
        int failed = 0;                                                                                           \
        _Pragma("omp parallel num_threads(threads) reduction(| : failed)") {                                      \
            int64_t cap = 0;                                                                                      \
            float *scores = NULL, *work = (float *)malloc(sizeof(float) * (size_t)(2 * hq * d));                 \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t t = 0; t < rows; t++) {                          \
                const int64_t len = row_len[t];                                                                   \
                if (len > cap) {                                                                                  \
                    free(scores);                                                                                 \
                    scores = (float *)malloc(sizeof(float) * (size_t)(hq * len));                                 \
                    cap = scores == NULL ? 0 : len;                                                               \
                }                                                                                                 \
                if (scores == NULL || work == NULL) {                                                             \
                    failed = 1;                                                                                   \
                    continue;                                                                                     \
                }                                                                                                 \
                ATTEND(q + t * hq * d, kc, vc, tables + row_seq[t] * width, len, out + t * hq * d, hq, hk, d, bs, \
                       scale, scores, work, work + hq * d);                                                       \
            }                                                                                                     \
            free(scores);                                                                                         \
            free(work);                                                                                           \
        }                                                                                                         \
        return failed;                                                                                            \
    }

DEFINE_ENTRY(paged_attention_f32, float, attend_f32)
DEFINE_ENTRY(paged_attention_bf16, uint16_t, attend_bf16)

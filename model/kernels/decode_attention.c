/* Decode attention on the CPU: one new query token per sequence, over that sequence's cached keys and values.
 *
 * Each (sequence, KV head) pair is one task: the G query heads that share the KV head are scored against its
 * keys in one pass, softmaxed in float32, then summed over its values in a second pass. A task reads exactly
 * the tokens its sequence holds, never padding, and depends on nothing else in the batch, so a sequence's
 * result is the same whatever it is batched with. Every float sum runs in a fixed order.
 *
 * The cache is paged: a sequence's token t lives in row t % S of block table[t / S], for blocks of S tokens.
 * Every row's new key and value are written at its position len - 1 first; then each task attends over positions
 * [0, len). So rows that are successive positions of one sequence (several tokens verified in one step) each see
 * the ones before them, as one step per token would. A row with len 0 is padding: nothing is written and its
 * output is zero.
 *
 * Layouts (element strides are passed, so caches may be views):
 *   q, out              [B, Hkv, G, D]       contiguous
 *   k_new, v_new        [B, Hkv, D]          contiguous
 *   k, v                [blocks, Hkv, S, D]  one layer of the cache; rows of D contiguous
 *   host                [B, W]               per sequence: len, then its block table (W - 1 entries)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* A row of D elements as float32. */
static inline void load_row(const void *src, int bf16, int64_t D, float *dst) {
    if (!bf16) {
        memcpy(dst, src, sizeof(float) * (size_t)D);
        return;
    }
    const uint16_t *s = src;
    for (int64_t d = 0; d < D; d++) dst[d] = bf16_to_float(s[d]);
}

static inline float dot(const float *a, const float *b, int64_t D) {
#ifdef __AVX512F__
    if (D % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float lane[8] = {0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        for (int j = 0; j < 8; j++) lane[j] += a[d + j] * b[d + j];
    for (; d < D; d++) lane[0] += a[d] * b[d];
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

/* exp(x) for x <= 0 to about 2 ulp, in plain arithmetic so that the compiler vectorises it. */
static inline float exp_nonpositive(float x) {
    if (x < -87.0f) return 0.0f;
    const float n = nearbyintf(x * 1.44269504f); /* x = n ln 2 + r, |r| <= ln 2 / 2 */
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 5040 + r * (1.0f / 40320);
    p = 1.0f / 720 + r * p;
    p = 1.0f / 120 + r * p;
    p = 1.0f / 24 + r * p;
    p = 1.0f / 6 + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    int32_t bits = (int32_t)(n + 127.0f) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#ifdef __AVX512F__
#define MAX_G 8 /* query heads per KV head on the vector path */

static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The lane sums of 16 vectors, as one vector: out[j] = sum(v[j]), always added in the same order. */
static inline __m512 sum16(const __m512 *v) {
    __m512 s[8], w[4], y[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: v[2i] partials in elements 0, 2; v[2i + 1] in 1, 3 */
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: the partials of v[4i .. 4i + 3] */
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44), _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++) /* lanes 0-1 and 2-3 folded */
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88), _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

/* One task of the bfloat16 path, for D a multiple of 16 and G <= MAX_G: scores 16 keys at a time (each key row
 * converted once for all G query heads), softmax, then the values, each row converted once. */
#define ROW(blocks, l) ((blocks)[(l) / S] + ((l) % S) * D) /* token l's row, through the block table */

static void attend_task_bf16(const uint16_t *q, const uint16_t *const *keys, const uint16_t *const *values,
                             uint16_t *out, int64_t L, int64_t S, int64_t G, int64_t D, float scale, float *scratch) {
    const int64_t C = D / 16;
    float *qf = scratch, *scores = qf + G * D;                 /* [G, D], then [G, L rounded up to 16] */
    const int64_t Lp = (L + 15) / 16 * 16;
    for (int64_t i = 0; i < G * D; i++) qf[i] = bf16_to_float(q[i]) * scale;
    for (int64_t l0 = 0; l0 < L; l0 += 16) { /* 16 keys never straddle a block (S is a multiple of 16) */
        __m512 part[MAX_G][16];
        const uint16_t *group = ROW(keys, l0), *value_group = ROW(values, l0);
        const uint16_t *next = l0 + 16 < L ? ROW(keys, l0 + 16) : group;
        for (int j = 0; j < 16; j++) {
            for (int64_t g = 0; g < G; g++) part[g][j] = _mm512_setzero_ps();
            if (l0 + j >= L) continue;
            const uint16_t *row = group + j * D;
            const uint16_t *ahead = l0 + j + 16 < L ? next + j * D : row, *value = value_group + j * D;
            for (int64_t o = 0; o < 2 * D; o += 64) { /* 16 rows ahead, and the values for later: both in flight */
                _mm_prefetch((const char *)ahead + o, _MM_HINT_T0);
                _mm_prefetch((const char *)value + o, _MM_HINT_T1);
            }
#ifdef __AVX512BF16__
            if (D % 32 == 0) { /* bfloat16 pairs multiplied exactly, summed in float32 */
                for (int64_t c = 0; c < D / 32; c++) {
                    const __m512bh k = (__m512bh)_mm512_loadu_si512(row + 32 * c);
                    for (int64_t g = 0; g < G; g++)
                        part[g][j] = _mm512_dpbf16_ps(part[g][j], (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c), k);
                }
                continue;
            }
#endif
            for (int64_t c = 0; c < C; c++) {
                const __m512 k = bf16x16(row + 16 * c);
                for (int64_t g = 0; g < G; g++)
                    part[g][j] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + 16 * c), k, part[g][j]);
            }
        }
        for (int64_t g = 0; g < G; g++) _mm512_storeu_ps(scores + g * Lp + l0, sum16(part[g]));
    }
#ifdef __AVX512BF16__
    if (D % 32 == 0) /* the scale, applied to the sums rather than to q (which stays exact in bfloat16) */
        for (int64_t i = 0; i < G * Lp; i++) scores[i] *= scale;
#endif
    for (int64_t g = 0; g < G; g++) {
        float *sc = scores + g * Lp, top = sc[0], total = 0.0f;
        for (int64_t l = 1; l < L; l++) top = sc[l] > top ? sc[l] : top;
        for (int64_t l = 0; l < L; l++) sc[l] = exp_nonpositive(sc[l] - top);
        for (int64_t l = 0; l < L; l++) total += sc[l];
        const float inverse = 1.0f / total;
        for (int64_t l = 0; l < L; l++) sc[l] *= inverse;
    }
    const int64_t CB = G <= 4 ? 4 : 2; /* 16-wide chunks of a value row per pass: G x CB accumulators */
    for (int64_t c0 = 0; c0 < C; c0 += CB) {
        const int64_t cn = C - c0 < CB ? C - c0 : CB;
        __m512 acc[MAX_G][4];
        for (int64_t g = 0; g < G; g++)
            for (int64_t c = 0; c < cn; c++) acc[g][c] = _mm512_setzero_ps();
        for (int64_t b0 = 0; b0 < L; b0 += S) { /* block by block: a row's address is one add */
            const uint16_t *block = values[b0 / S];
            const int64_t end = b0 + S < L ? b0 + S : L;
            for (int64_t l = b0; l < end; l++) {
                const uint16_t *row = block + (l - b0) * D;
                for (int64_t c = 0; c < cn; c++) {
                    const __m512 v = bf16x16(row + 16 * (c0 + c));
                    for (int64_t g = 0; g < G; g++)
                        acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * Lp + l]), v, acc[g][c]);
                }
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t c = 0; c < cn; c++) {
                float lanes[16];
                _mm512_storeu_ps(lanes, acc[g][c]);
                for (int i = 0; i < 16; i++) out[g * D + 16 * (c0 + c) + i] = float_to_bf16(lanes[i]);
            }
    }
}
#endif

static void attend(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                   const int64_t *host, int64_t W, int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t S,
                   int64_t block_stride, int64_t head_stride, float scale, int bf16) {
    const size_t elem = bf16 ? 2 : 4;
    /* Every row's new key and value first, then the attention: a row may attend to another row's new token, when
     * rows are successive positions of one sequence (verifying several proposed tokens in one step), exactly as
     * if they had been decoded one step at a time. */
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t L = host[b * W], *table = host + b * W + 1;
            if (L <= 0) continue;
            const int64_t at = table[(L - 1) / S] * block_stride + h * head_stride + (L - 1) % S * D;
            memcpy((char *)k + elem * at, (const char *)k_new + elem * (b * Hkv + h) * D, elem * (size_t)D);
            memcpy((char *)v + elem * at, (const char *)v_new + elem * (b * Hkv + h) * D, elem * (size_t)D);
        }
    }
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t L = host[b * W], *table = host + b * W + 1, task = (b * Hkv + h) * G * D;
            if (L <= 0) {
                memset((char *)out + elem * task, 0, elem * (size_t)(G * D));
                continue;
            }
            const int64_t nb = (L + S - 1) / S;
            char **keys = malloc(2 * sizeof(char *) * (size_t)nb), **values = keys + nb; /* this head's blocks */
            for (int64_t j = 0; j < nb; j++) {
                keys[j] = (char *)k + elem * (table[j] * block_stride + h * head_stride);
                values[j] = (char *)v + elem * (table[j] * block_stride + h * head_stride);
            }
#ifdef __AVX512F__
            if (bf16 && D % 16 == 0 && G <= MAX_G && S % 16 == 0) {
                float *scratch = malloc(sizeof(float) * (size_t)(G * D + G * ((L + 15) / 16 * 16)));
                attend_task_bf16((const uint16_t *)q + task, (const uint16_t *const *)keys,
                                 (const uint16_t *const *)values, (uint16_t *)out + task, L, S, G, D, scale, scratch);
                free(scratch);
                free(keys);
                continue;
            }
#endif
            float *qf = malloc(sizeof(float) * (size_t)(3 * G * D + D + G * L));
            float *acc = qf + G * D, *row = acc + G * D, *tmp = row + D, *scores = tmp + G * D;
            load_row((const char *)q + elem * task, bf16, G * D, qf);
            for (int64_t i = 0; i < G * D; i++) { qf[i] *= scale; acc[i] = 0.0f; }
            for (int64_t l = 0; l < L; l++) {
                load_row(keys[l / S] + elem * (l % S) * D, bf16, D, row);
                for (int64_t g = 0; g < G; g++) scores[g * L + l] = dot(qf + g * D, row, D);
            }
            for (int64_t g = 0; g < G; g++) {
                float *s = scores + g * L, top = s[0], total = 0.0f;
                for (int64_t l = 1; l < L; l++) top = s[l] > top ? s[l] : top;
                for (int64_t l = 0; l < L; l++) s[l] = exp_nonpositive(s[l] - top);
                for (int64_t l = 0; l < L; l++) total += s[l];
                for (int64_t l = 0; l < L; l++) s[l] /= total;
            }
            for (int64_t l = 0; l < L; l++) {
                load_row(values[l / S] + elem * (l % S) * D, bf16, D, row);
                for (int64_t g = 0; g < G; g++) {
                    const float p = scores[g * L + l];
                    float *a = acc + g * D;
                    for (int64_t d = 0; d < D; d++) a[d] += p * row[d];
                }
            }
            if (bf16) {
                uint16_t *o = (uint16_t *)out + task;
                for (int64_t i = 0; i < G * D; i++) o[i] = float_to_bf16(acc[i]);
            } else {
                memcpy((float *)out + task, acc, sizeof(float) * (size_t)(G * D));
            }
            free(qf);
            free(keys);
        }
    }
}

void decode_attention_bf16(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                           const int64_t *host, int64_t W, int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t S,
                           int64_t block_stride, int64_t head_stride, float scale) {
    attend(q, k_new, v_new, k, v, out, host, W, B, Hkv, G, D, S, block_stride, head_stride, scale, 1);
}

void decode_attention_f32(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                          const int64_t *host, int64_t W, int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t S,
                          int64_t block_stride, int64_t head_stride, float scale) {
    attend(q, k_new, v_new, k, v, out, host, W, B, Hkv, G, D, S, block_stride, head_stride, scale, 0);
}

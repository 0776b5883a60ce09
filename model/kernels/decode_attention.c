/* Decode attention on the CPU: one new query token per sequence, over that sequence's cached keys and values.
 *
 * Each (sequence, KV head) pair is one task: the G query heads that share the KV head are scored against its
 * keys in one pass, softmaxed in float32, then summed over its values in a second pass. A task reads exactly
 * the tokens its sequence holds, never padding, and depends on nothing else in the batch, so a sequence's
 * result is the same whatever it is batched with. Every float sum runs in a fixed order.
 *
 * Each task first writes its sequence's new key and value at position lens - 1 of its slot, then attends over
 * positions [0, lens). A row with lens 0 is padding: nothing is written and its output is zero.
 *
 * Layouts (element strides are passed, so caches may be views):
 *   q, out              [B, Hkv, G, D]     contiguous
 *   k_new, v_new        [B, Hkv, D]        contiguous
 *   k, v                [slots, Hkv, L, D] one layer of the cache; rows of D contiguous
 *   slots, lens         [B]                the cache slot and the number of tokens each sequence attends to
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

static void attend(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                   const int64_t *slots, const int64_t *lens, int64_t B, int64_t Hkv, int64_t G, int64_t D,
                   int64_t slot_stride, int64_t head_stride, float scale, int bf16) {
    const size_t elem = bf16 ? 2 : 4;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t L = lens[b], base = slots[b] * slot_stride + h * head_stride, task = (b * Hkv + h) * G * D;
            if (L <= 0) {
                memset((char *)out + elem * task, 0, elem * (size_t)(G * D));
                continue;
            }
            char *keys = (char *)k + elem * base, *values = (char *)v + elem * base;
            memcpy(keys + elem * (L - 1) * D, (const char *)k_new + elem * (b * Hkv + h) * D, elem * (size_t)D);
            memcpy(values + elem * (L - 1) * D, (const char *)v_new + elem * (b * Hkv + h) * D, elem * (size_t)D);
            float *qf = malloc(sizeof(float) * (size_t)(3 * G * D + D + G * L));
            float *acc = qf + G * D, *row = acc + G * D, *tmp = row + D, *scores = tmp + G * D;
            load_row((const char *)q + elem * task, bf16, G * D, qf);
            for (int64_t i = 0; i < G * D; i++) { qf[i] *= scale; acc[i] = 0.0f; }
            for (int64_t l = 0; l < L; l++) {
                load_row(keys + elem * l * D, bf16, D, row);
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
                load_row(values + elem * l * D, bf16, D, row);
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
        }
    }
}

void decode_attention_bf16(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                           const int64_t *slots, const int64_t *lens, int64_t B, int64_t Hkv, int64_t G, int64_t D,
                           int64_t slot_stride, int64_t head_stride, float scale) {
    attend(q, k_new, v_new, k, v, out, slots, lens, B, Hkv, G, D, slot_stride, head_stride, scale, 1);
}

void decode_attention_f32(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                          const int64_t *slots, const int64_t *lens, int64_t B, int64_t Hkv, int64_t G, int64_t D,
                          int64_t slot_stride, int64_t head_stride, float scale) {
    attend(q, k_new, v_new, k, v, out, slots, lens, B, Hkv, G, D, slot_stride, head_stride, scale, 0);
}

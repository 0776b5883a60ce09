/* The decode step's elementwise work on bfloat16 activations: RMSNorm, rotary embeddings and SiLU times up.
 *
 * Eager mode and a compiled step call these same functions (the compiled step through compiled_ops.c), so the two
 * compute the same bits, and Inductor has no kernels of its own to generate for them: most of a cold compile was
 * generating and building C++ for these few operations, once per layer. Each row is computed on its own, in
 * float32, and rounded to bfloat16 (nearest even) once per value written, the norm as the reference models do it:
 * the normalised value is rounded before the gain multiplies it. Rows are independent of each other, so results
 * do not depend on the batch or the number of threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define PARALLEL_ABOVE 65536 /* elements: below this, one thread (an OpenMP region costs more than the work) */

static inline __m512 load16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store16(uint16_t *p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* bfloat16 rounding of float32 values, as a float32 (what the norm's gain multiplies) */
static inline __m512 round_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* out = w * bf16(x / sqrt(mean(x^2) + eps)), per row of D. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t N, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (N * D > PARALLEL_ABOVE)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = x + n * D;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 16) {
            const __m512 v = load16(row + i, lanes(D - i));
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)D + eps);
        for (int64_t i = 0; i < D; i += 16) {
            const __mmask16 m = lanes(D - i);
            const __m512 normed = round_bf16(_mm512_mul_ps(load16(row + i, m), _mm512_set1_ps(scale)));
            store16(out + n * D + i, _mm512_mul_ps(load16(w + i, m), normed), m);
        }
    }
}

/* e^x for float32 lanes: x = k ln 2 + r with |r| <= ln 2 / 2, e^r by its Taylor series to r^7 (error below
 * float32's rounding), times 2^k. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x); /* ln 2 in two parts: k times the first is exact */
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

/* gate_up [N, 2H] (gate, then up, per row) -> out [N, H] = silu(gate) * up, one rounding. */
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t N, int64_t H) {
#pragma omp parallel for schedule(static) if (N * H > PARALLEL_ABOVE)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *gate = gate_up + n * 2 * H, *up = gate + H;
        for (int64_t i = 0; i < H; i += 16) {
            const __mmask16 m = lanes(H - i);
            const __m512 g = load16(gate + i, m);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            store16(out + n * H + i, _mm512_mul_ps(silu, load16(up + i, m)), m);
        }
    }
}

/* x [N, heads, D] (rows `stride` elements apart, heads contiguous) rotated by cos, sin [N, D / 2] (float32):
 * out [N, heads, D] = (x1 cos - x2 sin, x2 cos + x1 sin) with x1, x2 the halves of each head. */
void rope_bf16(const uint16_t *x, int64_t stride, const float *cos, const float *sin, uint16_t *out, int64_t N,
               int64_t heads, int64_t D) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (N * heads * D > PARALLEL_ABOVE)
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *in = x + n * stride + h * D;
            uint16_t *o = out + (n * heads + h) * D;
            for (int64_t i = 0; i < half; i += 16) {
                const __mmask16 m = lanes(half - i);
                const __m512 c = _mm512_maskz_loadu_ps(m, cos + n * half + i);
                const __m512 s = _mm512_maskz_loadu_ps(m, sin + n * half + i);
                const __m512 x1 = load16(in + i, m), x2 = load16(in + half + i, m);
                store16(o + i, _mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s)), m);
                store16(o + half + i, _mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s)), m);
            }
        }
}

/* Weight-only quantised linear layers on the CPU: y = x W^T, x in bfloat16, W stored at 4 or 8 bits.
 *
 * W is cut into tiles of 16 output features by groups of 32 input features; a group has its own float32
 * scale (and, at 4 bits, offset): a weight is d q + m for a code q in [0, 16), or d q for q in [-127, 127].
 * The codes are exact in bfloat16, so each group's dot product runs on `vdpbf16ps` (products of bfloat16
 * pairs summed in float32) and the group's scale is applied once, in float32: out += d (x . q) + m sum(x).
 *
 * Every output row is computed on its own, by the same sequence of operations whatever the number of rows:
 * blocks of rows only interleave independent chains. So a row's result does not depend on its batch.
 *
 * Layouts (T = N / 16 tiles, G = K / 32 groups):
 *   x        [M, K] bfloat16, rows contiguous
 *   4 bits:  codes uint8 [T, G, 8, 32]: byte i of chunk c is output feature i / 2 of the tile, input feature
 *            2c + i % 2 of the group in its low nibble and 16 + 2c + i % 2 in its high nibble;
 *            params float [T, G, 2, 16]: d, then m, of the tile's 16 features
 *   8 bits:  codes int8 [T, G, 16, 32]: pair p holds input features 2p, 2p + 1 of the group as
 *            (feature 0, 2p), (feature 0, 2p + 1), (feature 1, 2p), ...; params float [T, G, 16]: d
 *   out      [M, N] bfloat16 (rounded to nearest even) or float32
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16
#define GROUP 32
#define ROWS 6 /* rows per block: 3 accumulators each, within the 32 vector registers */

static inline __m512bh broadcast_pair(const uint16_t *x) {
    int32_t pair;
    memcpy(&pair, x, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(pair);
}

static inline void store_row(void *out, int out_float, int64_t index, __m512 value) {
    if (out_float)
        _mm512_storeu_ps((float *)out + index, value);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + index), (__m256i)_mm512_cvtneps_pbh(value));
}

/* sum(x) over each group of 32, in float32 and a fixed order: [M, G]. */
static void group_sums(const uint16_t *x, int64_t M, int64_t K, float *sums) {
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < K / GROUP; g++) {
            const uint16_t *src = x + r * K + g * GROUP;
            __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
            __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + 16))), 16));
            sums[r * (K / GROUP) + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
}

/* R rows (R <= ROWS) of one 4-bit tile. Two chains per row (a group's first and second 16 input features). */
static inline __attribute__((always_inline)) void tile_w4(const uint16_t *x, int64_t K, int R, const uint8_t *codes,
                                                          const float *params, const float *sums, __m512 *acc) {
    const int64_t G = K / GROUP;
    const __m512i low = _mm512_set1_epi16(0x000F);
    uint16_t values[32] = {0};
    for (int i = 0; i < 16; i++) { /* code -> bfloat16(code), exact */
        float f = (float)i;
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        values[i] = (uint16_t)(bits >> 16);
    }
    const __m512i table = _mm512_loadu_si512(values);
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 lo[ROWS], hi[ROWS];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();
        const uint8_t *chunk = codes + g * 8 * 32;
        for (int c = 0; c < 8; c++) {
            __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(chunk + c * 32)));
            __m512bh wl = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
            __m512bh wh = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
            for (int r = 0; r < R; r++) {
                const uint16_t *xr = x + r * K + g * GROUP + 2 * c;
                lo[r] = _mm512_dpbf16_ps(lo[r], wl, broadcast_pair(xr));
                hi[r] = _mm512_dpbf16_ps(hi[r], wh, broadcast_pair(xr + 16));
            }
        }
        const __m512 d = _mm512_loadu_ps(params + g * 32), m = _mm512_loadu_ps(params + g * 32 + 16);
        for (int r = 0; r < R; r++) {
            acc[r] = _mm512_fmadd_ps(d, _mm512_add_ps(lo[r], hi[r]), acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[r * G + g]), acc[r]);
        }
    }
}

/* Pair p of an 8-bit group as bfloat16 (exact: |q| <= 127). */
static inline __m512bh unpack_pair_w8(const int8_t *pair) {
    __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)pair)));
    __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(pair + 16))));
    return _mm512_cvtne2ps_pbh(b, a);
}

/* R rows of one 8-bit tile, its pairs converted here (`unpacked` NULL) or read from a tile converted once for all
 * rows: the same bfloat16 values either way, so the same results. Two chains per row (even and odd pairs). */
static inline __attribute__((always_inline)) void tile_w8(const uint16_t *x, int64_t K, int R, const int8_t *codes,
                                                          const __m512bh *unpacked, const float *params, __m512 *acc) {
    const int64_t G = K / GROUP;
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 even[ROWS], odd[ROWS];
        for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
        for (int p = 0; p < 16; p += 2) {
            __m512bh wa, wb;
            if (unpacked) {
                wa = unpacked[g * 16 + p];
                wb = unpacked[g * 16 + p + 1];
            } else {
                wa = unpack_pair_w8(codes + (g * 16 + p) * 32);
                wb = unpack_pair_w8(codes + (g * 16 + p + 1) * 32);
            }
            for (int r = 0; r < R; r++) {
                const uint16_t *xr = x + r * K + g * GROUP + 2 * p;
                even[r] = _mm512_dpbf16_ps(even[r], wa, broadcast_pair(xr));
                odd[r] = _mm512_dpbf16_ps(odd[r], wb, broadcast_pair(xr + 2));
            }
        }
        const __m512 d = _mm512_loadu_ps(params + g * 16);
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(d, _mm512_add_ps(even[r], odd[r]), acc[r]);
    }
}

#define DISPATCH(CALL)                                    \
    switch (R) {                                          \
    case 1: { const int R_ = 1; CALL; } break;            \
    case 2: { const int R_ = 2; CALL; } break;            \
    case 3: { const int R_ = 3; CALL; } break;            \
    case 4: { const int R_ = 4; CALL; } break;            \
    case 5: { const int R_ = 5; CALL; } break;            \
    default: { const int R_ = ROWS; CALL; } break;        \
    }

void packed_linear_w4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const float *params, int64_t N,
                      void *out, int out_float) {
    const int64_t G = K / GROUP, T = N / TILE;
    float *sums = malloc(sizeof(float) * (size_t)(M * G > 0 ? M * G : 1));
    group_sums(x, M, K, sums);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
            const int R = M - r0 < ROWS ? (int)(M - r0) : ROWS;
            __m512 acc[ROWS];
            DISPATCH(tile_w4(x + r0 * K, K, R_, codes + t * G * 256, params + t * G * 32, sums + r0 * G, acc))
            for (int r = 0; r < R; r++) store_row(out, out_float, (r0 + r) * N + t * TILE, acc[r]);
        }
    }
    free(sums);
}

void packed_linear_w8(const uint16_t *x, int64_t M, int64_t K, const int8_t *codes, const float *params, int64_t N,
                      void *out, int out_float) {
    const int64_t G = K / GROUP, T = N / TILE;
#pragma omp parallel
    {
        /* With more than one block of rows, each tile is converted once (the conversion costs more than 4 bits'). */
        __m512bh *unpacked = M > ROWS ? aligned_alloc(64, sizeof(__m512bh) * (size_t)(16 * G)) : NULL;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const int8_t *tile = codes + t * G * 512;
            if (unpacked)
                for (int64_t i = 0; i < 16 * G; i++) unpacked[i] = unpack_pair_w8(tile + i * 32);
            for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
                const int R = M - r0 < ROWS ? (int)(M - r0) : ROWS;
                __m512 acc[ROWS];
                DISPATCH(tile_w8(x + r0 * K, K, R_, tile, unpacked, params + t * G * 16, acc))
                for (int r = 0; r < R; r++) store_row(out, out_float, (r0 + r) * N + t * TILE, acc[r]);
            }
        }
        free(unpacked);
    }
}

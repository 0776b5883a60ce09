/* Weight-only quantised linear layers on the CPU: y = x W^T, x in bfloat16, W stored as GGUF stores it.
 *
 * W is cut into tiles of 16 output features by groups of 32 input features. A weight is a code times its scale
 * plus its offset, both per group (or per half group of 16), exactly as llama.cpp's blocks define them:
 *   legacy (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): scale d and offset m of each group, float16;
 *   K32 (Q4_K, Q5_K): scale D a and offset M b, with D, M float16 per super-block of 256 and a, b the group's
 *     6-bit sub-scales (unsigned bytes);
 *   K16 (Q6_K): scale D a and offset M a for each half group, a a signed byte, M = -32 D.
 * Products of a float16 and a byte are exact in float32, so every weight is exact. The codes (4, 5, 6 or 8
 * bits) are exact in bfloat16, so each half group's dot product runs on `vdpbf16ps` (products of bfloat16 pairs
 * summed in float32) and the scales are applied once per half group, in float32:
 *   out += d_lo (x . q)_lo + d_hi (x . q)_hi + m_lo sum(x)_lo + m_hi sum(x)_hi.
 * 4- and 5-bit codes become bfloat16 through a table; 6-bit codes, whose unpacking costs more than the memory
 * they are read from, are made into bfloat16 128 + q by setting the mantissa bits of 128 (no table), and the
 * offset takes the 128 back: Q6_K's M = -32 D, so the offset of 128 + q is -160 D a, exact in float32.
 *
 * Every output row is computed on its own, by the same sequence of operations whatever the number of rows:
 * blocks of rows only interleave independent chains, and a tile converted once for many rows holds the same
 * bfloat16 values a row block would convert for itself. So a row's result does not depend on its batch.
 *
 * Layouts (T = N / 16 tiles, G = K / 32 groups, U super-blocks per row: G for legacy, K / 256 otherwise):
 *   x        [M, K] bfloat16, rows contiguous
 *   codes    4, 5, 6 bits: uint8 [T, G, 8, 32], the low 4 bits of each code: byte i of chunk c is output feature
 *            i / 2 of the tile, input feature 2c + i % 2 of the group in its low nibble and 16 + 2c + i % 2 in
 *            its high nibble;
 *            8 bits: int8 [T, G, 16, 32]: pair p holds input features 2p, 2p + 1 of the group as
 *            (feature 0, 2p), (feature 0, 2p + 1), (feature 1, 2p), ...
 *   high     5 bits: uint32 [T, G, 8, 2], per chunk the masks of bit 4 of its low and its high nibbles' codes
 *            (bit i for byte i); 6 bits: [T, G, 8, 4], bit 4 then bit 5 likewise; else unused
 *   scales   float16 [T, U, 2, 16]: D (or d) then M (or m) of the tile's 16 features
 *   sub      uint8 [T, G, 2, 16]: K32: a then b; K16: a of the first then the second half (signed); else unused
 *   out      [M, N] bfloat16 (rounded to nearest even) or float32
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16
#define GROUP 32
#define PREFETCH 2048 /* bytes ahead of the codes being read, fetched while a row block computes (M <= ROWS) */
#define ROWS 6 /* rows per block: the chains of 6 rows stay within the 32 vector registers */

enum { LEGACY = 0, K32 = 1, K16 = 2 };

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

static inline __m512 bf16_to_f32(const uint16_t *src) { /* 16 bfloat16 values, exactly */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}

/* sum(x) over each half group of 16, in float32 and a fixed order: [M, 2G]. */
static void half_sums(const uint16_t *x, int64_t M, int64_t K, float *sums) {
    for (int64_t r = 0; r < M; r++)
        for (int64_t h = 0; h < K / 16; h++) sums[r * (K / 16) + h] = _mm512_reduce_add_ps(bf16_to_f32(x + r * K + h * 16));
}

/* bfloat16 of the codes 0 .. 31, exact: the table 4- and 5-bit codes index. */
static void code_table(uint16_t table[32]) {
    for (int i = 0; i < 32; i++) {
        float f = (float)i;
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        table[i] = (uint16_t)(bits >> 16);
    }
}

/* Chunk c of a group as bfloat16: the codes of input features 2c + i % 2 (`lo`) and 16 + 2c + i % 2 (`hi`) of
 * output feature i / 2, for the 32 lanes i. */
static inline __attribute__((always_inline)) void unpack_chunk(int bits, const uint8_t *chunk, const uint32_t *high,
                                                               __m512i table, __m512bh *lo, __m512bh *hi) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)chunk));
    if (bits == 6) { /* bfloat16 128 + q: the code in the mantissa of 128 */
        const __m512i bias = _mm512_set1_epi16(0x4300), b4 = _mm512_set1_epi16(16), b5 = _mm512_set1_epi16(32);
        __m512i l = _mm512_ternarylogic_epi32(v, _mm512_set1_epi16(0x000F), bias, 0xEA); /* (v & 15) | bias */
        __m512i h = _mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
        l = _mm512_mask_add_epi16(l, (__mmask32)high[0], l, b4);
        h = _mm512_mask_add_epi16(h, (__mmask32)high[1], h, b4);
        l = _mm512_mask_add_epi16(l, (__mmask32)high[2], l, b5);
        h = _mm512_mask_add_epi16(h, (__mmask32)high[3], h, b5);
        *lo = (__m512bh)l;
        *hi = (__m512bh)h;
        return;
    }
    __m512i l = _mm512_and_si512(v, _mm512_set1_epi16(0x000F)), h = _mm512_srli_epi16(v, 4);
    if (bits == 5) {
        const __m512i b4 = _mm512_set1_epi16(16);
        l = _mm512_or_si512(l, _mm512_maskz_mov_epi16((__mmask32)high[0], b4));
        h = _mm512_or_si512(h, _mm512_maskz_mov_epi16((__mmask32)high[1], b4));
    }
    *lo = (__m512bh)_mm512_permutexvar_epi16(l, table);
    *hi = (__m512bh)_mm512_permutexvar_epi16(h, table);
}

/* The four per-feature factors of group g of a tile: scale and offset of its two halves. */
static inline __attribute__((always_inline)) void group_factors(int kind, int64_t g, const uint16_t *scales,
                                                                const uint8_t *sub, __m512 *dl, __m512 *dh, __m512 *ml,
                                                                __m512 *mh) {
    const int64_t s = kind == LEGACY ? g : g / 8; /* super-block */
    const __m512 D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + s * 32)));
    const __m512 Mo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + s * 32 + 16)));
    if (kind == LEGACY) {
        *dl = *dh = D;
        *ml = *mh = Mo;
    } else if (kind == K32) {
        const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sub + g * 32))));
        const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sub + g * 32 + 16))));
        *dl = *dh = _mm512_mul_ps(D, a);
        *ml = *mh = _mm512_mul_ps(Mo, b);
    } else {
        const __m512 a0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sub + g * 32))));
        const __m512 a1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sub + g * 32 + 16))));
        /* M = -32 D, and the codes come as 128 + q: the offset is -160 D a, exact in float32 (at most 21 bits) */
        const __m512 M160 = _mm512_mul_ps(D, _mm512_set1_ps(-160.0f));
        *dl = _mm512_mul_ps(D, a0);
        *dh = _mm512_mul_ps(D, a1);
        *ml = _mm512_mul_ps(M160, a0);
        *mh = _mm512_mul_ps(M160, a1);
    }
}

/* R rows (R <= ROWS) of one 4-, 5- or 6-bit tile: its chunks converted here (`unpacked` NULL) or read from the
 * tile converted once for all rows. Two chains per row: a group's first and second half. */
static inline __attribute__((always_inline)) void tile_low(int bits, int kind, const uint16_t *x, int64_t K, int R,
                                                           const uint8_t *codes, const uint32_t *high,
                                                           const uint16_t *scales, const uint8_t *sub,
                                                           const __m512bh *unpacked, const float *sums, __m512i table,
                                                           __m512 *acc) {
    const int64_t G = K / GROUP, planes = bits == 6 ? 4 : 2;
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 lo[ROWS], hi[ROWS];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();
        if (!unpacked) {
            const char *ahead = (const char *)(codes + g * 256) + PREFETCH;
            for (int line = 0; line < 256; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
            if (bits >= 5) {
                const char *more = (const char *)(high + g * 8 * planes) + PREFETCH / 2;
                for (int line = 0; line < 8 * planes * 4; line += 64) _mm_prefetch(more + line, _MM_HINT_T0);
            }
        }
        for (int c = 0; c < 8; c++) {
            __m512bh wl, wh;
            if (unpacked) {
                wl = unpacked[(g * 8 + c) * 2];
                wh = unpacked[(g * 8 + c) * 2 + 1];
            } else {
                unpack_chunk(bits, codes + (g * 8 + c) * 32, high + (g * 8 + c) * planes, table, &wl, &wh);
            }
            for (int r = 0; r < R; r++) {
                const uint16_t *xr = x + r * K + g * GROUP + 2 * c;
                lo[r] = _mm512_dpbf16_ps(lo[r], wl, broadcast_pair(xr));
                hi[r] = _mm512_dpbf16_ps(hi[r], wh, broadcast_pair(xr + 16));
            }
        }
        __m512 dl, dh, ml, mh;
        group_factors(kind, g, scales, sub, &dl, &dh, &ml, &mh);
        for (int r = 0; r < R; r++) {
            acc[r] = _mm512_fmadd_ps(dl, lo[r], acc[r]);
            acc[r] = _mm512_fmadd_ps(dh, hi[r], acc[r]);
            acc[r] = _mm512_fmadd_ps(ml, _mm512_set1_ps(sums[r * 2 * G + 2 * g]), acc[r]);
            acc[r] = _mm512_fmadd_ps(mh, _mm512_set1_ps(sums[r * 2 * G + 2 * g + 1]), acc[r]);
        }
    }
}

/* Pair p of an 8-bit group as bfloat16 (exact: |q| <= 127). */
static inline __m512bh unpack_pair_w8(const int8_t *pair) {
    __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)pair)));
    __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(pair + 16))));
    return _mm512_cvtne2ps_pbh(b, a);
}

/* R rows of one 8-bit tile (legacy scales only: Q8_0 has no offset). Two chains per row (even and odd pairs). */
static inline __attribute__((always_inline)) void tile_w8(const uint16_t *x, int64_t K, int R, const int8_t *codes,
                                                          const __m512bh *unpacked, const uint16_t *scales, __m512 *acc) {
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
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + g * 32)));
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

/* The tile loop of one format; BITS and KIND are constants where it is called, so each format gets its own
 * specialised code. */
static inline __attribute__((always_inline)) void run_low(int bits, int kind, const uint16_t *x, int64_t M, int64_t K,
                                                          const uint8_t *codes, const uint32_t *high,
                                                          const uint16_t *scales, const uint8_t *sub, int64_t N,
                                                          void *out, int out_float, const float *sums) {
    const int64_t G = K / GROUP, T = N / TILE, U = kind == LEGACY ? G : K / 256, planes = bits == 6 ? 4 : 2;
#pragma omp parallel
    {
        /* With more than one block of rows, each tile is converted once, for all of them. */
        __m512bh *unpacked = M > ROWS ? aligned_alloc(64, sizeof(__m512bh) * (size_t)(16 * G)) : NULL;
        uint16_t values[32];
        code_table(values);
        const __m512i table = _mm512_loadu_si512(values);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *tile = codes + t * G * 256;
            const uint32_t *tile_high = bits >= 5 ? high + t * G * 8 * planes : NULL;
            if (unpacked)
                for (int64_t i = 0; i < 8 * G; i++)
                    unpack_chunk(bits, tile + i * 32, tile_high ? tile_high + i * planes : NULL, table,
                                 &unpacked[2 * i], &unpacked[2 * i + 1]);
            for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
                const int R = M - r0 < ROWS ? (int)(M - r0) : ROWS;
                __m512 acc[ROWS];
                DISPATCH(tile_low(bits, kind, x + r0 * K, K, R_, tile, tile_high, scales + t * U * 32,
                                  sub ? sub + t * G * 32 : NULL, unpacked, sums + r0 * 2 * G, table, acc))
                for (int r = 0; r < R; r++) store_row(out, out_float, (r0 + r) * N + t * TILE, acc[r]);
            }
        }
        free(unpacked);
    }
}

static void run_w8(const uint16_t *x, int64_t M, int64_t K, const int8_t *codes, const uint16_t *scales, int64_t N,
                   void *out, int out_float) {
    const int64_t G = K / GROUP, T = N / TILE;
#pragma omp parallel
    {
        __m512bh *unpacked = M > ROWS ? aligned_alloc(64, sizeof(__m512bh) * (size_t)(16 * G)) : NULL;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const int8_t *tile = codes + t * G * 512;
            if (unpacked)
                for (int64_t i = 0; i < 16 * G; i++) unpacked[i] = unpack_pair_w8(tile + i * 32);
            for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
                const int R = M - r0 < ROWS ? (int)(M - r0) : ROWS;
                __m512 acc[ROWS];
                DISPATCH(tile_w8(x + r0 * K, K, R_, tile, unpacked, scales + t * G * 32, acc))
                for (int r = 0; r < R; r++) store_row(out, out_float, (r0 + r) * N + t * TILE, acc[r]);
            }
        }
        free(unpacked);
    }
}

/* y = x W^T for W of `bits` (4, 5, 6, 8) and `kind` (LEGACY, K32, K16), in the layouts above. Returns 0, or -1
 * for a format this kernel has no code for. */
int packed_linear(const uint16_t *x, int64_t M, int64_t K, int64_t N, int bits, int kind, const void *codes,
                  const uint32_t *high, const uint16_t *scales, const uint8_t *sub, void *out, int out_float) {
    if (bits == 8) {
        if (kind != LEGACY) return -1;
        run_w8(x, M, K, codes, scales, N, out, out_float);
        return 0;
    }
    float *sums = malloc(sizeof(float) * (size_t)(M * (K / 16) > 0 ? M * (K / 16) : 1));
    half_sums(x, M, K, sums);
    int status = 0;
#define CASE(B, KIND) \
    else if (bits == B && kind == KIND) run_low(B, KIND, x, M, K, codes, high, scales, sub, N, out, out_float, sums);
    if (0) {}
    CASE(4, LEGACY) CASE(5, LEGACY) CASE(4, K32) CASE(5, K32) CASE(6, K16)
    else status = -1;
#undef CASE
    free(sums);
    return status;
}

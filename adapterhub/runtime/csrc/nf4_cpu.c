/* NF4 linear and dequantize on the CPU: compiled at first use by adapterhub/runtime/cpu_kernels.py
 * (cc -O3 -march=native -fopenmp -shared -fPIC), called through ctypes. The callers validate every
 * argument; these functions trust their inputs.
 *
 * Storage (SEMANTICS §1.3-1.4): the (N, K) weight flattened row-major, two 4-bit codes per byte with
 * element 2k in the HIGH nibble, blocks of G = 64 consecutive elements, absmax (N*K/G,) float32 with the
 * double quantization already decoded. K % G == 0, so a block never crosses a row.
 *
 *   nf4_linear_bf16  y (M, N) bf16 = x (M, K) bf16 @ W^T  with W[n,k] = bf16(code[q] ) * absmax, fp32 sums
 *   nf4_linear_f32   y (M, N) f32  = x (M, K) f32  @ W^T  with W[n,k] = code[q] * absmax, fp32 sums
 *   nf4_dequantize_bf16  W (N*K,) bf16 = bf16(code[q] * absmax)   (bit-identical to SEMANTICS §1.5)
 *
 * Both linears compute sum_blocks absmax_b * sum_{k in b} code[q_k] * x_k: the per-block scale is
 * applied once per block, not per weight. The bf16 kernel looks codes up in a bf16 copy of the codebook
 * (vpermw) and multiplies pairs with vdpbf16ps; the codebook rounded to bf16 differs from the exact
 * bf16(code * absmax) of the torch path by at most 2^-9 relative per weight (tolerance: cpu_kernels.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define G 64          /* quant block size */
#define MT_MAX 8      /* rows of x sharing one decode of a weight row */

static const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN (as torch) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
/* bf16 path. 64 packed bytes = 128 elements = 2 blocks, read as 32 little-endian words: word j holds
 * elements 4j..4j+3 with 4j+1 in bits 0-3, 4j in 4-7, 4j+3 in 8-11, 4j+2 in 12-15. vpermw reads 5 index
 * bits, so with the 16 codes repeated twice, w >> {0,4,8,12} index the codes without masking. x is
 * stored once per call in the matching order: chunk c, group g = 0..3 (elements 4j+1, 4j, 4j+3, 4j+2).
 * vdpbf16ps sums word pairs into fp32 lane i = word 2i, 2i+1: lanes 0-7 are block 2c, 8-15 block 2c+1. */
#define CHUNK 128

static void permute_x_bf16(const uint16_t *x, int64_t K, int64_t C, uint16_t *xp) {
    static const int SRC[4] = {1, 0, 3, 2};
    for (int64_t c = 0; c < C; c++)
        for (int g = 0; g < 4; g++)
            for (int j = 0; j < 32; j++) {
                int64_t k = c * CHUNK + 4 * j + SRC[g];
                xp[(c * 4 + g) * 32 + j] = k < K ? x[k] : 0;
            }
}

static inline void row_bf16(int MT, const uint8_t *w, const float *a, const uint16_t *xp, int64_t C,
                            int64_t K, int64_t xstride, int64_t N, uint16_t *y) {
    const __m512i lut = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(NF4_CODE), _mm512_loadu_ps(NF4_CODE));
    __m512 tot[MT_MAX];
    for (int m = 0; m < MT; m++) tot[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c++) {
        int full = (c + 1) * CHUNK <= K; /* else: the last 64 elements of the row, one block */
        __m512i v = full ? _mm512_loadu_si512(w + c * 64) : _mm512_maskz_loadu_epi16(0xffff, w + c * 64);
        __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(a[2 * c]), 0xff00,
                                      _mm512_set1_ps(full ? a[2 * c + 1] : 0.0f));
        __m512bh q0 = (__m512bh)_mm512_permutexvar_epi16(v, lut);
        __m512bh q1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
        __m512bh q2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
        __m512bh q3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
        for (int m = 0; m < MT; m++) {
            const uint16_t *xc = xp + m * xstride + c * CHUNK;
            __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(xc));
            p = _mm512_dpbf16_ps(p, q1, (__m512bh)_mm512_loadu_si512(xc + 32));
            p = _mm512_dpbf16_ps(p, q2, (__m512bh)_mm512_loadu_si512(xc + 64));
            p = _mm512_dpbf16_ps(p, q3, (__m512bh)_mm512_loadu_si512(xc + 96));
            tot[m] = _mm512_fmadd_ps(p, s, tot[m]);
        }
    }
    for (int m = 0; m < MT; m++) y[m * N] = f32_to_bf16(_mm512_reduce_add_ps(tot[m]));
}
#endif

void nf4_linear_f32(const float *x, int64_t M, int64_t N, int64_t K, const uint8_t *w,
                    const float *absmax, float *y);

void nf4_linear_bf16(const uint16_t *x, int64_t M, int64_t N, int64_t K, const uint8_t *w,
                     const float *absmax, uint16_t *y) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
    int64_t C = (K + CHUNK - 1) / CHUNK, xs = C * CHUNK;
    uint16_t *xp = aligned_alloc(64, (size_t)(M * xs * 2));
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) permute_x_bf16(x + m * K, K, C, xp + m * xs);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *wn = w + n * (K / 2);
            const float *an = absmax + n * (K / G);
            int64_t m = 0;
            /* constant tile sizes so the accumulators stay in registers */
            for (; m + 8 <= M; m += 8) row_bf16(8, wn, an, xp + m * xs, C, K, xs, N, y + m * N + n);
            if (M - m >= 4) { row_bf16(4, wn, an, xp + m * xs, C, K, xs, N, y + m * N + n); m += 4; }
            if (M - m >= 2) { row_bf16(2, wn, an, xp + m * xs, C, K, xs, N, y + m * N + n); m += 2; }
            if (M - m >= 1) row_bf16(1, wn, an, xp + m * xs, C, K, xs, N, y + m * N + n);
        }
    }
    free(xp);
#else /* portable: x widened to fp32 once, then the fp32 kernel */
    float *xf = malloc((size_t)(M * K * 4)), *yf = malloc((size_t)(M * N * 4));
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(x[i]);
    nf4_linear_f32(xf, M, N, K, w, absmax, yf);
    for (int64_t i = 0; i < M * N; i++) y[i] = f32_to_bf16(yf[i]);
    free(xf);
    free(yf);
#endif
}

#if defined(__AVX512F__)
/* fp32 path: 16 packed bytes = 32 elements; bytes widened to dwords, the high nibbles (even elements)
 * and the low nibbles (odd ones, vpermps reads only 4 index bits) index the exact fp32 codebook. x is
 * stored once per call as 16 even then 16 odd elements per 32. */
static void permute_x_f32(const float *x, int64_t K, float *xp) {
    for (int64_t k = 0; k < K; k += 32)
        for (int j = 0; j < 16; j++) {
            xp[k + j] = x[k + 2 * j];
            xp[k + 16 + j] = x[k + 2 * j + 1];
        }
}

static inline void row_f32(int MT, const uint8_t *w, const float *a, const float *xp, int64_t K,
                           int64_t N, float *y) {
    const __m512 lut = _mm512_loadu_ps(NF4_CODE);
    __m512 tot[MT_MAX];
    for (int m = 0; m < MT; m++) tot[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / G; b++) {
        __m512 q[4];
        for (int h = 0; h < 2; h++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + b * 32 + h * 16)));
            q[2 * h] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            q[2 * h + 1] = _mm512_permutexvar_ps(v, lut);
        }
        __m512 s = _mm512_set1_ps(a[b]);
        for (int m = 0; m < MT; m++) {
            const float *xb = xp + m * K + b * G;
            __m512 p = _mm512_mul_ps(q[0], _mm512_loadu_ps(xb));
            for (int i = 1; i < 4; i++) p = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(xb + 16 * i), p);
            tot[m] = _mm512_fmadd_ps(p, s, tot[m]);
        }
    }
    for (int m = 0; m < MT; m++) y[m * N] = _mm512_reduce_add_ps(tot[m]);
}
#else
static void permute_x_f32(const float *x, int64_t K, float *xp) { memcpy(xp, x, (size_t)K * 4); }

static inline void row_f32(int MT, const uint8_t *w, const float *a, const float *xp, int64_t K,
                           int64_t N, float *y) {
    for (int m = 0; m < MT; m++) {
        const float *xm = xp + m * K;
        float tot = 0.0f;
        for (int64_t b = 0; b < K / G; b++) {
            float p = 0.0f;
            for (int64_t k = b * G; k < (b + 1) * G; k += 2) {
                uint8_t byte = w[k / 2];
                p += NF4_CODE[byte >> 4] * xm[k] + NF4_CODE[byte & 15] * xm[k + 1];
            }
            tot += p * a[b];
        }
        y[m * N] = tot;
    }
}
#endif

void nf4_linear_f32(const float *x, int64_t M, int64_t N, int64_t K, const uint8_t *w,
                    const float *absmax, float *y) {
    float *xp = aligned_alloc(64, (size_t)(M * K * 4));
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) permute_x_f32(x + m * K, K, xp + m * K);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *wn = w + n * (K / 2);
            const float *an = absmax + n * (K / G);
            int64_t m = 0;
            for (; m + 8 <= M; m += 8) row_f32(8, wn, an, xp + m * K, K, N, y + m * N + n);
            if (M - m >= 4) { row_f32(4, wn, an, xp + m * K, K, N, y + m * N + n); m += 4; }
            if (M - m >= 2) { row_f32(2, wn, an, xp + m * K, K, N, y + m * N + n); m += 2; }
            if (M - m >= 1) row_f32(1, wn, an, xp + m * K, K, N, y + m * N + n);
        }
    }
    free(xp);
}

/* W (n,) bf16 = bf16(code[q] * absmax): the product in fp32, then round to nearest even, exactly as the
 * torch path (SEMANTICS §1.5). n % G == 0. Per block, the 16 possible products form a bf16 table. */
void nf4_dequantize_bf16(const uint8_t *w, const float *absmax, int64_t n, uint16_t *out) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512BF16__)
    /* Output word 2k and 2k+1 of a half block both get packed byte k; shifting them right by 4 and 0
     * leaves the high / low nibble in bits 0-3 (bit 4 may hold junk: the table repeats, so it is unused). */
    uint8_t spread[2][64];
    for (int h = 0; h < 2; h++)
        for (int e = 0; e < 64; e++) spread[h][e] = (uint8_t)(16 * h + e / 4);
    const __m512i idx0 = _mm512_loadu_si512(spread[0]), idx1 = _mm512_loadu_si512(spread[1]);
    const __m512i shift = _mm512_set1_epi32(4); /* words: 4, 0, 4, 0, ... */
#endif
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n / G; b++) {
        float t[16];
        for (int i = 0; i < 16; i++) t[i] = NF4_CODE[i] * absmax[b];
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512BF16__)
        /* vcvtne2ps2bf16 flushes subnormals; products that small need absmax < ~1e-36: scalar below */
        if (!(absmax[b] < 1e-36f)) {
            __m512 tv = _mm512_loadu_ps(t);
            __m512i lut = (__m512i)_mm512_cvtne2ps_pbh(tv, tv);
            __m512i src = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w + b * 32)));
            __m512i e0 = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, idx0, src);
            __m512i e1 = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, idx1, src);
            _mm512_storeu_si512(out + b * G, _mm512_permutexvar_epi16(_mm512_srlv_epi16(e0, shift), lut));
            _mm512_storeu_si512(out + b * G + 32, _mm512_permutexvar_epi16(_mm512_srlv_epi16(e1, shift), lut));
            continue;
        }
#endif
        for (int k = 0; k < G; k += 2) {
            uint8_t byte = w[(b * G + k) / 2];
            out[b * G + k] = f32_to_bf16(t[byte >> 4]);
            out[b * G + k + 1] = f32_to_bf16(t[byte & 15]);
        }
    }
}

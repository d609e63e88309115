/* 4-bit (NF4, FP4, any 16-entry codebook) linear and dequantize, and NF4 quantize, on the CPU: compiled at
 * first use by adapterhub/runtime/kernels/build.py (cc -O3 -march=native -fopenmp -shared -fPIC), called
 * through ctypes. The callers validate every argument; these functions trust their inputs.
 *
 * Storage (semantics §1.3-1.4, §11): the (N, K) weight flattened row-major, two 4-bit codes per byte with
 * element 2k in the HIGH nibble, blocks of G = 64 consecutive elements, absmax (N*K/G,) float32 with the
 * double quantization already decoded, code (16,) float32 the format's value of each code. K % G == 0, so
 * a block never crosses a row.
 *
 *   lut4_linear           y (M, N) = x (M, K) @ W^T, x and y both bf16 or both fp32, fp32 sums, where
 *                         W = fp32(code[q] * absmax), rounded to bf16 (RNE) when x is bf16; bf16 on AMX
 *                         tiles, else VDPBF16PS (lut4_dpbf16_enable turns it off), else fp32 FMAs
 *   lut4_dequantize_bf16  W (N*K,) bf16 = bf16(code[q] * absmax)
 *   lut4_dequantize, nf4_quantize: any blocksize and dtype, see their sections at the end
 *
 * W is exactly the torch path's weight (semantics §1.5: product in fp32, then RNE to the compute dtype);
 * only the order of the fp32 sums differs from dequantize + F.linear.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define G 64     /* quant block size */
#define MT_MAX 4 /* rows of x sharing one decode of a weight row (FMA path) */

static const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* x row (K,) bf16 or fp32 -> fp32 once per call, each 32 elements as the 16 even then the 16 odd ones:
 * the order in which the high and the low nibbles of 16 packed bytes come out of the decoder. */
static void load_x(const void *x, int is_bf16, int64_t K, float *xp) {
    for (int64_t k = 0; k < K; k += 32)
        for (int j = 0; j < 16; j++)
            for (int odd = 0; odd < 2; odd++) {
                int64_t i = k + 2 * j + odd;
                xp[k + 16 * odd + j] = is_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
            }
}

#if defined(__AVX512F__)
/* The 16 weights one block can hold: fp32(code * absmax), rounded to bf16 precision (RNE) if asked. */
static inline __m512 block_table(const float *code, float a, int round_bf16) {
    __m512 t = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(a));
    if (!round_bf16) return t;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    /* vcvtneps2bf16 rounds to nearest even (flushing subnormals: only absmax < ~1e-36 makes them);
     * vpermw moves bf16 i to the high half of dword i, zeroing the low half. */
    const __m512i hi = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0,
                                        4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    __m512i h = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(t));
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xaaaaaaaau, hi, h));
#else
    __m512i u = _mm512_castps_si512(t);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
#endif
}

/* sums[m] = sum_k W[n, k] x[m, k] for one weight row and MT rows of x. 16 packed bytes are widened to
 * dwords; vpermps reads 4 index bits, so (byte >> 4) and byte itself index the block's table for the
 * even and the odd elements. Each row of x has 4 accumulators (hiding the FMA latency), summed in a fixed
 * order, so a row's result does not depend on how many rows share the call. */
static inline void row_sums(const int MT, const float *code, const uint8_t *w, const float *a, const float *xp,
                            int64_t K, int64_t xstride, int round_bf16, float *sums) {
    __m512 acc[MT_MAX][4];
    for (int m = 0; m < MT; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / G; b++) {
        __m512 t = block_table(code, a[b], round_bf16), q[4];
        for (int h = 0; h < 2; h++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + b * 32 + h * 16)));
            q[2 * h] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
            q[2 * h + 1] = _mm512_permutexvar_ps(v, t);
        }
        for (int m = 0; m < MT; m++)
            for (int i = 0; i < 4; i++)
                acc[m][i] = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(xp + m * xstride + b * G + 16 * i), acc[m][i]);
    }
    for (int m = 0; m < MT; m++) {
        __m512 t = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
        sums[m] = _mm512_reduce_add_ps(t);
    }
}
#else
static inline void row_sums(const int MT, const float *code, const uint8_t *w, const float *a, const float *xp,
                            int64_t K, int64_t xstride, int round_bf16, float *sums) {
    for (int m = 0; m < MT; m++) sums[m] = 0.0f;
    for (int64_t b = 0; b < K / G; b++) {
        float t[16];
        for (int i = 0; i < 16; i++) t[i] = round_bf16 ? bf16_to_f32(f32_to_bf16(code[i] * a[b])) : code[i] * a[b];
        for (int64_t j = 0; j < G / 2; j++) { /* byte j of the block: elements 2j (high), 2j+1 (low) */
            uint8_t byte = w[b * 32 + j];
            int64_t k = b * G + (j / 16) * 32 + j % 16;
            for (int m = 0; m < MT; m++)
                sums[m] += t[byte >> 4] * xp[m * xstride + k] + t[byte & 15] * xp[m * xstride + k + 16];
        }
    }
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
/* AMX path (bf16 x, M >= 2, N % 32 == 0, K % 128 == 0): tile C (16 weight rows, 16 rows of x) += A B, where
 * A holds 16 weight rows decoded to bf16 and B the matching x values: up to 32 rows of x per pass over W.
 * A block's 32 packed bytes widen to 32 words; vpermw reads 5 index bits, so with its 16 weights
 * bf16(code * absmax) repeated twice, word >> 4 and the word itself look up the even and the odd elements
 * (the high nibble lands in bit 4 of the word: ignored). A chunk of 128 elements thus gives 4 groups of
 * 32: word j of group g is element 64 (g / 2) + 2 j + g % 2; x is laid out in B in the same order. */
#define NB 16   /* weight rows per tile */
#define CH 128  /* elements per chunk */
static int amx_enabled;

int lut4_amx_enable(void) { return amx_enabled = amx_request(); }

/* 128 elements of one weight row -> group g at out + g * NB * 32 (a row of the g-th A tile) */
static inline void decode_chunk(const float *code_, const uint8_t *w, const float *a, uint16_t *out) {
    const __m512 code = _mm512_loadu_ps(code_);
    /* words 0-15: the first block's 16 weights, 16-31: the second's; then each repeated twice */
    __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(a[1])),
                                                _mm512_mul_ps(code, _mm512_set1_ps(a[0])));
    __m512i table[2] = {_mm512_shuffle_i64x2(both, both, 0x44), _mm512_shuffle_i64x2(both, both, 0xee)};
    for (int h = 0; h < 2; h++) {
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + 32 * h)));
        _mm512_store_si512(out + (2 * h) * NB * 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table[h]));
        _mm512_store_si512(out + (2 * h + 1) * NB * 32, _mm512_permutexvar_epi16(v, table[h]));
    }
}

/* 16 weight rows, chunk c -> the 4 A tiles of that chunk */
static inline void decode_rows(const float *code, const uint8_t *w, const float *absmax, int64_t n0, int64_t K,
                               int64_t c, uint16_t *ab) {
    for (int r = 0; r < NB; r++)
        decode_chunk(code, w + (n0 + r) * (K / 2) + c * 64, absmax + (n0 + r) * (K / G) + 2 * c, ab + r * 32);
}

/* B tiles for the rows [m0, m0 + 16) of x: pair p, column m holds the group's words 2p and 2p + 1;
 * rows of x past M are zero. */
static void load_x_tiles(const uint16_t *x, int64_t M, int64_t m0, int64_t K, uint16_t *xb) {
    int64_t rows = M - m0 < 16 ? M - m0 : 16;
    memset(xb, 0, (size_t)(K / CH * 4 * 512 * 2));
    for (int64_t c = 0; c < K / CH; c++)
        for (int g = 0; g < 4; g++)
            for (int j = 0; j < 32; j++)
                for (int64_t m = 0; m < rows; m++)
                    xb[((c * 4 + g) * 16 + j / 2) * 32 + 2 * m + j % 2] =
                        x[(m0 + m) * K + c * CH + 64 * (g / 2) + 2 * j + g % 2];
}

static void store_tile_rows(const float *cbuf, int64_t rows, int64_t N, uint16_t *y) {
    for (int64_t m = 0; m < rows; m++)
        for (int r = 0; r < NB; r++) y[m * N + r] = f32_to_bf16(cbuf[r * 16 + m]);
}

/* M <= 32 rows, 32 weight rows per step: tiles 0-3 accumulate (weight rows 0-15 | 16-31) x (x rows 0-15 |
 * 16-31), tiles 4, 5 hold the two A tiles and 6, 7 the two B tiles, so each B load serves 32 weight rows. */
static void linear_amx(const uint16_t *x, int64_t M, int64_t N, int64_t K, const uint8_t *w,
                       const float *absmax, const float *code, uint16_t *y) {
    const int64_t C = K / CH, two = M > 16;
    uint16_t *xb = aligned_alloc(64, (size_t)(2 * C * 4 * 512 * 2));
    tile_config cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < 1 + two; h++) load_x_tiles(x, M, 16 * h, K, xb + h * C * 4 * 512);
        _tile_loadconfig(&cfg);
        _Alignas(64) uint16_t abuf[2][2 * 4 * NB * 32]; /* by chunk parity: decode the next while tiles run */
        _Alignas(64) float cbuf[NB * 16];
#pragma omp for schedule(dynamic, 2) /* dynamic: a thread slowed by another process hands work over */
        for (int64_t n0 = 0; n0 < N; n0 += 2 * NB) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            decode_rows(code, w, absmax, n0, K, 0, abuf[0]);
            decode_rows(code, w, absmax, n0 + NB, K, 0, abuf[0] + 4 * NB * 32);
            for (int64_t c = 0; c < C; c++) {
                /* decode the next chunk first: its stores commit while the tiles of this one load */
                if (c + 1 < C) {
                    decode_rows(code, w, absmax, n0, K, c + 1, abuf[(c + 1) & 1]);
                    decode_rows(code, w, absmax, n0 + NB, K, c + 1, abuf[(c + 1) & 1] + 4 * NB * 32);
                }
                uint16_t *ab = abuf[c & 1];
                for (int g = 0; g < 4; g++) {
                    _tile_loadd(4, ab + g * NB * 32, 64);
                    _tile_loadd(5, ab + (4 + g) * NB * 32, 64);
                    _tile_loadd(6, xb + (c * 4 + g) * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 5, 6);
                    if (two) {
                        _tile_loadd(7, xb + ((C + c) * 4 + g) * 512, 64);
                        _tile_dpbf16ps(2, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
            }
            int64_t rows = M < 16 ? M : 16;
            _tile_stored(0, cbuf, 64);
            store_tile_rows(cbuf, rows, N, y + n0);
            _tile_stored(1, cbuf, 64);
            store_tile_rows(cbuf, rows, N, y + n0 + NB);
            if (two) {
                _tile_stored(2, cbuf, 64);
                store_tile_rows(cbuf, M - 16, N, y + 16 * N + n0);
                _tile_stored(3, cbuf, 64);
                store_tile_rows(cbuf, M - 16, N, y + 16 * N + n0 + NB);
            }
        }
        _tile_release();
    }
    free(xb);
}
#else
int lut4_amx_enable(void) { return 0; }
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HAVE_DPBF16 1
/* VDPBF16PS path (bf16 x, any M; the dispatcher picks it for few rows): each block of W is read and decoded
 * to bf16 once per tile of MR <= 8 rows of x and NR rows of W, then feeds all MR rows. A block's 32 packed bytes
 * widen to 32 words; vpermw reads 5 index bits, so with the block's 16 weights bf16(code * absmax) repeated
 * twice, word >> 4 gives the 32 even elements and the word itself the 32 odd ones (bit 4, from the high
 * nibble, is ignored). x is laid out the same way once per call (spread_x), so VDPBF16PS multiplies
 * matching elements. Each (row of x, row of W) has one fp32 accumulator, fed the even then the odd half of
 * each block in order: a row's result does not depend on M or on the tile it lands in. VDPBF16PS reads bf16
 * subnormals as zero and flushes products below 2^-126 (as the cvtne weight table already did). */
#define MR_MAX 8 /* rows of x per tile: M > 8 runs in ceil(M / 8) even passes over W (from the cache) */

/* Streaming W from DRAM (every decode step: the model is larger than the caches). Each weight row of a tile
 * is prefetched PF_ROWS rows (2 tiles at M=1) ahead at the same column, into L2 (prefetcht1), not L1: a
 * prefetch into L1 holds one of the core's few L1 miss buffers until its line arrives from DRAM, so at most
 * a handful are in flight and the stream stalls. Measured on an EPYC Zen 4 (2 cores, 2 threads), M=1, ~160 MB
 * of weights rotated so that none is cached (bench/nf4_linear.py --stream), T0 -> T1: 2048x2048 15-18 ->
 * 24-26 GB/s, 8192x2048 17-20 -> 28-32, 2048x8192 25 -> 30, 1536x576 18 -> 23.5, 576x1536 16 -> 23 (a plain
 * 2-thread read: 32-42 GB/s); M=2 1.1-1.3x; the cache-hot time and M >= 4 (compute-bound) unchanged.
 * Prefetching each tile's whole span ahead, line by line in order, with T1, streamed no faster and cost
 * 5-10% when hot; T0 for M >= 5 gained nothing.
 * lut4_dp_prefetch_l2(0) selects the former T0 so that benchmarks can compare the two. */
#define PF_ROWS 16
static int prefetch_l2 = 1; /* lut4_dp_prefetch_l2 */

/* x (M, K) bf16 -> xs (M, K): per block of 64, its 32 even elements then its 32 odd ones */
static void spread_x(const uint16_t *x, int64_t M, int64_t K, uint16_t *xs) {
    uint16_t order[2][32];
    for (int j = 0; j < 32; j++) order[0][j] = (uint16_t)(2 * j), order[1][j] = (uint16_t)(2 * j + 1);
    const __m512i even = _mm512_loadu_si512(order[0]), odd = _mm512_loadu_si512(order[1]);
    for (int64_t i = 0; i < M * K; i += G) {
        __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
        _mm512_store_si512(xs + i, _mm512_permutex2var_epi16(a, even, b));
        _mm512_store_si512(xs + i + 32, _mm512_permutex2var_epi16(a, odd, b));
    }
}

/* sums[m * NR + r] = bf16(sum_k W[r, k] x[m, k]) for MR rows of x (xs, stride K) and NR rows of W (w, a: row r at
 * w + r * K / 2, a + r * K / G). Inlined with constant MR, NR so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dp_tile(const int MR, const int NR, const float *code_,
                                                          const uint8_t *w, const float *a, const uint16_t *xs,
                                                          int64_t K, uint16_t *sums, const int l2) {
    const __m512 code = _mm512_loadu_ps(code_);
    __m512 acc[MR_MAX][8];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / G; b++) {
        __m512i we[8], wo[8];
        for (int r = 0; r < NR; r++) {
            const char *pw = (const char *)(w + (r + PF_ROWS) * (K / 2) + b * 32),
                       *pa = (const char *)(a + (r + PF_ROWS) * (K / G) + b);
            if (l2) _mm_prefetch(pw, _MM_HINT_T1), _mm_prefetch(pa, _MM_HINT_T1);
            else _mm_prefetch(pw, _MM_HINT_T0), _mm_prefetch(pa, _MM_HINT_T0);
            __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(a[r * (K / G) + b]));
            __m512i lut = (__m512i)_mm512_cvtne2ps_pbh(t, t);
            __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + r * (K / 2) + b * 32)));
            we[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
            wo[r] = _mm512_permutexvar_epi16(v, lut);
        }
        for (int m = 0; m < MR; m++) {
            __m512bh xe = (__m512bh)_mm512_load_si512(xs + m * K + b * G);
            __m512bh xo = (__m512bh)_mm512_load_si512(xs + m * K + b * G + 32);
            for (int r = 0; r < NR; r++) {
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)we[r], xe);
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wo[r], xo);
            }
        }
    }
    __m512 all[16];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) all[m * NR + r] = acc[m][r];
    reduce_sums(all, MR * NR, sums); /* writes 16 */
}

/* Weight rows per tile for MR rows of x: 8-16 independent accumulators hide VDPBF16PS's latency, and the
 * accumulators plus the 2 * NR decoded weight vectors fit the 32 registers. */
static inline int dp_rows_of_w(int MR) { return MR == 1 ? 8 : MR <= 4 ? 4 : 2; }

/* One tile: MR (runtime, <= 8) rows of x, NR = dp_rows_of_w(MR) or 1 weight rows from n0. */
static void dp_dispatch(int MR, int NR, const float *code, const uint8_t *w, const float *a, const uint16_t *xs,
                        int64_t K, uint16_t *sums) {
#define DP_TILE(mr, nr) /* the prefetch's target a constant: no branch in the loop */                     \
    prefetch_l2 ? dp_tile(mr, nr, code, w, a, xs, K, sums, 1) : dp_tile(mr, nr, code, w, a, xs, K, sums, 0)
#define DP_CASE(mr)                                                                                           \
    case mr:                                                                                                  \
        if (NR == 1) DP_TILE(mr, 1);                                                                          \
        else DP_TILE(mr, (mr == 1 ? 8 : mr <= 4 ? 4 : 2));                                                    \
        break;
    switch (MR) {
        DP_CASE(1) DP_CASE(2) DP_CASE(3) DP_CASE(4) DP_CASE(5) DP_CASE(6) DP_CASE(7) DP_CASE(8)
    }
#undef DP_CASE
#undef DP_TILE
}

static void linear_dpbf16(const uint16_t *x, int64_t M, int64_t N, int64_t K, const uint8_t *w,
                          const float *absmax, const float *code, uint16_t *y) {
    uint16_t *xs = aligned_alloc(64, (size_t)(M * K * 2));
    spread_x(x, M, K, xs);
    const int64_t passes = (M + MR_MAX - 1) / MR_MAX, MT = (M + passes - 1) / passes, NR = dp_rows_of_w((int)MT);
    const int64_t tiles = (N + NR - 1) / NR;
    /* guided: each thread first streams a long contiguous run of W, and a thread slowed by another process
     * still hands the shrinking rest over (a static half each: 1.5x slower whenever a neighbour takes a
     * core). Small calls stay on both threads too: on one, 192x576 took 4.9 us instead of 6.8 when the
     * other thread slept, but 7.6 instead of 4.8 right after a parallel call (as in a decode step), while
     * the other thread still spins. */
#pragma omp parallel for schedule(guided, 4)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * NR, nr = N - n0 < NR ? N - n0 : NR;
        uint16_t sums[16];
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mr = (int)(M - m0 < MT ? M - m0 : MT);
            const int full = nr == dp_rows_of_w(mr) ? (int)nr : 1; /* the last tile: one weight row at a time */
            for (int64_t r0 = 0; r0 < nr; r0 += full) {
                dp_dispatch(mr, full, code, w + (n0 + r0) * (K / 2), absmax + (n0 + r0) * (K / G), xs + m0 * K, K,
                            sums);
                for (int m = 0; m < mr; m++)
                    for (int r = 0; r < full; r++) y[(m0 + m) * N + n0 + r0 + r] = sums[m * full + r];
            }
        }
    }
    free(xs);
}
#endif

static inline void store_y(const float *sums, int MT, int is_bf16, int64_t N, void *y) {
    for (int m = 0; m < MT; m++) {
        if (is_bf16) ((uint16_t *)y)[m * N] = f32_to_bf16(sums[m]);
        else ((float *)y)[m * N] = sums[m];
    }
}

#ifdef HAVE_DPBF16
static int use_dpbf16 = 1; /* lut4_dpbf16_enable(0) turns the VDPBF16PS path off (tests, benchmarks) */
#endif

/* 1 where this build has the VDPBF16PS path and it is now on; enable < 0 only asks. */
#ifdef HAVE_DPBF16
static int set_flag(int *flag, int enable) {
    if (enable >= 0) *flag = enable != 0;
    return *flag;
}
#endif

int lut4_dpbf16_enable(int enable) {
#ifdef HAVE_DPBF16
    return set_flag(&use_dpbf16, enable);
#else
    (void)enable;
    return 0;
#endif
}

/* 1 (the default): the VDPBF16PS path prefetches W into L2; 0: into L1, as it did before (benchmarks);
 * enable < 0 only asks. 0 where this build lacks the path. Results are identical either way. */
int lut4_dp_prefetch_l2(int enable) {
#ifdef HAVE_DPBF16
    return set_flag(&prefetch_l2, enable);
#else
    (void)enable;
    return 0;
#endif
}

void lut4_linear(const void *x, int is_bf16, int64_t M, int64_t N, int64_t K, const uint8_t *w,
                 const float *absmax, const float *code, void *y) {
#ifdef HAVE_AMX
    if (amx_enabled && is_bf16 && M >= 2 && N % (2 * NB) == 0 && K % CH == 0) {
        for (int64_t m = 0; m < M; m += 32)
            linear_amx((const uint16_t *)x + m * K, M - m < 32 ? M - m : 32, N, K, w, absmax, code,
                       (uint16_t *)y + m * N);
        return;
    }
#endif
#ifdef HAVE_DPBF16
    if (is_bf16 && use_dpbf16) {
        linear_dpbf16((const uint16_t *)x, M, N, K, w, absmax, code, (uint16_t *)y);
        return;
    }
#endif
    float *xp = aligned_alloc(64, (size_t)(M * K * 4));
    size_t ysize = is_bf16 ? 2 : 4;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) load_x((const char *)x + m * K * ysize, is_bf16, K, xp + m * K);
#pragma omp for schedule(guided, 8) /* guided: long contiguous runs of W first, as in linear_dpbf16 */
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *wn = w + n * (K / 2);
            const float *an = absmax + n * (K / G);
            float sums[MT_MAX];
            int64_t m = 0;
            /* constant tile sizes, so that the accumulators stay in registers */
            for (; m + 4 <= M; m += 4) {
                row_sums(4, code, wn, an, xp + m * K, K, K, is_bf16, sums);
                store_y(sums, 4, is_bf16, N, (char *)y + (m * N + n) * ysize);
            }
            if (M - m >= 2) {
                row_sums(2, code, wn, an, xp + m * K, K, K, is_bf16, sums);
                store_y(sums, 2, is_bf16, N, (char *)y + (m * N + n) * ysize);
                m += 2;
            }
            if (M - m >= 1) {
                row_sums(1, code, wn, an, xp + m * K, K, K, is_bf16, sums);
                store_y(sums, 1, is_bf16, N, (char *)y + (m * N + n) * ysize);
            }
        }
    }
    free(xp);
}

/* W (n,) bf16 = bf16(code[q] * absmax): the product in fp32, then round to nearest even, exactly as the
 * torch path (semantics §1.5). n % G == 0. Per block, the 16 possible products form a bf16 table. */
void lut4_dequantize_bf16(const uint8_t *w, const float *absmax, int64_t n, const float *code, uint16_t *out) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512BF16__)
    /* Output word 2k and 2k+1 of a half block both get packed byte k; shifting them right by 4 and 0
     * leaves the high / low nibble in bits 0-3 (bit 4 may hold junk: the table repeats, so it is unused). */
    uint8_t spread[2][64];
    for (int h = 0; h < 2; h++)
        for (int e = 0; e < 64; e++) spread[h][e] = (uint8_t)(16 * h + e / 4);
    const __m512i idx0 = _mm512_loadu_si512(spread[0]), idx1 = _mm512_loadu_si512(spread[1]);
    const __m512i shift = _mm512_set1_epi32(4); /* words: 4, 0, 4, 0, ... */
#endif
#pragma omp parallel for schedule(dynamic, 1024)
    for (int64_t b = 0; b < n / G; b++) {
        float t[16];
        for (int i = 0; i < 16; i++) t[i] = code[i] * absmax[b];
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

/* --- quantize (semantics §1.2-1.4) ---------------------------------------------------------------
 * nf4_quantize  x (n,) fp32 / bf16 / fp16 (kind 0 / 1 / 2), blocks of G (any allowed blocksize, even)
 *               -> absmax (ceil(n/G),) fp32, packed (ceil(n/2),) bytes
 * Exactly the torch path: a = max |x| over the block (a short last block is zero-padded, which changes
 * no max), s = x * fp32(1 / max(a, 1e-38)) in fp32, code = number of the 15 fp32 midpoints strictly
 * below s, element 2k in the high nibble; a padded element codes 0.0 as 7, so odd n ends in nibble 7. */

#define MAX_BLOCKSIZE 4096 /* the largest allowed blocksize (semantics §1.3), checked by the caller */

static inline float f16_to_f32(uint16_t h) { /* exact widening, subnormals and inf/nan included */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sign;
    else {
        float f = (float)m * 0x1p-24f; /* a subnormal half: m * 2^-24, exact in fp32 */
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_one(const void *x, int kind, int64_t i) {
    if (kind == 0) return ((const float *)x)[i];
    if (kind == 1) return bf16_to_f32(((const uint16_t *)x)[i]);
    return f16_to_f32(((const uint16_t *)x)[i]);
}

/* Binary search over mid (16,): fp32((code[i] + code[i+1]) / 2) for i < 15; mid[15] is never read. */
static inline int code_of(float s, const float *mid) {
    int c = 0;
    for (int step = 8; step; step >>= 1)
        if (s > mid[c + step - 1]) c += step;
    return c;
}

/* One block of G elements at x + start (scalar); returns its absmax. */
static float quantize_block_scalar(const void *x, int kind, int64_t start, int64_t G_, const float *mid, uint8_t *packed) {
    float a = 0.0f;
    for (int64_t i = 0; i < G_; i++) {
        float v = fabsf(load_one(x, kind, start + i));
        a = v > a ? v : a;
    }
    float r = 1.0f / (a > 1e-38f ? a : 1e-38f);
    for (int64_t i = 0; i < G_; i += 2)
        packed[i / 2] = (uint8_t)(code_of(load_one(x, kind, start + i) * r, mid) << 4 |
                                  code_of(load_one(x, kind, start + i + 1) * r, mid));
    return a;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __m512 load16(const void *x, int kind, int64_t i) {
    if (kind == 0) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    if (kind == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h); /* exact, subnormal halves included */
}

/* 16 codes (dwords) -> 8 bytes: the low dword of each qword becomes (even << 4) | odd. */
static inline void pack16(__m512i c, uint8_t *out) {
    __m512i q = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
    _mm_storel_epi64((__m128i *)out, _mm512_cvtepi64_epi8(q));
}

static float quantize_block_avx512(const void *x, int kind, int64_t start, int64_t G_, const float *mid_, uint8_t *packed) {
    const __m512i sign = _mm512_set1_epi32(0x7fffffff);
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < G_; i += 16)
        m = _mm512_max_ps(m, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(load16(x, kind, start + i)), sign)));
    float a = _mm512_reduce_max_ps(m);
    const __m512 r = _mm512_set1_ps(1.0f / (a > 1e-38f ? a : 1e-38f));
    const __m512 mid = _mm512_loadu_ps(mid_);
    for (int64_t i = 0; i < G_; i += 16) {
        __m512 s = _mm512_mul_ps(load16(x, kind, start + i), r);
        __m512i c = _mm512_setzero_si512();
        for (int step = 8; step; step >>= 1) { /* binary search: c += step where s > mid[c + step - 1] */
            __m512 t = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), mid);
            c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, t, _CMP_GT_OQ), c, _mm512_set1_epi32(step));
        }
        pack16(c, packed + i / 2);
    }
    return a;
}
#define quantize_block quantize_block_avx512
#else
#define quantize_block quantize_block_scalar
#endif

void nf4_quantize(const void *x, int kind, int64_t n, int64_t G_, float *absmax, uint8_t *packed) {
    float mid[16];
    for (int i = 0; i < 15; i++) mid[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0f; /* fp32 sum, exact halving */
    mid[15] = NF4_CODE[15];
    int64_t full = n / G_;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < full; b++) absmax[b] = quantize_block(x, kind, b * G_, G_, mid, packed + b * G_ / 2);
    if (full * G_ < n) { /* the short last block, zero-padded to G in fp32 as the torch path does */
        int64_t rest = n - full * G_;
        float pad[MAX_BLOCKSIZE] = {0};
        uint8_t codes[MAX_BLOCKSIZE / 2];
        for (int64_t i = 0; i < rest; i++) pad[i] = load_one(x, kind, full * G_ + i);
        absmax[full] = quantize_block_scalar(pad, 0, 0, G_, mid, codes);
        memcpy(packed + full * G_ / 2, codes, (size_t)(rest + 1) / 2);
    }
}

/* --- dequantize into fp32 / bf16 / fp16 (semantics §1.5) -----------------------------------------
 * lut4_dequantize  packed, absmax (n/G,) fp32, code (16,) -> out (n,) of kind 0 / 1 / 2 (fp32 / bf16 / fp16),
 *                 out = kind(fp32(code[q] * absmax)) rounded to nearest even; n % G == 0, any even G >= 32.
 * Per block the 16 possible values are rounded once into a table of dwords, then looked up per nibble. */

static inline uint16_t f32_to_f16(float f) { /* round to nearest even, overflow to inf, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    if (u >= 0x47800000u) return (uint16_t)(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u)); /* >= 65536, inf, nan */
    if (u < 0x38800000u) { /* below the smallest normal half: adding 0.5 makes the FPU round at 2^-24 */
        float g;
        memcpy(&g, &u, 4);
        g += 0.5f;
        memcpy(&u, &g, 4);
        return (uint16_t)(sign | (u - 0x3f000000u));
    }
    u += 0xc8000fffu + ((u >> 13) & 1u); /* rebias the exponent (-112 << 23) and round half to even */
    return (uint16_t)(sign | (u >> 13));
}

static inline uint32_t table_entry(float v, int kind) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return kind == 0 ? u : kind == 1 ? f32_to_bf16(v) : f32_to_f16(v);
}

void lut4_dequantize(const uint8_t *w, const float *absmax, int64_t n, int64_t G_, int kind, const float *code,
                     void *out) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n / G_; b++) {
        uint32_t t[16];
        for (int i = 0; i < 16; i++) t[i] = table_entry(code[i] * absmax[b], kind);
        const uint8_t *src = w + b * G_ / 2;
        int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        const __m512i tv = _mm512_loadu_si512(t);
        const __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(8));
        for (; k < G_; k += 32) { /* 16 bytes -> 32 values: high nibbles at even, low ones at odd places */
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + k / 2)));
            __m512i hi = _mm512_permutexvar_epi32(_mm512_srli_epi32(v, 4), tv);
            __m512i lo = _mm512_permutexvar_epi32(v, tv); /* vpermd reads the low 4 index bits */
            __m512i r0 = _mm512_permutex2var_epi32(hi, even, lo), r1 = _mm512_permutex2var_epi32(hi, odd, lo);
            if (kind == 0) {
                _mm512_storeu_si512((uint32_t *)out + b * G_ + k, r0);
                _mm512_storeu_si512((uint32_t *)out + b * G_ + k + 16, r1);
            } else {
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + b * G_ + k), _mm512_cvtepi32_epi16(r0));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + b * G_ + k + 16), _mm512_cvtepi32_epi16(r1));
            }
        }
#endif
        for (; k < G_; k += 2) {
            uint8_t byte = src[k / 2];
            if (kind == 0) {
                ((uint32_t *)out)[b * G_ + k] = t[byte >> 4];
                ((uint32_t *)out)[b * G_ + k + 1] = t[byte & 15];
            } else {
                ((uint16_t *)out)[b * G_ + k] = (uint16_t)t[byte >> 4];
                ((uint16_t *)out)[b * G_ + k + 1] = (uint16_t)t[byte & 15];
            }
        }
    }
}

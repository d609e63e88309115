/* Batched LoRA "shrink" and "expand" on the CPU, bf16, every row gathering its own adapter: compiled with
 * fourbit_cpu.c into one library by adapterhub/runtime/kernels/build.py, called through ctypes. The callers
 * validate every argument; these functions trust their inputs.
 *
 * Vocabulary as runtime/kernels/ops.py: B rows of T tokens, N adapter slots of rank R, Din / Dout features;
 * ids (B,) int64 slot per row. Stacks: A (N, R, Din), BT (N, R, Dout) = lora_B transposed per slot.
 *
 *   lora_shrink_bf16  h[b, t] = bf16(x[b, t] @ A[ids[b]]^T)                       fp32 sums
 *   lora_expand_bf16  hs = bf16(h[b, t] * scaling[n])                              n = ids[b]
 *                     y[b, t] = bf16(y[b, t] + hs @ BT[n])                         fp32 sums, one rounding
 *                     y[b, t] = bf16(y[b, t] * dora[n])                            when dora != NULL
 *
 * Why a kernel: with many distinct adapters each row must read its own A and B. torch has no gathered
 * GEMM on CPU, so its forms either compute every slot for every row (N times the flops) or copy each
 * row's A / B first (twice the bytes); here each row streams its adapter once, straight from the stack
 * (Punica's SGMV idea, arXiv 2310.18547, with a row instead of a segment as the unit). A row's result
 * does not depend on the other rows of the batch.
 *
 * Rounding: the sums are fp32 in a different order from torch's; where the CPU has AVX512-BF16 the
 * products come from VDPBF16PS (or AMX's TDPBF16PS), which reads bf16 subnormal inputs (|v| < 2^-126) as
 * zero. Every rounding to bf16 is round-to-nearest-even as torch does it, subnormals and NaN included.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#define MT 4  /* tokens per register tile */
#define MR 4  /* ranks per register tile (shrink) */
#define MD 4  /* 16-lane output vectors per register tile (expand) */
#define TB 16 /* tokens per parallel work item */
/* Decode streams each adapter from memory once: prefetching this far ahead of the loads measured 5-10%
 * faster on the 2-core development machine (bench/mixed_batch.py, decode at N = 32); NTA hints were slower. */
#define PREFETCH_BYTES 2048

/* One token's whole adapter slot, requested into L2 before it is read: a slot is 10-50 KB that no stream
 * prefetcher has seen yet, so it would arrive a few misses at a time. Measured on an EPYC Zen 4, one thread,
 * from DRAM: an r=16 shrink of K=576 2.8 -> 2.4 us; the shrink + expand of 8 distinct r=16 adapters over the
 * 210 projections of a 135M decode step (through ctypes, calls included) 14.2-14.5 -> 12.6-12.8 ms. */
static inline void prefetch_slot(const uint16_t *p, int64_t elems) {
    for (int64_t o = 0; o < elems * 2; o += 64) _mm_prefetch((const char *)p + o, _MM_HINT_T1);
}
/* Below this many multiply-adds a call runs on one thread: waking the OpenMP team costs more. */
#define PARALLEL_MIN_MACS (1 << 15)

/* Work item i of a call split into `blocks` items per row: row b, tokens [t0, t0 + nt), spans of `span` */
typedef struct { int64_t b, t0, nt; } work_item;
static inline work_item item_of(int64_t i, int64_t blocks, int64_t span, int64_t T) {
    const int64_t b = i / blocks, t0 = (i % blocks) * span;
    return (work_item){b, t0, T - t0 < span ? T - t0 : span};
}

static inline __m512 bf16x16_to_f32(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* 16 fp32 rounded to bf16 precision (nearest even; NaN stays a quiet NaN), still as fp32: torch's
 * c10::BFloat16 rounding, subnormals included. */
static inline __m512 round_bf16_int(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000)));
}

/* 16 values already of bf16 precision -> their 16 bf16 words, and back */
static inline __m256i pack_bf16(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)); }
static inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* 16 fp32 -> bf16 words, rounded as torch does. VCVTNEPS2BF16 rounds to nearest even and keeps NaN a
 * NaN, but flushes subnormals to zero: lanes holding one (never, in practice) take the integer path. */
static inline __m256i f32x16_to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 sub = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000)) &
                          _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x007fffff));
    if (__builtin_expect(sub != 0, 0)) r = _mm256_mask_blend_epi16(sub, r, pack_bf16(round_bf16_int(v)));
    return r;
#else
    return pack_bf16(round_bf16_int(v));
#endif
}

/* acc += x[k:k+32] . a[k:k+32] pairwise into 16 fp32 lanes (only the masked elements are read). */
static inline __m512 dot32(__m512 acc, __m512i x, __m512i a) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)a);
#else
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000);
    __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), ae = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
    __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(x, hi)), ao = _mm512_castsi512_ps(_mm512_and_si512(a, hi));
    return _mm512_fmadd_ps(xe, ae, _mm512_fmadd_ps(xo, ao, acc));
#endif
}

/* h (nt, R) at the tile's first rank = x (nt, K) @ a (nr, K)^T for an nt x nr tile; constant nt and nr
 * after inlining, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void shrink_tile(const int nt, const int nr, const uint16_t *x,
                                                              const uint16_t *a, int64_t K, int64_t R, uint16_t *h) {
    __m512 acc[MT][MR];
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) acc[t][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1u;
        __m512i xv[MT], av[MR];
        for (int t = 0; t < nt; t++) xv[t] = _mm512_maskz_loadu_epi16(m, x + t * K + k);
        for (int r = 0; r < nr; r++) av[r] = _mm512_maskz_loadu_epi16(m, a + r * K + k);
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < nr; r++) acc[t][r] = dot32(acc[t][r], xv[t], av[r]);
    }
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) h[t * R + r] = f32_to_bf16(_mm512_reduce_add_ps(acc[t][r]));
}

/* One token: each rank row of a is read in order, so the whole (R, K) slot is a single sequential stream
 * (decode is bound by memory bandwidth; four independent sums hide the dot-product latency). */
static void shrink_one(const uint16_t *x, const uint16_t *a, int64_t R, int64_t K, uint16_t *h) {
    prefetch_slot(a, R * K);
    for (int64_t r = 0; r < R; r++, a += K) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t k = 0;
        for (; k + 128 <= K; k += 128) {
            for (int u = 0; u < 4; u++) _mm_prefetch((const char *)(a + k + 32 * u) + PREFETCH_BYTES, _MM_HINT_T0);
            for (int u = 0; u < 4; u++)
                acc[u] = dot32(acc[u], _mm512_loadu_si512(x + k + 32 * u), _mm512_loadu_si512(a + k + 32 * u));
        }
        for (; k < K; k += 32) {
            const __mmask32 m = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1u;
            acc[0] = dot32(acc[0], _mm512_maskz_loadu_epi16(m, x + k), _mm512_maskz_loadu_epi16(m, a + k));
        }
        h[r] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))));
    }
}

static void shrink_tokens(const uint16_t *x, const uint16_t *a, int64_t nt, int64_t R, int64_t K, uint16_t *h) {
    int64_t t = 0;
    for (; t + MT <= nt; t += MT) {
        int64_t r = 0;
        for (; r + MR <= R; r += MR) shrink_tile(MT, MR, x + t * K, a + r * K, K, R, h + t * R + r);
        for (; r < R; r++) shrink_tile(MT, 1, x + t * K, a + r * K, K, R, h + t * R + r);
    }
    for (; t < nt; t++) shrink_one(x + t * K, a, R, K, h + t * R);
}


#if defined(__AVX512BF16__)
/* The pair-interleaved ("VNNI") layouts that VDPBF16PS and AMX's TDPBF16PS multiply: 32-bit words each
 * holding two bf16 of consecutive k (shrink) or consecutive ranks (expand), low half first. A row's
 * adapter is laid out once per work item, then read by every token of it. */

/* out[i * 16 + j] = in[j * stride + i] for a 16 x 16 block of 32-bit words (rows of `in` past `rows`: 0). */
static inline void transpose16(const uint32_t *in, int64_t stride, int rows, uint32_t *out) {
    __m512i r[16], t[16];
    for (int j = 0; j < 16; j++) r[j] = j < rows ? _mm512_loadu_si512(in + j * stride) : _mm512_setzero_si512();
    for (int j = 0; j < 16; j += 2) {
        t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) { /* per 128-bit lane L, r[j + k] now holds rows j..j+3 of column 4L + k */
        r[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
        r[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
        r[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
        r[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    for (int L = 0; L < 4; L++) {
        const __m512i idx = _mm512_setr_epi32(4 * L, 4 * L + 1, 4 * L + 2, 4 * L + 3, 16 + 4 * L, 17 + 4 * L,
                                              18 + 4 * L, 19 + 4 * L, 0, 0, 0, 0, 0, 0, 0, 0);
        for (int k = 0; k < 4; k++) {
            const __m512i lo = _mm512_permutex2var_epi32(r[k], idx, r[4 + k]);
            const __m512i hi = _mm512_permutex2var_epi32(r[8 + k], idx, r[12 + k]);
            _mm512_storeu_si512(out + (4 * L + k) * 16, _mm512_shuffle_i32x4(lo, hi, 0x44));
        }
    }
}

/* av (R/16 rounded up, K/2, 16) words: av[g][p][j] = pair p of rank 16 g + j (zero past R); K % 32 == 0 */
static void shrink_layout(const uint16_t *a, int64_t R, int64_t K, uint32_t *av) {
    const int64_t P = K / 2, G = (R + 15) / 16;
    for (int64_t g = 0; g < G; g++)
        for (int64_t p = 0; p < P; p += 16)
            transpose16((const uint32_t *)(a + g * 16 * K) + p, P, (int)(R - 16 * g < 16 ? R - 16 * g : 16),
                        av + (g * P + p) * 16);
}

/* bv (pairs, Dout) words: bv[p][d] = (bt[2p][d], bt[2p + 1][d]), zero past R; pairs >= (R + 1) / 2 */
static void expand_layout(const uint16_t *bt, int64_t R, int64_t pairs, int64_t Dout, uint32_t *bv) {
    for (int64_t p = 0; p < pairs; p++)
        for (int64_t d = 0; d < Dout; d += 16) {
            const __mmask16 m = Dout - d >= 16 ? 0xffff : (__mmask16)((1u << (Dout - d)) - 1u);
            const __mmask16 lo = 2 * p < R ? m : 0, hi = 2 * p + 1 < R ? m : 0;
            const __m512i v = _mm512_or_si512(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lo, bt + 2 * p * Dout + d)),
                                              _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(hi, bt + (2 * p + 1) * Dout + d)), 16));
            _mm512_mask_storeu_epi32(bv + p * Dout + d, m, v);
        }
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
/* AMX path, for items of 16 tokens or more (prefill): per row, its adapter is laid out once in the
 * pair-interleaved ("VNNI") order the B operand of TDPBF16PS wants, then every 16-token block is a few
 * tile products: shrink C (16 tokens, 16 ranks) += x (16 tokens, 32 k) . A^T, expand C (16 tokens, 16
 * columns) += hs (16 tokens, up to 32 ranks, padded to even) . BT. TDPBF16PS multiplies bf16 pairs exactly and
 * sums in fp32 (subnormal inputs as zero, as VDPBF16PS); y is added after, in fp32, as the Semantics. */
#define AMX_TOKENS 128 /* tokens per work item: the per-row layout pass is amortized over up to this many */
static int amx_enabled;

int lora_amx_enable(void) { return amx_enabled = amx_request(); }

/* tiles 0 and 3: C (16 x 16 fp32); 1: A (16 rows of `pairs` bf16 pairs); 2: B (`pairs` rows of 16 pairs) */
static void tiles_configure(int pairs) {
    tile_config cfg = {.palette = 1};
    for (int t = 0; t < 4; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    cfg.colsb[1] = (uint16_t)(4 * pairs), cfg.rows[2] = (uint8_t)pairs;
    _tile_loadconfig(&cfg);
}

/* 16 tokens x 16 fp32 sums (tile layout) -> bf16 rows of h with `n` valid ranks each */
static inline void store_h_tile(const float *c, int n, int64_t R, uint16_t *h) {
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    for (int j = 0; j < 16; j++) _mm256_mask_storeu_epi16(h + j * R, m, f32x16_to_bf16(_mm512_load_ps(c + 16 * j)));
}

/* nt % 16 == 0 tokens, K % 32 == 0; av: (R/16 rounded up) * K/2 * 16 words of scratch */
static void shrink_amx(const uint16_t *x, const uint16_t *a, int64_t nt, int64_t R, int64_t K, uint16_t *h,
                       uint32_t *av, float *cbuf) {
    const int64_t P = K / 2, RT = (R + 15) / 16; /* k pairs, rank tiles */
    shrink_layout(a, R, K, av);
    for (int64_t t = 0; t < nt; t += 16)
        for (int64_t rt = 0; rt < RT; rt++) {
            _tile_zero(0);
            for (int64_t p = 0; p < P; p += 16) {
                _tile_loadd(1, x + t * K + 2 * p, K * 2);
                _tile_loadd(2, av + (rt * P + p) * 16, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, cbuf, 64);
            store_h_tile(cbuf, (int)(R - 16 * rt < 16 ? R - 16 * rt : 16), R, h + t * R + 16 * rt);
        }
}

/* y (16 tokens, 16 columns) = bf16(y + c), then bf16(y * dora) when dora != NULL */
static inline void expand_amx_epilogue(const float *c, uint16_t *y, int64_t Dout, const float *dora) {
    const __m512 g = dora ? _mm512_loadu_ps(dora) : _mm512_setzero_ps();
    for (int j = 0; j < 16; j++) {
        __m256i v = f32x16_to_bf16(_mm512_add_ps(bf16x16_to_f32(y + j * Dout, 0xffff), _mm512_load_ps(c + 16 * j)));
        if (dora) v = f32x16_to_bf16(_mm512_mul_ps(widen_bf16(v), g));
        _mm256_storeu_si256((__m256i *)(y + j * Dout), v);
    }
}

/* C tile TILE = hs (tile 1, or reloaded per rank chunk) . bv for column block I, stored to CB */
#define EXPAND_AMX_BLOCK(TILE, I, CB)                                                   \
    do {                                                                                \
        _tile_zero(TILE);                                                               \
        for (int64_t rc = 0; rc < RC; rc++) {                                           \
            if (RC > 1) _tile_loadd(1, hsb + 2 * PC * rc, Rp * 2);                      \
            _tile_loadd(2, bv + rc * PC * Dout + 16 * (I), Dout * 4);                   \
            _tile_dpbf16ps(TILE, 1, 2);                                                 \
        }                                                                               \
        _tile_stored(TILE, CB, 64);                                                     \
    } while (0)

/* Rank pairs per tile product: all of them up to rank 32, else 16 (the tile's depth) per chunk. */
static inline int64_t expand_pairs(int64_t R) { return R <= 32 ? (R + 1) / 2 : 16; }

/* nt % 16 == 0 tokens, Dout % 16 == 0; tiles configured for expand_pairs(R); bv: RC * PC * Dout words,
 * hsb: 16 * Rp bf16 of scratch (RC chunks of PC pairs, Rp = 2 * PC * RC ranks with zeros past R) */
static void expand_amx(const uint16_t *h, float scaling, const uint16_t *bt, int64_t nt, int64_t R, int64_t Dout,
                       const float *dora, uint16_t *y, uint32_t *bv, uint16_t *hsb, float *cbuf) {
    const int64_t PC = expand_pairs(R), RC = (R + 2 * PC - 1) / (2 * PC), Rp = 2 * PC * RC;
    expand_layout(bt, R, Rp / 2, Dout, bv);
    for (int64_t t = 0; t < nt; t += 16) {
        for (int j = 0; j < 16; j++) /* hs, rounded to bf16 as the Semantics say; zero past R */
            for (int64_t r = 0; r < Rp; r += 16) {
                const __mmask16 m = R - r >= 16 ? 0xffff : R > r ? (__mmask16)((1u << (R - r)) - 1u) : 0;
                const __mmask16 row = Rp - r >= 16 ? 0xffff : (__mmask16)((1u << (Rp - r)) - 1u);
                const __m512 v = _mm512_mul_ps(bf16x16_to_f32(h + (t + j) * R + r, m), _mm512_set1_ps(scaling));
                _mm256_mask_storeu_epi16(hsb + j * Rp + r, row, f32x16_to_bf16(v));
            }
        if (RC == 1) _tile_loadd(1, hsb, Rp * 2);
        /* C tiles 0 and 3 alternate: the tile product of one 16-column block runs while the vector
         * units finish the previous block (the tile store waits for its product). */
        const int64_t nb = Dout / 16;
        for (int64_t i = 0; i < nb; i += 2) {
            EXPAND_AMX_BLOCK(0, i, cbuf);
            if (i > 0) expand_amx_epilogue(cbuf + 256, y + t * Dout + 16 * (i - 1), Dout, dora ? dora + 16 * (i - 1) : NULL);
            if (i + 1 < nb) EXPAND_AMX_BLOCK(3, i + 1, cbuf + 256);
            expand_amx_epilogue(cbuf, y + t * Dout + 16 * i, Dout, dora ? dora + 16 * i : NULL);
        }
        if (nb % 2 == 0) expand_amx_epilogue(cbuf + 256, y + t * Dout + 16 * (nb - 1), Dout, dora ? dora + 16 * (nb - 1) : NULL);
    }
}
#else
int lora_amx_enable(void) { return 0; }
#endif

/* 16 columns of y (the lanes in m) = bf16(y + sums), then times dora (NULL: no DoRA) and rounded again */
static inline void add_store(__m512 sums, __mmask16 m, const float *dora, uint16_t *y) {
    __m256i v = f32x16_to_bf16(_mm512_add_ps(bf16x16_to_f32(y, m), sums));
    if (dora) v = f32x16_to_bf16(_mm512_mul_ps(widen_bf16(v), _mm512_maskz_loadu_ps(m, dora)));
    _mm256_mask_storeu_epi16(y, m, v);
}

#if defined(__AVX512BF16__)
/* Prefill without AMX (16+ tokens per row): VDPBF16PS register tiles over the pair layouts above, each
 * row's slot laid out once per work item. As on the AMX path, the products are exact and summed in fp32,
 * subnormal inputs read as zero. */
#define PAIR_TOKENS 128 /* tokens per work item: the layout pass is amortized over up to this many */
#define ST 16           /* tokens per register tile of the shrink: one accumulator (16 ranks) per token */
#define PT 4            /* tokens per register tile of the expand */
#define PD 6            /* 16-column vectors per expand tile: PT x PD accumulators + PD + 1 operands <= 32 */

/* h (ST tokens, n <= 16 ranks from the group's first) = x (ST, K) . A^T: each step multiplies one k pair
 * of every token (a broadcast word of x) by that pair of 16 ranks (one vector of av), so the sums land
 * rank by lane and need no horizontal reduction. */
static void shrink_pair_tile(const uint16_t *x, int64_t K, const uint32_t *av, int n, int64_t R, uint16_t *h) {
    __m512 acc[ST];
    for (int t = 0; t < ST; t++) acc[t] = _mm512_setzero_ps();
    const uint32_t *xw = (const uint32_t *)x;
    for (int64_t p = 0; p < K / 2; p++) {
        const __m512i a = _mm512_load_si512(av + p * 16);
        for (int t = 0; t < ST; t++) acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32((int)xw[t * K / 2 + p]), (__m512bh)a);
    }
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    for (int t = 0; t < ST; t++) _mm256_mask_storeu_epi16(h + t * R, m, f32x16_to_bf16(acc[t]));
}

/* Prefill without AMX (16+ tokens per row, K % 32 == 0): whole ST-token tiles on the pairs, the rest as decode */
static void lora_shrink_pairs(const uint16_t *x, const uint16_t *A, const int64_t *ids, int64_t B, int64_t T,
                              int64_t R, int64_t K, uint16_t *h) {
    const int64_t blocks = (T + PAIR_TOKENS - 1) / PAIR_TOKENS, items = B * blocks, G = (R + 15) / 16;
#pragma omp parallel
    {
        uint32_t *av = aligned_alloc(64, (size_t)(G * K * 32));
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            const work_item w = item_of(i, blocks, PAIR_TOKENS, T);
            const int64_t full = w.nt - w.nt % ST;
            const uint16_t *xb = x + (w.b * T + w.t0) * K, *a = A + ids[w.b] * R * K;
            uint16_t *hb = h + (w.b * T + w.t0) * R;
            shrink_layout(a, R, K, av);
            for (int64_t t = 0; t < full; t += ST)
                for (int64_t g = 0; g < G; g++)
                    shrink_pair_tile(xb + t * K, K, av + g * K * 8, (int)(R - 16 * g < 16 ? R - 16 * g : 16), R, hb + t * R + 16 * g);
            shrink_tokens(xb + full * K, a, w.nt - full, R, K, hb + full * R);
        }
        free(av);
    }
}

/* Expand: hs as pairs (hp (nt, P) words) against BT's rank pairs (bv (P, Dout)), so every instruction
 * multiplies two ranks for 16 columns: twice the fp32 FMA path's work, and no widening of BT in the loop.
 * hp (nt, P) = pairs of bf16(h * scaling), the Semantics' rounding (exact in bf16, so the pairs hold it) */
static void pair_hs(const uint16_t *h, float scaling, int64_t nt, int64_t R, uint32_t *hp) {
    const int64_t P = (R + 1) / 2;
    for (int64_t t = 0; t < nt; t++)
        for (int64_t p = 0; p < P; p++) {
            const uint32_t lo = f32_to_bf16(bf16_to_f32(h[t * R + 2 * p]) * scaling);
            const uint32_t hi = 2 * p + 1 < R ? f32_to_bf16(bf16_to_f32(h[t * R + 2 * p + 1]) * scaling) : 0u;
            hp[t * P + p] = lo | hi << 16;
        }
}

/* y (nt, Dout) at the tile's first column += hp (nt, P) . bv (P, Dout) over nd vectors (the last masked) */
static inline __attribute__((always_inline)) void pair_tile(const int nt, const int nd, __mmask16 last,
                                                            const uint32_t *hp, int64_t P, const uint32_t *bv,
                                                            int64_t Dout, const float *dora, uint16_t *y) {
    __m512 acc[PT][PD];
    for (int t = 0; t < nt; t++)
        for (int j = 0; j < nd; j++) acc[t][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        __m512i b[PD];
        for (int j = 0; j < nd; j++) b[j] = _mm512_maskz_loadu_epi32(j == nd - 1 ? last : 0xffff, bv + p * Dout + 16 * j);
        for (int t = 0; t < nt; t++) {
            const __m512i s = _mm512_set1_epi32((int)hp[t * P + p]);
            for (int j = 0; j < nd; j++) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], (__m512bh)s, (__m512bh)b[j]);
        }
    }
    for (int t = 0; t < nt; t++)
        for (int j = 0; j < nd; j++) add_store(acc[t][j], j == nd - 1 ? last : 0xffff, dora ? dora + 16 * j : NULL, y + t * Dout + 16 * j);
}

/* nt tokens (constant after inlining) over every column: PD vectors at a time, then one masked at a time */
static inline __attribute__((always_inline)) void pair_tokens(const int nt, const uint32_t *hp, int64_t P,
                                                              const uint32_t *bv, int64_t Dout, const float *dora,
                                                              uint16_t *y) {
    int64_t d = 0;
    for (; d + 16 * PD <= Dout; d += 16 * PD) pair_tile(nt, PD, 0xffff, hp, P, bv + d, Dout, dora ? dora + d : NULL, y + d);
    for (; d < Dout; d += 16) {
        const __mmask16 last = Dout - d >= 16 ? 0xffff : (__mmask16)((1u << (Dout - d)) - 1u);
        pair_tile(nt, 1, last, hp, P, bv + d, Dout, dora ? dora + d : NULL, y + d);
    }
}

static void expand_pairs_item(const uint32_t *hp, const uint32_t *bv, int64_t nt, int64_t P, int64_t Dout,
                              const float *dora, uint16_t *y) {
    int64_t t = 0;
    for (; t + PT <= nt; t += PT) pair_tokens(PT, hp + t * P, P, bv, Dout, dora, y + t * Dout);
    _Static_assert(PT == 4, "the remainder cases below cover PT - 1 tokens");
    switch (nt - t) { /* constant token counts, so each tile keeps its sums in registers */
    case 3: pair_tokens(3, hp + t * P, P, bv, Dout, dora, y + t * Dout); break;
    case 2: pair_tokens(2, hp + t * P, P, bv, Dout, dora, y + t * Dout); break;
    case 1: pair_tokens(1, hp + t * P, P, bv, Dout, dora, y + t * Dout); break;
    }
}

static void lora_expand_pairs(uint16_t *y, const uint16_t *h, const uint16_t *BT, const int64_t *ids,
                              const float *scaling, const float *dora, int64_t B, int64_t T, int64_t R, int64_t Dout) {
    const int64_t blocks = (T + PAIR_TOKENS - 1) / PAIR_TOKENS, items = B * blocks, P = (R + 1) / 2;
#pragma omp parallel
    {
        uint32_t *bv = aligned_alloc(64, (size_t)((P * Dout * 4 + 63) / 64 * 64));
        uint32_t *hp = aligned_alloc(64, (size_t)((PAIR_TOKENS * P * 4 + 63) / 64 * 64));
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            const work_item w = item_of(i, blocks, PAIR_TOKENS, T);
            const int64_t n = ids[w.b];
            expand_layout(BT + n * R * Dout, R, P, Dout, bv);
            pair_hs(h + (w.b * T + w.t0) * R, scaling[n], w.nt, R, hp);
            expand_pairs_item(hp, bv, w.nt, P, Dout, dora ? dora + n * Dout : NULL, y + (w.b * T + w.t0) * Dout);
        }
        free(hp);
        free(bv);
    }
}
#endif

void lora_shrink_bf16(const uint16_t *x, const uint16_t *A, const int64_t *ids, int64_t B, int64_t T, int64_t R,
                      int64_t K, uint16_t *h) {
#ifdef HAVE_AMX
    if (amx_enabled && T >= 16 && K % 32 == 0) {
        const int64_t blocks = (T + AMX_TOKENS - 1) / AMX_TOKENS, items = B * blocks;
#pragma omp parallel
        {
            tiles_configure(16);
            uint32_t *av = aligned_alloc(64, (size_t)((R + 15) / 16 * K * 32));
            _Alignas(64) float cbuf[256];
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < items; i++) {
                const work_item w = item_of(i, blocks, AMX_TOKENS, T);
                const int64_t full = w.nt & ~(int64_t)15; /* whole 16-token blocks go to the tiles */
                const uint16_t *xb = x + (w.b * T + w.t0) * K, *a = A + ids[w.b] * R * K;
                uint16_t *hb = h + (w.b * T + w.t0) * R;
                if (full) shrink_amx(xb, a, full, R, K, hb, av, cbuf);
                shrink_tokens(xb + full * K, a, w.nt - full, R, K, hb + full * R);
            }
            free(av);
            _tile_release();
        }
        return;
    }
#endif
#if defined(__AVX512BF16__)
    if (T >= 16 && K % 32 == 0) {
        lora_shrink_pairs(x, A, ids, B, T, R, K, h);
        return;
    }
#endif
    const int64_t blocks = (T + TB - 1) / TB, items = B * blocks;
#pragma omp parallel for schedule(dynamic, 1) if (B * T * R * K >= PARALLEL_MIN_MACS)
    for (int64_t i = 0; i < items; i++) {
        const work_item w = item_of(i, blocks, TB, T);
        shrink_tokens(x + (w.b * T + w.t0) * K, A + ids[w.b] * R * K, w.nt, R, K, h + (w.b * T + w.t0) * R);
    }
}

/* y (nt, Dout) at the tile's first column = bf16(y + hs (nt, R) @ bt (R, Dout)) over nd vectors of 16
 * columns (the last one masked by `last`), then times dora (NULL: no DoRA) and rounded again. */
static inline __attribute__((always_inline)) void expand_tile(const int nt, const int nd, __mmask16 last,
                                                              const float *hs, int64_t R, const uint16_t *bt,
                                                              int64_t Dout, const float *dora, uint16_t *y) {
    __m512 acc[MT][MD];
    for (int t = 0; t < nt; t++)
        for (int j = 0; j < nd; j++) acc[t][j] = _mm512_setzero_ps();
    for (int64_t r = 0; r < R; r++) {
        __m512 bv[MD];
        for (int j = 0; j < nd; j++) bv[j] = bf16x16_to_f32(bt + r * Dout + 16 * j, j == nd - 1 ? last : 0xffff);
        for (int t = 0; t < nt; t++) {
            const __m512 s = _mm512_set1_ps(hs[t * R + r]);
            for (int j = 0; j < nd; j++) acc[t][j] = _mm512_fmadd_ps(s, bv[j], acc[t][j]);
        }
    }
    for (int t = 0; t < nt; t++)
        for (int j = 0; j < nd; j++) add_store(acc[t][j], j == nd - 1 ? last : 0xffff, dora ? dora + 16 * j : NULL, y + t * Dout + 16 * j);
}

/* Columns d0.. of nt tokens: MT tokens x MD vectors per tile while they last, then single ones. */
#define EXPAND_COLUMNS(NT)                                                                                     \
    do {                                                                                                       \
        int64_t d = 0;                                                                                         \
        for (; d + 16 * MD <= Dout; d += 16 * MD)                                                              \
            expand_tile(NT, MD, 0xffff, hs + t * R, R, bt + d, Dout, dora ? dora + d : NULL, y + t * Dout + d); \
        for (; d < Dout; d += 16) {                                                                            \
            const __mmask16 last = Dout - d >= 16 ? 0xffff : (__mmask16)((1u << (Dout - d)) - 1u);             \
            expand_tile(NT, 1, last, hs + t * R, R, bt + d, Dout, dora ? dora + d : NULL, y + t * Dout + d);   \
        }                                                                                                      \
    } while (0)

#if defined(__AVX512BF16__)
#define MP 8 /* 32-column vectors per register tile of the one-token expand: 2 MP sums + MP operands */

/* One token, nv vectors of 32 columns (the last masked by `last`): y = bf16(y + hs @ bt), DoRA-scaled and
 * rounded again. VDPBF16PS multiplies the bf16 of bt as they lie, with no widening: against the pair
 * (hs[r], 0) it adds hs[r] * bt[r][even column] to the even sums, against (0, hs[r]) the odd columns'
 * product to the odd sums; the zero product is exact, so each step is one rounding, as an FMA. The sums
 * stay in registers while the R rank rows stream past; even and odd are re-interleaved once, at the end. */
static inline __attribute__((always_inline)) void expand_cols(const int nv, __mmask32 last, const float *hs,
                                                              const uint16_t *bt, int64_t R, int64_t Dout,
                                                              const float *dora, uint16_t *y) {
    __m512 ev[MP], od[MP];
    for (int j = 0; j < nv; j++) ev[j] = od[j] = _mm512_setzero_ps();
    for (int64_t r = 0; r < R; r++, bt += Dout) {
        uint32_t w;
        memcpy(&w, hs + r, 4); /* hs[r] is of bf16 precision: its low 16 bits are zero */
        const __m512bh se = (__m512bh)_mm512_set1_epi32((int)(w >> 16)), so = (__m512bh)_mm512_set1_epi32((int)w);
        for (int j = 0; j < nv; j++) _mm_prefetch((const char *)(bt + 32 * j) + PREFETCH_BYTES, _MM_HINT_T0);
        for (int j = 0; j < nv; j++) {
            const __m512bh b = (__m512bh)(j == nv - 1 && last != ~0u ? _mm512_maskz_loadu_epi16(last, bt + 32 * j) : _mm512_loadu_si512(bt + 32 * j));
            ev[j] = _mm512_dpbf16_ps(ev[j], se, b);
            od[j] = _mm512_dpbf16_ps(od[j], so, b);
        }
    }
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int j = 0; j < nv; j++) {
        const __mmask32 m = j == nv - 1 ? last : ~0u;
        add_store(_mm512_permutex2var_ps(ev[j], lo, od[j]), (__mmask16)m, dora ? dora + 32 * j : NULL, y + 32 * j);
        if (m >> 16)
            add_store(_mm512_permutex2var_ps(ev[j], hi, od[j]), (__mmask16)(m >> 16), dora ? dora + 32 * j + 16 : NULL, y + 32 * j + 16);
    }
}

static void expand_one(const float *hs, const uint16_t *bt, int64_t R, int64_t Dout, const float *dora, uint16_t *y) {
    prefetch_slot(bt, R * Dout);
    int64_t d = 0;
    for (; d + 32 * MP <= Dout; d += 32 * MP) expand_cols(MP, ~0u, hs, bt + d, R, Dout, dora ? dora + d : NULL, y + d);
    for (; d < Dout; d += 32) {
        const __mmask32 last = Dout - d >= 32 ? ~0u : (__mmask32)((1u << (Dout - d)) - 1u);
        expand_cols(1, last, hs, bt + d, R, Dout, dora ? dora + d : NULL, y + d);
    }
}
#else
#define MV 8 /* 16-column vectors per register tile of the one-token expand */

/* One token, nv vectors of 16 columns (the last masked by `last`): the sums stay in registers while the
 * R rank rows of bt stream past (R sequential streams); then y + sums, rounded, DoRA-scaled, rounded. */
static inline __attribute__((always_inline)) void expand_cols(const int nv, __mmask16 last, const float *hs,
                                                              const uint16_t *bt, int64_t R, int64_t Dout,
                                                              const float *dora, uint16_t *y) {
    __m512 acc[MV];
    for (int j = 0; j < nv; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t r = 0; r < R; r++, bt += Dout) {
        const __m512 s = _mm512_set1_ps(hs[r]);
        for (int j = 0; j < nv; j += 2) _mm_prefetch((const char *)(bt + 16 * j) + PREFETCH_BYTES, _MM_HINT_T0);
        for (int j = 0; j < nv; j++) acc[j] = _mm512_fmadd_ps(s, bf16x16_to_f32(bt + 16 * j, j == nv - 1 ? last : 0xffff), acc[j]);
    }
    for (int j = 0; j < nv; j++) add_store(acc[j], j == nv - 1 ? last : 0xffff, dora ? dora + 16 * j : NULL, y + 16 * j);
}

static void expand_one(const float *hs, const uint16_t *bt, int64_t R, int64_t Dout, const float *dora, uint16_t *y) {
    int64_t d = 0;
    for (; d + 16 * MV <= Dout; d += 16 * MV) expand_cols(MV, 0xffff, hs, bt + d, R, Dout, dora ? dora + d : NULL, y + d);
    for (; d < Dout; d += 16) {
        const __mmask16 last = Dout - d >= 16 ? 0xffff : (__mmask16)((1u << (Dout - d)) - 1u);
        expand_cols(1, last, hs, bt + d, R, Dout, dora ? dora + d : NULL, y + d);
    }
}
#endif

static void expand_tokens(const float *hs, const uint16_t *bt, int64_t nt, int64_t R, int64_t Dout,
                          const float *dora, uint16_t *y) {
    int64_t t = 0;
    for (; t + MT <= nt; t += MT) EXPAND_COLUMNS(MT);
    for (; t < nt; t++) expand_one(hs + t * R, bt, R, Dout, dora, y + t * Dout);
}

/* hs (nt, R) fp32 = bf16(h * scaling): the scaled down-projection, rounded as the Semantics say */
static void scale_h(const uint16_t *h, float scaling, int64_t n, float *hs) {
    for (int64_t j = 0; j < n; j++) hs[j] = bf16_to_f32(f32_to_bf16(bf16_to_f32(h[j]) * scaling));
}

void lora_expand_bf16(uint16_t *y, const uint16_t *h, const uint16_t *BT, const int64_t *ids, const float *scaling,
                      const float *dora, int64_t B, int64_t T, int64_t R, int64_t Dout) {
#ifdef HAVE_AMX
    if (amx_enabled && T >= 16 && Dout % 16 == 0) {
        const int64_t blocks = (T + AMX_TOKENS - 1) / AMX_TOKENS, items = B * blocks, PC = expand_pairs(R);
        const int64_t RC = (R + 2 * PC - 1) / (2 * PC);
#pragma omp parallel
        {
            tiles_configure((int)PC);
            uint32_t *bv = aligned_alloc(64, (size_t)(RC * PC * Dout * 4));
            _Alignas(64) uint16_t hsb[16 * 32 * 8];
            uint16_t *hsp = RC <= 8 ? hsb : aligned_alloc(64, (size_t)(RC * 16 * 32 * 2));
            _Alignas(64) float cbuf[512];
            float hs[15 * R];
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < items; i++) {
                const work_item w = item_of(i, blocks, AMX_TOKENS, T);
                const int64_t n = ids[w.b], full = w.nt & ~(int64_t)15; /* whole 16-token blocks: tiles */
                const uint16_t *hb = h + (w.b * T + w.t0) * R, *bt = BT + n * R * Dout;
                const float *g = dora ? dora + n * Dout : NULL;
                uint16_t *yb = y + (w.b * T + w.t0) * Dout;
                if (full) expand_amx(hb, scaling[n], bt, full, R, Dout, g, yb, bv, hsp, cbuf);
                scale_h(hb + full * R, scaling[n], (w.nt - full) * R, hs);
                expand_tokens(hs, bt, w.nt - full, R, Dout, g, yb + full * Dout);
            }
            if (hsp != hsb) free(hsp);
            free(bv);
            _tile_release();
        }
        return;
    }
#endif
#if defined(__AVX512BF16__)
    if (T >= 16) {
        lora_expand_pairs(y, h, BT, ids, scaling, dora, B, T, R, Dout);
        return;
    }
#endif
    const int64_t blocks = (T + TB - 1) / TB, items = B * blocks;
#pragma omp parallel for schedule(dynamic, 1) if (B * T * R * Dout >= PARALLEL_MIN_MACS)
    for (int64_t i = 0; i < items; i++) {
        const work_item w = item_of(i, blocks, TB, T);
        const int64_t n = ids[w.b];
        float hs[TB * R];
        scale_h(h + (w.b * T + w.t0) * R, scaling[n], w.nt * R, hs);
        expand_tokens(hs, BT + n * R * Dout, w.nt, R, Dout, dora ? dora + n * Dout : NULL, y + (w.b * T + w.t0) * Dout);
    }
}

int lora_kernels_available(void) { return 1; }
#else
int lora_kernels_available(void) { return 0; }
int lora_amx_enable(void) { return 0; }
#endif

/* The decode step's small ops, fused (one token per row, bf16 or fp32 activations): compiled with the other
 * csrc/ files into one library by adapterhub/runtime/kernels/build.py and called through ctypes
 * (kernels/decode.py). The callers validate every argument; these functions trust their inputs.
 *
 * Why: a decode step of a small model is bound by per-op overhead, not bytes. In torch an RMSNorm is 7 ops,
 * rotary several, and the paged cache copies every key and value of a row out of its blocks in every layer
 * before attention (kv_cache.py's `update`); here each is one call and attention reads the blocks in place.
 *
 * Vocabulary as runtime/model: B rows, D features, H / Hkv query / KV heads of Dh, F MLP hidden. `is_bf16`
 * picks the element type of every activation, weight and cache pointer (uint16_t bf16 words, else float).
 * round() is the rounding to that type (bf16: nearest even as torch; fp32: none). Semantics, per row b:
 *
 *   decode_rmsnorm     x[b] = round(x[b] + res[b])                  when res != NULL (the residual add)
 *                      r = 1 / sqrt(sum_i(x[b]_i^2) / D + eps)      fp32 (x read as fp32)
 *                      out[b] = round(w * round(x[b] * r))          Llama; Gemma (is_offset):
 *                      out[b] = round(x[b] * r * (1 + w))           the product in fp32
 *   decode_attention   per head: q, k rotated: round(round(x * cos) + round(rotate_half(x) * sin));
 *                      k, v written to the paged cache at position pos[b] (block tables[b, pos / bs]);
 *                      query head h reads KV head h / (H / Hkv) at the keys j <= pos[b] (and
 *                      j > pos[b] - window when window > 0), read from their blocks in place;
 *                      s_j = (q . k_j) * scale (fp32), p_j = exp(s_j - max s), out = round(sum_j round(p_j) v_j *
 *                      (1 / sum_j p_j)): torch's CPU flash attention (SDPA), its blocks of 512 keys, its bf16
 *                      rounding of the unnormalised probabilities and, in bf16, its fast exp (fexp_bf16).
 *   decode_silu_mul    out[b] = round(round(g / (1 + exp(-g))) * u)   g, u: the gate and up halves
 *   decode_linear_bf16 y[m, n] = bf16(sum_k x[m, k] W[n, k])        fp32 sums (the tied lm_head, bf16)
 *
 * Rounding against the torch twin: the elementwise steps are torch's, rounding for rounding (products and
 * sums are not contracted into FMAs: see FP_EXACT); only the order of some fp32 sums (sum of squares, q . k, p . V,
 * the GEMV) differs, and expf (glibc) stands for torch's vectorised exp in SiLU and fp32 attention.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"
#if defined(__AVX512F__)
#include <immintrin.h>

/* torch computes x * c + y * s as two roundings, a mul then an add; GCC would fuse them into an FMA. */
#define FP_EXACT __attribute__((optimize("fp-contract=off")))
/* Below this many multiply-adds attention runs on one thread: waking the OpenMP team costs more (one row of
 * 9 heads at 300 keys took 93 us alone on the 2-core development machine). */
#define PARALLEL_MIN_MACS (1 << 18)

static inline float load1(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Stores the rounding of v, and returns the stored value as fp32. */
static inline float store1(void *p, int64_t i, float v, int is_bf16) {
    if (!is_bf16) return ((float *)p)[i] = v;
    const uint16_t h = f32_to_bf16(v);
    ((uint16_t *)p)[i] = h;
    return bf16_to_f32(h);
}

static inline float round1(float v, int is_bf16) { return is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* 16 values (masked) as fp32 */
static inline __m512 load16(const void *p, int64_t i, __mmask16 m, int is_bf16) {
    if (!is_bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1u); }

/* sum_i a_i b_i in fp32, 16 lanes then a tree (a different order from torch's: see the header). */
static inline float dot(const void *a, const float *b, int64_t n, int is_bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail16(n - i);
        acc = _mm512_fmadd_ps(load16(a, i, m, is_bf16), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* --- RMSNorm, with the residual add before it ------------------------------------------------------- */

FP_EXACT void decode_rmsnorm(void *x, const void *res, const void *w, void *out, int64_t rows, int64_t D,
                             float eps, int is_bf16, int is_offset) {
    for (int64_t b = 0; b < rows; b++) {
        void *xb = is_bf16 ? (void *)((uint16_t *)x + b * D) : (void *)((float *)x + b * D);
        void *ob = is_bf16 ? (void *)((uint16_t *)out + b * D) : (void *)((float *)out + b * D);
        float sq[16] = {0};
        for (int64_t i = 0; i < D; i++) {
            float v = load1(xb, i, is_bf16);
            if (res) v = store1(xb, i, v + load1(res, b * D + i, is_bf16), is_bf16);
            sq[i & 15] += v * v;
        }
        float total = 0;
        for (int j = 0; j < 16; j++) total += sq[j];
        const float r = 1.0f / sqrtf(total / (float)D + eps);
        for (int64_t i = 0; i < D; i++) {
            const float h = load1(xb, i, is_bf16) * r, wi = load1(w, i, is_bf16);
            store1(ob, i, is_offset ? h * (1.0f + wi) : wi * round1(h, is_bf16), is_bf16);
        }
    }
}

/* --- SiLU(gate) * up --------------------------------------------------------------------------------- */

/* gate and up: rows of `ld` elements (a fused gate_up output holds both halves of a row: ld = 2F). */
FP_EXACT void decode_silu_mul(const void *gate, const void *up, int64_t ld, void *out, int64_t rows, int64_t F,
                              int is_bf16) {
    for (int64_t b = 0; b < rows; b++)
        for (int64_t i = 0; i < F; i++) {
            const float g = load1(gate, b * ld + i, is_bf16);
            const float s = round1(g / (1.0f + expf(-g)), is_bf16);
            store1(out, b * F + i, s * load1(up, b * ld + i, is_bf16), is_bf16);
        }
}

/* --- rotary, the cache write, attention ------------------------------------------------------------ */

/* rotate-half RoPE of one head: y = round(round(x * cos) + round(rotate_half(x) * sin)), as fp32 */
FP_EXACT static void rope_head(const void *x, int64_t i0, const void *cos, const void *sin, int64_t c0, int64_t Dh,
                               int is_bf16, float *y) {
    const int64_t half = Dh / 2;
    for (int64_t d = 0; d < Dh; d++) {
        const float xd = load1(x, i0 + d, is_bf16);
        const float rot = d < half ? -load1(x, i0 + d + half, is_bf16) : load1(x, i0 + d - half, is_bf16);
        const float a = round1(xd * load1(cos, c0 + d, is_bf16), is_bf16);
        const float s = round1(rot * load1(sin, c0 + d, is_bf16), is_bf16);
        y[d] = round1(a + s, is_bf16);
    }
}

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* torch's fast exp for softmaxes rounded to bf16 (at::vec Vectorized<float>::fexp_u20, which its CPU flash
 * attention uses for reduced types): 2^(x log2 e) by the float's bit layout, the fraction corrected by a cubic.
 * About one bf16 ulp from exp(x); reproduced so bf16 attention rounds its probabilities as SDPA does. */
FP_EXACT static inline float fexp_bf16(float x) {
    const float c0 = 0.00010703434948458272f, c1 = 0.30354260500649682f;
    const float c2 = (float)-0.22433836478672356, c3 = (float)-0.079204240219773236;
    const float log2e = from_bits(0x3fb8aa3bu), ln_min = from_bits(0xc2aeac50u), ln_max = from_bits(0x42b17218u);
    if (x < ln_min) return 0.0f;
    if (x > ln_max) return INFINITY;
    float s = x * log2e;
    const float f = s - floorf(s);
    float r = fmaf(f, c3, c2);
    r = fmaf(f, r, c1);
    r = fmaf(f, r, c0);
    s = s - r;
    const int32_t bits = (int32_t)fmaf(8388608.0f, s, 1065353216.0f); /* truncated, as cvttps2dq */
    float y;
    memcpy(&y, &bits, 4);
    return y;
}

/* SDPA's CPU flash attention walks the keys in blocks of this many, rescaling its running sums per block. */
#define KV_SPLIT 512

/* One query head of one row (keys [first, last] of `span`), as torch's cpu_flash_attention computes it: per block of
 * KV_SPLIT keys the scores' max, p = exp(s - max) (bf16: fexp on the block's whole 16-key vectors, expf on its tail,
 * as _exp_reduce_sum_fusion_kernel), the block sum over 16 lanes then a tree then the tail, running sums rescaled
 * by expf(old max - new max), p rounded to bf16 before it multiplies V; out = acc * (1 / sum). Keys masked in the
 * torch path (outside [first, last]) contribute exactly zero there, so they are skipped here. */
FP_EXACT static void attend_head(const float *qrot, const char *kh, const char *vh, const int64_t *table, int64_t bs,
                                 int64_t first, int64_t last, int64_t span, int64_t Dh, float scale, int is_bf16,
                                 float *scores, float *acc, void *out, int64_t o0) {
    const int64_t es = is_bf16 ? 2 : 4;
    float top = -INFINITY, total = 0;
    for (int64_t d = 0; d < Dh; d++) acc[d] = 0;
    for (int64_t n0 = 0; n0 < span; n0 += KV_SPLIT) {
        const int64_t size = span - n0 < KV_SPLIT ? span - n0 : KV_SPLIT, vec_end = n0 + size / 16 * 16;
        const int64_t lo = first > n0 ? first : n0, hi = last < n0 + size - 1 ? last : n0 + size - 1;
        if (lo > hi) continue; /* all masked: a no-op in torch's loop too */
        float block_top = -INFINITY;
        for (int64_t j = lo; j <= hi; j++) {
            const int64_t at = (table[j / bs] * bs + j % bs) * Dh;
            scores[j - lo] = dot(kh + at * es, qrot, Dh, is_bf16) * scale;
            block_top = scores[j - lo] > block_top ? scores[j - lo] : block_top;
        }
        const float new_top = top > block_top ? top : block_top;
        float lanes[16] = {0};
        for (int64_t j = lo; j <= hi; j++) {
            const float x = scores[j - lo] - new_top;
            const float e = is_bf16 && j < vec_end ? fexp_bf16(x) : expf(x);
            if (j < vec_end) lanes[(j - n0) & 15] += e;
            scores[j - lo] = e;
        }
        for (int w = 8; w >= 1; w /= 2)
            for (int i = 0; i < w; i++) lanes[i] += lanes[i + w];
        float block_sum = lanes[0];
        for (int64_t j = (lo > vec_end ? lo : vec_end); j <= hi; j++) block_sum += scores[j - lo];
        const float rescale = expf(top - new_top);
        const float carried = rescale * total;
        total = block_sum + carried;
        top = new_top;
        if (n0 > 0)
            for (int64_t d = 0; d < Dh; d++) acc[d] *= rescale;
        for (int64_t j = lo; j <= hi; j++) {
            const __m512 pe = _mm512_set1_ps(round1(scores[j - lo], is_bf16));
            const int64_t at = (table[j / bs] * bs + j % bs) * Dh;
            for (int64_t d = 0; d < Dh; d += 16) {
                const __mmask16 m = tail16(Dh - d);
                _mm512_mask_storeu_ps(acc + d, m, _mm512_fmadd_ps(pe, load16(vh + at * es, d, m, is_bf16),
                                                                  _mm512_maskz_loadu_ps(m, acc + d)));
            }
        }
    }
    const float reciprocal = 1.0f / total;
    for (int64_t d = 0; d < Dh; d++) store1(out, o0 + d, acc[d] * reciprocal, is_bf16);
}

/* q (B, *) rows of ldq elements holding H heads of Dh; k, v rows of ldkv holding Hkv heads; cos, sin (B, Dh);
 * kc, vc this layer's cache (Hkv, nblocks, bs, Dh); pos (B,) the new token's position; tables (B, nt) the row's
 * blocks in position order; span: keys the torch path would read (max pos + 1); out (B, H * Dh). window 0: none. */
void decode_attention(const void *q, const void *k, const void *v, int64_t ldq, int64_t ldkv, const void *cos,
                      const void *sin, void *kc, void *vc, int64_t nblocks, int64_t bs, const int64_t *pos,
                      const int64_t *tables, int64_t nt, int64_t span, int64_t B, int64_t H, int64_t Hkv, int64_t Dh,
                      float scale, int64_t window, int is_bf16, void *out) {
    const int64_t es = is_bf16 ? 2 : 4, head_stride = nblocks * bs * Dh, group = H / Hkv;
    float krot[Dh];
    /* keys and values first: every query head of a group reads the new key */
    for (int64_t b = 0; b < B; b++) {
        const int64_t p = pos[b], slot = (tables[b * nt + p / bs] * bs + p % bs) * Dh;
        for (int64_t g = 0; g < Hkv; g++) {
            rope_head(k, b * ldkv + g * Dh, cos, sin, b * Dh, Dh, is_bf16, krot);
            char *kd = (char *)kc + (g * head_stride + slot) * es, *vd = (char *)vc + (g * head_stride + slot) * es;
            for (int64_t d = 0; d < Dh; d++) store1(kd, d, krot[d], is_bf16);
            memcpy(vd, (const char *)v + (b * ldkv + g * Dh) * es, Dh * es);
        }
    }
    int64_t macs = 0;
    for (int64_t b = 0; b < B; b++) macs += H * (pos[b] + 1) * Dh * 2;
#pragma omp parallel if (macs >= PARALLEL_MIN_MACS)
    {
        float *scores = malloc(sizeof(float) * KV_SPLIT), qrot[Dh], acc[Dh];
#pragma omp for schedule(dynamic, 1) /* dynamic: a thread slowed by another process hands work over */
        for (int64_t item = 0; item < B * H; item++) {
            const int64_t b = item / H, h = item % H, g = h / group, p = pos[b];
            const int64_t first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            rope_head(q, b * ldq + h * Dh, cos, sin, b * Dh, Dh, is_bf16, qrot);
            attend_head(qrot, (const char *)kc + g * head_stride * es, (const char *)vc + g * head_stride * es,
                        tables + b * nt, bs, first, p, span, Dh, scale, is_bf16, scores, acc, out, (b * H + h) * Dh);
        }
        free(scores);
    }
}

/* --- the bf16 GEMV of few rows (the lm_head) ---------------------------------------------------------- */

/* acc += x . w over 32 bf16 pairs into 16 fp32 lanes */
static inline __m512 dot_bf16x32(__m512 acc, __m512i x, __m512i w) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
#else
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000);
    const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(x, hi)), wo = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
    return _mm512_fmadd_ps(xe, we, _mm512_fmadd_ps(xo, wo, acc));
#endif
}

#define GEMV_ROWS 8 /* x rows per pass over W: each row of W is read from memory once per 8 rows of x */

/* y[r, n0 + j] for MR rows of x and the NB rows of W from n0 (fewer at the end of W): MR * NB <= 16 fp32
 * accumulators of 16 lanes, reduced and rounded 16 at once (reduce_sums: the tree of _mm512_reduce_add_ps, so
 * the result is that of one reduction per output). Inlined with constant MR, NB: the accumulators stay in
 * registers, and each load of x serves NB rows of W, each load of W MR rows of x. */
static inline __attribute__((always_inline)) void gemv_tile(const int MR, const int NB, const uint16_t *x, int64_t K,
                                                            const uint16_t *W, int64_t N, int64_t n0, uint16_t *y) {
    __m512 acc[16];
    for (int i = 0; i < MR * NB; i++) acc[i] = _mm512_setzero_ps();
    const int nb = N - n0 < NB ? (int)(N - n0) : NB;
    const uint16_t *ahead = n0 + 3 * NB <= N ? W + (n0 + 2 * NB) * K : NULL;
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1u;
        __m512i w[16];
        for (int j = 0; j < NB; j++) w[j] = j < nb ? _mm512_maskz_loadu_epi16(mk, W + (n0 + j) * K + k) : _mm512_setzero_si512();
        if (ahead) /* the same line of each row two tiles on: the tile reads NB streams, which the hardware misses */
            for (int j = 0; j < NB; j++) _mm_prefetch((const char *)(ahead + j * K + k), _MM_HINT_T1);
        for (int r = 0; r < MR; r++) {
            const __m512i xr = _mm512_maskz_loadu_epi16(mk, x + r * K + k);
            for (int j = 0; j < NB; j++) acc[r * NB + j] = dot_bf16x32(acc[r * NB + j], xr, w[j]);
        }
    }
    _Alignas(32) uint16_t sums[16];
    reduce_sums(acc, MR * NB, sums);
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < nb; j++) y[r * N + n0 + j] = sums[r * NB + j];
}

/* rows of W per tile for MR rows of x: as many as 16 accumulators allow */
static inline int gemv_rows_of_w(int64_t MR) { return MR == 1 ? 16 : MR == 2 ? 8 : MR <= 4 ? 4 : 2; }

#define GEMV_CASE(MR) case MR: gemv_tile(MR, gemv_rows_of_w(MR), xm, K, W, N, n, ym); break;

/* x (M, K), W (N, K), y (M, N), all bf16 row-major. Where the CPU has AVX512-BF16 the products come from
 * VDPBF16PS, which reads bf16 subnormal inputs as zero. */
void decode_linear_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, uint16_t *y) {
    for (int64_t m0 = 0; m0 < M; m0 += GEMV_ROWS) {
        const int64_t mr = M - m0 < GEMV_ROWS ? M - m0 : GEMV_ROWS, nb = gemv_rows_of_w(mr);
        const uint16_t *xm = x + m0 * K;
        uint16_t *ym = y + m0 * N;
#pragma omp parallel for schedule(dynamic, 16) /* dynamic: as in attention; 16 tiles: 32-256 rows of W */
        for (int64_t n = 0; n < N; n += nb) {
            switch (mr) { GEMV_CASE(1) GEMV_CASE(2) GEMV_CASE(3) GEMV_CASE(4) GEMV_CASE(5) GEMV_CASE(6) GEMV_CASE(7)
                          GEMV_CASE(8) }
        }
    }
}

int decode_kernels_available(void) { return 1; }
#else
int decode_kernels_available(void) { return 0; }
#endif

/* A whole decode step of the decoder layers in one call: compiled with the other csrc/ files into one library
 * by adapterhub/runtime/kernels/build.py, called through ctypes (kernels/decode_layer.py), which builds the
 * descriptors below once per change of the model's weights or adapter stacks. The callers validate every
 * argument; these functions trust their inputs.
 *
 * Why: a decode step of a small model is bound by per-call overhead. Through Python each 4-bit linear costs
 * ~9 us of dispatch whatever its size, and its LoRA term two more ctypes calls and a gather (~12 us) for
 * nanoseconds of flops: 210 linears per step of a 30-layer model. Here a step is one call.
 *
 * Semantics: exactly the per-op decode step (model/layers.py `DecoderLayer.decode`, each projection an
 * AdapterLinear.forward with the compiled CpuOps), by calling the same C functions in the same order:
 *
 *   for each layer:  x = round(x + h)  (not before the first);  n = rmsnorm(x) * w_in     decode_rmsnorm
 *                    q, k, v = lin_q(n), lin_k(n), lin_v(n)  (or one fused qkv linear)
 *                    a = attention(rope(q), rope(k) -> cache, v -> cache)                decode_attention
 *                    h = lin_o(a);  x = round(x + h);  n = rmsnorm(x) * w_post
 *                    g, u = lin_gate(n), lin_up(n)  (or one fused gate_up);  h = lin_down(silu(g) * u)
 *   at the end:      x = round(x + h)
 *
 *   lin(x), per row b with slot ids[b] (AdapterLinear.forward; no ids: the base only):
 *       y = base(x)             4-bit: lut4_linear (fourbit_cpu.c), then round(y + bias)
 *                               dense (fp32: model/decode_stack.py): fp32 sums plus the bias (F.linear's addmm)
 *       for each rank group:    n = slot_map[ids[b]]; y = lora_expand(y, lora_shrink(x, A[n]), BT[n], scaling[n],
 *                               dora[n] when the group holds a DoRA adapter)   (lora_cpu.c in bf16; in fp32
 *                               the same formulas without roundings: h = x A^T, y = (y + (h s) BT) * dora)
 *       the bias is added after the LoRA terms instead when a group of the layer holds a DoRA adapter.
 *   The projections of one input (q, k, v; gate, up) run their bases first, then their LoRA terms (`project`):
 *   each output is computed as above, the order between independent outputs does not matter.
 *
 * bf16 results equal the per-op step's bit for bit where the same kernels run (4-bit weights, LoRA, the norms,
 * attention, SiLU); a dense weight's GEMV sums in another order than torch's GEMM, as do the fp32 LoRA terms.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* --- the functions of the other sources this step calls ---------------------------------------------- */

void lut4_linear(const void *x, int is_bf16, int64_t M, int64_t N, int64_t K, const uint8_t *w,
                 const float *absmax, const float *code, void *y);
void lora_shrink_bf16(const uint16_t *x, const uint16_t *A, const int64_t *ids, int64_t B, int64_t T, int64_t R,
                      int64_t K, uint16_t *h);
void lora_expand_bf16(uint16_t *y, const uint16_t *h, const uint16_t *BT, const int64_t *ids, const float *scaling,
                      const float *dora, int64_t B, int64_t T, int64_t R, int64_t Dout);
void decode_rmsnorm(void *x, const void *res, const void *w, void *out, int64_t rows, int64_t D, float eps,
                    int is_bf16, int is_offset);
void decode_silu_mul(const void *gate, const void *up, int64_t ld, void *out, int64_t rows, int64_t F, int is_bf16);
void decode_attention(const void *q, const void *k, const void *v, int64_t ldq, int64_t ldkv, const void *cos,
                      const void *sin, void *kc, void *vc, int64_t nblocks, int64_t bs, const int64_t *pos,
                      const int64_t *tables, int64_t nt, int64_t span, int64_t B, int64_t H, int64_t Hkv, int64_t Dh,
                      float scale, int64_t window, int is_bf16, void *out);

/* --- descriptors (mirrored by ctypes Structures in kernels/decode_layer.py: keep the field order) --------- */

typedef struct {
    const void *A;           /* (Ng, R, Din) in the activation dtype */
    const void *BT;          /* (Ng, R, Dout): lora_B transposed */
    const float *scaling;    /* (Ng,) */
    const float *dora;       /* (Ng, Dout), or NULL when no adapter of the group is DoRA */
    const int64_t *slot_map; /* (N,) pool slot -> local slot */
    int64_t R;
} lora_group;

typedef struct {
    int64_t N, K;          /* out, in features */
    const void *W;         /* dense (N, K) in the activation dtype, or NULL for 4-bit */
    const uint8_t *packed; /* 4-bit: (N K / 2,) */
    const float *absmax;   /* 4-bit: (N K / 64,) decoded */
    const float *code;     /* 4-bit: (16,) */
    const void *bias;      /* (N,) or NULL */
    int64_t has_dora;      /* a group holds a DoRA adapter: the bias comes after the LoRA terms */
    int64_t ngroups;
    const lora_group *groups;
} linear_desc;

typedef struct {
    const void *in_norm, *post_norm; /* (D,) */
    linear_desc qkv[3];              /* q, k, v; a fused qkv projection is qkv[0] alone (is_fused_qkv) */
    linear_desc o;
    linear_desc gate_up[2];          /* gate, up; fused: gate_up[0] alone */
    linear_desc down;
    int64_t is_fused_qkv, is_fused_gate_up;
    int64_t window;                  /* sliding window of this layer, 0: none */
} layer_desc;

typedef struct {
    int64_t L, D, H, Hkv, Dh, F;
    float eps, scale;
    int64_t is_offset_norm, is_bf16;
    int64_t max_rank;
    const layer_desc *layers;
} stack_desc;

typedef struct {
    void *x;               /* (B, D): the residual stream, updated in place */
    int64_t B;
    const int64_t *ids;    /* (B,) pool slot per row, or NULL (base only) */
    const void *cos, *sin; /* (B, Dh) */
    void *kc, *vc;         /* the cache's (L, Hkv, nblocks, bs, Dh) */
    int64_t nblocks, bs;
    const int64_t *pos, *tables; /* (B,), (B, nt) */
    int64_t nt, span;
    void *scratch;         /* decode_stack_scratch_bytes(stack, B) bytes, 64-byte aligned */
} step_desc;

/* --- the dense GEMV of few rows, with the bias before its one rounding -------------------------------- */

#define GEMV_ROWS 8
#define GEMV_PARALLEL_MIN_MACS (1 << 16) /* below: one thread (waking the team costs more) */

static inline __m512 load16(const void *p, int64_t i, __mmask16 m, int is_bf16) {
    if (!is_bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
}

static inline float load1(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(void *p, int64_t i, float v, int is_bf16) {
    if (is_bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* y (M, N) = x (M, K) W (N, K)^T (+ bias), fp32 sums (VDPBF16PS for bf16 where the CPU has it, as
 * decode_linear_bf16), rounded once */
static void gemv(const void *x, int64_t M, int64_t K, const void *W, int64_t N, const void *bias, void *y, int is_bf16) {
    const int64_t es = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(dynamic, 32) if (M * N * K >= GEMV_PARALLEL_MIN_MACS)
    for (int64_t n = 0; n < N; n++) {
        const char *wn = (const char *)W + n * K * es;
        const float b = bias ? load1(bias, n, is_bf16) : 0.0f;
        for (int64_t m0 = 0; m0 < M; m0 += GEMV_ROWS) {
            const int64_t mr = M - m0 < GEMV_ROWS ? M - m0 : GEMV_ROWS;
            __m512 acc[GEMV_ROWS];
            for (int64_t r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
            if (is_bf16) {
                for (int64_t k = 0; k < K; k += 32) {
                    const __mmask32 mk = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1u;
                    const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mk, (const uint16_t *)wn + k);
                    for (int64_t r = 0; r < mr; r++)
                        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(mk, (const uint16_t *)x + (m0 + r) * K + k), w);
                }
            } else
#endif
            {
                for (int64_t k = 0; k < K; k += 16) {
                    const __mmask16 mk = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1u);
                    const __m512 w = load16(wn, k, mk, is_bf16);
                    for (int64_t r = 0; r < mr; r++)
                        acc[r] = _mm512_fmadd_ps(load16((const char *)x + (m0 + r) * K * es, k, mk, is_bf16), w, acc[r]);
                }
            }
            for (int64_t r = 0; r < mr; r++) store1(y, (m0 + r) * N + n, _mm512_reduce_add_ps(acc[r]) + b, is_bf16);
        }
    }
}

/* --- the fp32 LoRA terms (the bf16 ones are lora_cpu.c's) ------------------------------------------ */

/* h[b] = x[b] A[ids[b]]^T, (B, R) fp32 */
static void shrink_f32(const float *x, const float *A, const int64_t *ids, int64_t B, int64_t R, int64_t K, float *h) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            const float *a = A + (ids[b] * R + r) * K, *xb = x + b * K;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                const __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1u);
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xb + k), _mm512_maskz_loadu_ps(m, a + k), acc);
            }
            h[b * R + r] = _mm512_reduce_add_ps(acc);
        }
}

/* y[b] = (y[b] + (h[b] scaling[n]) BT[n]) * dora[n] (no dora: times 1), n = ids[b] */
static void expand_f32(float *y, const float *h, const float *BT, const int64_t *ids, const float *scaling,
                       const float *dora, int64_t B, int64_t R, int64_t N) {
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = ids[b];
        float *yb = y + b * N;
        for (int64_t d = 0; d < N; d += 16) {
            const __mmask16 m = N - d >= 16 ? 0xffff : (__mmask16)((1u << (N - d)) - 1u);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t r = 0; r < R; r++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(h[b * R + r] * scaling[n]),
                                      _mm512_maskz_loadu_ps(m, BT + (n * R + r) * N + d), acc);
            __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, yb + d), acc);
            if (dora) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, dora + n * N + d));
            _mm512_mask_storeu_ps(yb + d, m, v);
        }
    }
}

/* --- projections: AdapterLinear.forward ------------------------------------------------------------ */

static void add_bias(void *y, const void *bias, int64_t B, int64_t N, int is_bf16) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t n = 0; n < N; n++) store1(y, b * N + n, load1(y, b * N + n, is_bf16) + load1(bias, n, is_bf16), is_bf16);
}

typedef struct {
    const linear_desc *L;
    const void *x; /* (B, K) */
    void *y;       /* (B, N) */
} projection;

/* The projections of one input stage (q, k, v; or gate, up), each as AdapterLinear.forward: the bases first, then
 * every row's LoRA terms in one parallel loop over (row, projection) (one OpenMP team for all of them, not two
 * per rank group and projection; a single row's q, k and v terms on both cores), then the late biases. Each row's term is the lora_cpu.c kernels' for that row alone (a
 * row's result does not depend on the others); a row adds nothing in a group its adapter is not in (local slot 0:
 * zero A and B, DoRA scale 1), so those calls are skipped. */
static void project(const projection *P, int n, int64_t B, const int64_t *ids, int is_bf16, int64_t max_rank) {
    const int64_t es = is_bf16 ? 2 : 4;
    int has_lora = 0;
    for (int i = 0; i < n; i++) {
        const linear_desc *L = P[i].L;
        const int late_bias = L->bias && ids && L->has_dora; /* DoRA scales the output before the bias */
        if (L->W) {
            gemv(P[i].x, B, L->K, L->W, L->N, late_bias ? NULL : L->bias, P[i].y, is_bf16);
        } else {
            lut4_linear(P[i].x, is_bf16, B, L->N, L->K, L->packed, L->absmax, L->code, P[i].y);
            if (L->bias && !late_bias) add_bias(P[i].y, L->bias, B, L->N, is_bf16);
        }
        has_lora |= L->ngroups > 0;
    }
    if (!ids || !has_lora) return;
#pragma omp parallel for schedule(dynamic, 1) if (B * n > 1)
    for (int64_t item = 0; item < B * n; item++) {
        const int64_t b = item / n, i = item % n;
        _Alignas(64) char h[(max_rank + 16) * 4];
        {
            const linear_desc *L = P[i].L;
            const char *xb = (const char *)P[i].x + b * L->K * es;
            char *yb = (char *)P[i].y + b * L->N * es;
            for (int64_t g = 0; g < L->ngroups; g++) {
                const lora_group *G = L->groups + g;
                const int64_t local = G->slot_map[ids[b]];
                if (!local) continue;
                if (is_bf16) {
                    lora_shrink_bf16((const uint16_t *)xb, G->A, &local, 1, 1, G->R, L->K, (uint16_t *)h);
                    lora_expand_bf16((uint16_t *)yb, (const uint16_t *)h, G->BT, &local, G->scaling, G->dora, 1, 1,
                                     G->R, L->N);
                } else {
                    shrink_f32((const float *)xb, G->A, &local, 1, G->R, L->K, (float *)h);
                    expand_f32((float *)yb, (const float *)h, G->BT, &local, G->scaling, G->dora, 1, G->R, L->N);
                }
            }
        }
    }
    for (int i = 0; i < n; i++)
        if (P[i].L->bias && P[i].L->has_dora) add_bias(P[i].y, P[i].L->bias, B, P[i].L->N, is_bf16);
}

/* --- the step ------------------------------------------------------------------------------------- */

#define ALIGN(n) (((n) + 63) & ~(int64_t)63)

/* Scratch of a step of B rows: normed and h (B, D), qkv (B, (H + 2 Hkv) Dh), attended (B, H Dh), gate_up
 * (B, 2F), activated (B, F). */
int64_t decode_stack_scratch_bytes(const stack_desc *S, int64_t B) {
    const int64_t es = S->is_bf16 ? 2 : 4;
    return ALIGN(B * S->D * es) * 2 + ALIGN(B * (S->H + 2 * S->Hkv) * S->Dh * es) + ALIGN(B * S->H * S->Dh * es) +
           ALIGN(B * 2 * S->F * es) + ALIGN(B * S->F * es);
}

static void add_into(void *x, const void *h, int64_t n, int is_bf16) {
    for (int64_t i = 0; i < n; i++) store1(x, i, load1(x, i, is_bf16) + load1(h, i, is_bf16), is_bf16);
}

void decode_stack(const stack_desc *S, const step_desc *T) {
    const int bf = (int)S->is_bf16;
    const int64_t es = bf ? 2 : 4, B = T->B, D = S->D, q = S->H * S->Dh, kv = S->Hkv * S->Dh, F = S->F;
    const int64_t R = S->max_rank, layer_elems = S->Hkv * T->nblocks * T->bs * S->Dh;
    char *p = T->scratch;
    void *normed = p; p += ALIGN(B * D * es);
    void *h = p; p += ALIGN(B * D * es);
    char *qkv = p; p += ALIGN(B * (q + 2 * kv) * es);
    void *att = p; p += ALIGN(B * q * es);
    char *gu = p; p += ALIGN(B * 2 * F * es);
    void *act = p;
    for (int64_t l = 0; l < S->L; l++) {
        const layer_desc *Y = S->layers + l;
        decode_rmsnorm(T->x, l ? h : NULL, Y->in_norm, normed, B, D, S->eps, bf, (int)S->is_offset_norm);
        const char *qp, *kp, *vp;
        int64_t ldq, ldkv;
        if (Y->is_fused_qkv) { /* rows of q | k | v */
            project(&(projection){&Y->qkv[0], normed, qkv}, 1, B, T->ids, bf, R);
            qp = qkv, kp = qkv + q * es, vp = qkv + (q + kv) * es, ldq = ldkv = q + 2 * kv;
        } else { /* q (B, q), then k (B, kv), then v (B, kv) */
            qp = qkv, kp = qkv + B * q * es, vp = qkv + B * (q + kv) * es, ldq = q, ldkv = kv;
            const projection P[3] = {{&Y->qkv[0], normed, (void *)qp}, {&Y->qkv[1], normed, (void *)kp},
                                     {&Y->qkv[2], normed, (void *)vp}};
            project(P, 3, B, T->ids, bf, R);
        }
        decode_attention(qp, kp, vp, ldq, ldkv, T->cos, T->sin, (char *)T->kc + l * layer_elems * es,
                         (char *)T->vc + l * layer_elems * es, T->nblocks, T->bs, T->pos, T->tables, T->nt, T->span, B,
                         S->H, S->Hkv, S->Dh, S->scale, Y->window, bf, att);
        project(&(projection){&Y->o, att, h}, 1, B, T->ids, bf, R);
        decode_rmsnorm(T->x, h, Y->post_norm, normed, B, D, S->eps, bf, (int)S->is_offset_norm);
        int64_t ld;
        const char *gate, *up;
        if (Y->is_fused_gate_up) { /* rows of gate | up */
            project(&(projection){&Y->gate_up[0], normed, gu}, 1, B, T->ids, bf, R);
            gate = gu, up = gu + F * es, ld = 2 * F;
        } else {
            gate = gu, up = gu + B * F * es, ld = F;
            const projection P[2] = {{&Y->gate_up[0], normed, (void *)gate}, {&Y->gate_up[1], normed, (void *)up}};
            project(P, 2, B, T->ids, bf, R);
        }
        decode_silu_mul(gate, up, ld, act, B, F, bf);
        project(&(projection){&Y->down, act, h}, 1, B, T->ids, bf, R);
    }
    add_into(T->x, h, B * D, bf);
}

int decode_stack_available(void) { return 1; }
#else
int decode_stack_available(void) { return 0; }
#endif

/* What the CPU kernels (fourbit_cpu.c, lora_cpu.c, decode_cpu.c) share: bf16 <-> fp32 one value at a time, as torch
 * converts (c10::BFloat16: round to nearest even, NaN stays NaN), 16 fp32 sums reduced and rounded at once, and
 * the AMX permission request and tile configuration (Intel SDM vol. 1, ch. 18: palette 1, per-tile rows and bytes
 * per row). */
#ifndef ADAPTERHUB_CPU_COMMON_H
#define ADAPTERHUB_CPU_COMMON_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* f32_to_bf16 on 16 lanes, bit for bit (round to nearest even; a NaN keeps its high half, made quiet) */
static inline __m256i f32_to_bf16_x16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f), one = _mm512_set1_epi32(1);
    __m512i r = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    r = _mm512_srli_epi32(_mm512_add_epi32(u, r), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

/* out[k] = f32_to_bf16(_mm512_reduce_add_ps(v[k])) for k < n <= 16, bit for bit: the same tree (lanes i and
 * i + 8, then i + 4, i + 2, i + 1), but 16 vectors at a time, halves of two vectors side by side, and one
 * rounding for all: 55 vector operations instead of ~8 per vector plus 16 scalar roundings. 2-8% faster
 * at M = 4..8 on the 135M shapes in fourbit_cpu.c, where a tile is only 9 blocks long. */
static inline __attribute__((always_inline)) void reduce_sums(const __m512 *v, const int n, uint16_t *out) {
    __m512 s1[8], s2[4], s3[2];
    for (int j = 0; j < 8; j++) {
        const __m512 a = 2 * j < n ? v[2 * j] : _mm512_setzero_ps();
        const __m512 b = 2 * j + 1 < n ? v[2 * j + 1] : _mm512_setzero_ps();
        s1[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee)); /* i, i + 8 */
    }
    for (int j = 0; j < 4; j++) /* i, i + 4 */
        s2[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0x88),
                              _mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0xdd));
    for (int j = 0; j < 2; j++) /* i, i + 2 */
        s3[j] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * j], s2[2 * j + 1], 0x44),
                              _mm512_shuffle_ps(s2[2 * j], s2[2 * j + 1], 0xee));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xdd));
    const __m512i lane = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0); /* 4 (k % 4) + k / 4 */
    _mm256_storeu_si256((__m256i *)out, f32_to_bf16_x16(_mm512_permutexvar_ps(lane, r)));
}
#endif

#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands out the AMX tile state per process on request; 1 when granted. */
static inline int amx_request(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}
#endif
#endif

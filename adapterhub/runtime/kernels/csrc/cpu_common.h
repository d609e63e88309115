/* What the CPU kernels (fourbit_cpu.c, lora_cpu.c) share: bf16 <-> fp32 one value at a time, as torch converts
 * (c10::BFloat16: round to nearest even, NaN stays NaN), and the AMX permission request and tile
 * configuration (Intel SDM vol. 1, ch. 18: palette 1, per-tile rows and bytes per row). */
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

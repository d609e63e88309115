// Device helpers shared by the adapterhub kernels: element types, 128-bit vectors, the NF4 table.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace adapterhub {

// NF4 code values, index = 4-bit code (SEMANTICS §1.1; bitsandbytes' table, float32 repr values).
// tests/gpu checks nf4_dequantize bit-exactly against the torch runtime, which shares its table with
// reference/nf4.py, so a typo here cannot pass. Kernels copy it to shared memory: lanes index it with
// different codes, which the constant cache would serialize.
static __constant__ float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

// Conversions between the element types and fp32; *_rn = round to nearest even, as torch's .to().
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// x rounded to T and back: the kernels mirror each intermediate rounding of their torch twins.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// One 128-bit load/store: 8 bf16 / fp16 or 4 fp32 elements (callers guarantee 16-byte alignment).
template <typename T>
union Vec {
  static constexpr int kSize = 16 / sizeof(T);
  uint4 raw;
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  Vec<T> out;
  out.raw = __ldg(reinterpret_cast<const uint4*>(p));
  return out;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace adapterhub

// Kernel launch on `stream`, written as a macro so that cuda/emulator/host_shim.h can run the same
// launchers on a CPU. Usage: ADAPTERHUB_LAUNCH(kernel_pointer, grid, block, stream)(args...).
#ifndef ADAPTERHUB_LAUNCH
#define ADAPTERHUB_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

// Runs the statement(s) with `T` bound to the element type of an AdapterhubDType (punica-style dispatch).
#define ADAPTERHUB_DISPATCH_DTYPE(dtype, ...) \
  do {                                        \
    switch (dtype) {                          \
      case kAdapterhubBFloat16: {             \
        using T = __nv_bfloat16;              \
        __VA_ARGS__;                          \
      } break;                                \
      case kAdapterhubFloat16: {              \
        using T = __half;                     \
        __VA_ARGS__;                          \
      } break;                                \
      case kAdapterhubFloat32: {              \
        using T = float;                      \
        __VA_ARGS__;                          \
      } break;                                \
    }                                         \
  } while (0)

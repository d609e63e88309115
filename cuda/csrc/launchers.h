// Raw-pointer launchers of the adapterhub CUDA ops: the only interface between the kernels
// (cuda/csrc/*.cu, plain nvcc, no torch headers) and the torch binding (cuda/csrc/ops.cpp).
//
// C linkage on purpose: a .cu file that defines a launcher with a signature different from the one
// declared here fails to compile ("conflicting declaration"), instead of leaving an undefined
// symbol that only shows when the extension is loaded on a GPU machine.
//
// Every launcher enqueues on `stream` and returns at once; the caller checks the launch error.
// Shapes: M or rows = B*T flattened rows, K = Din, N output features (GEMV) or adapter slots (LoRA),
// R rank, G quant block size.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

// Element type of the activations, weights and outputs (accumulation is always fp32).
enum AdapterhubDType : int32_t { kAdapterhubBFloat16 = 0, kAdapterhubFloat16 = 1, kAdapterhubFloat32 = 2 };

extern "C" {

// out (numel,) = code[q] * absmax[j / G], product in fp32, one RNE rounding to `dtype` (semantics §1.5).
// packed (numel/2,) uint8, high nibble = even element; absmax (ceil(numel/G),) f32; numel even;
// G a power of two >= 16 (bitsandbytes' block sizes).
void launch_nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t numel, int64_t blocksize,
                           void* out, AdapterhubDType dtype, cudaStream_t stream);

// y (M, N) = x (M, K) @ dequant(W)^T with W (N, K) in NF4, fp32 accumulation, one rounding.
// Needs K % 32 == 0 and G a power of two >= 32 (every 32-element chunk lies in one quant block).
void launch_nf4_gemv(const void* x, const uint8_t* packed, const float* absmax, int64_t M, int64_t N, int64_t K,
                     int64_t blocksize, void* y, AdapterhubDType dtype, cudaStream_t stream);

// h (B*T, R) = x (B*T, K) @ A_stack[ids[m / T]]^T rounded to `dtype`, A_stack (N, R, K), ids (B,) int64.
// Needs K % 8 == 0.
void launch_lora_shrink(const void* x, const void* A_stack, const int64_t* ids, int64_t rows, int64_t tokens, int64_t K,
                        int64_t R, void* h, AdapterhubDType dtype, cudaStream_t stream);

// In place, for each row m = b*T + t with slot n = ids[b] (roundings as runtime/kernels/ops.py::Ops.lora_expand):
//   hs = round(h[m] * scaling[n]);  y[m] = round(y[m] + hs @ B_stack[n]);  y[m] = round(y[m] * dora_scale[n])
// h (B*T, R), B_stack (N, R, Dout) (lora_B transposed), scaling (N,) f32, dora_scale (N, Dout) f32 or null.
void launch_lora_expand(void* y, const void* h, const void* B_stack, const int64_t* ids, const float* scaling,
                        const float* dora_scale, int64_t rows, int64_t tokens, int64_t Dout, int64_t R,
                        AdapterhubDType dtype, cudaStream_t stream);

}  // extern "C"

// Raw-pointer launchers of the adapterhub CUDA ops: the only interface between the kernels
// (cuda/csrc/*.cu, plain nvcc, no torch headers) and the torch binding (cuda/csrc/ops.cpp).
//
// C linkage on purpose: a .cu file that defines a launcher with a signature different from the one
// declared here fails to compile ("conflicting declaration"), instead of leaving an undefined
// symbol that only shows when the extension is loaded on a GPU machine.
//
// Every launcher enqueues on `stream` and returns at once; the caller checks the launch error.
// Shapes use the project vocabulary: M rows, K = Din, N output features / adapter slots, R rank, G block.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

// Element type of the activations, weights and outputs (fp32 accumulation always).
enum AdapterhubDType : int32_t { kAdapterhubBFloat16 = 0, kAdapterhubFloat16 = 1 };

extern "C" {

// out (numel,) = code[q] * absmax[j / G], rounded once to `dtype` (SEMANTICS §1.4-1.5).
// packed (numel/2,) uint8, high nibble = even element; absmax (ceil(numel/G),) f32; numel even.
void launch_nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t numel, int64_t blocksize,
                           void* out, AdapterhubDType dtype, cudaStream_t stream);

// y (M, N) = x (M, K) @ dequant(W)^T with W (N, K) in NF4, fp32 accumulation.
// Needs K % 32 == 0 and G % 32 == 0 (every 32-element chunk lies in one quant block).
void launch_nf4_gemv(const void* x, const uint8_t* packed, const float* absmax, int64_t M, int64_t N, int64_t K,
                     int64_t blocksize, void* y, AdapterhubDType dtype, cudaStream_t stream);

// h (M, R) f32 = x (M, K) @ A_stack[ids]^T, with A_stack (Nslots, R, K) and ids (M,) int64.
void launch_lora_shrink(const void* x, const void* a_stack, const int64_t* ids, int64_t M, int64_t K, int64_t R,
                        float* h, AdapterhubDType dtype, cudaStream_t stream);

// y (M, Dout) <- dora_scale[ids] * (y + scaling[ids] * h @ B_stack[ids]^T), in place,
// with h (M, R) f32, B_stack (Nslots, Dout, R), scaling (Nslots,) f32, dora_scale (Nslots, Dout).
void launch_lora_expand(void* y, const float* h, const void* b_stack, const int64_t* ids, const float* scaling,
                        const void* dora_scale, int64_t M, int64_t Dout, int64_t R, AdapterhubDType dtype,
                        cudaStream_t stream);

}  // extern "C"

// nf4_dequantize: NF4 codes + float32 block absmax -> bf16 / fp16 / fp32 weight.
//
// CPU code reference (semantics §1.4-1.5; torch twin: adapterhub/runtime/kernels/ops.py::Ops.dequantize_4bit):
//   for j in range(numel):
//       byte = packed[j // 2]
//       q = byte >> 4 if j % 2 == 0 else byte & 0xF      # high nibble first (bitsandbytes order)
//       out[j] = dtype(float32(code[q] * absmax[j // G]))  # one fp32 product, one RNE rounding
//
// Memory bound (0.5 byte in, 2 bytes out per bf16 element): each thread turns 8 packed bytes (one
// 64-bit load) into 16 elements (two 128-bit stores for bf16 / fp16, four for fp32). G is a power of
// two >= 16 (bitsandbytes' block sizes; the binding checks it), so quant blocks are flat over the whole
// tensor, each 16-element group lies in one block, and the block index is a shift, not a division.
#include "common.cuh"

namespace adapterhub {

constexpr int kDequantThreads = 256;
constexpr int kGroup = 16;  // elements per thread per step (8 packed bytes)

template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                      int64_t numel, int log2_blocksize, T* __restrict__ out) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = kNF4Code[threadIdx.x];
  __syncthreads();

  const int64_t groups = numel / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t g = first; g < groups; g += stride) {
    const int64_t j0 = g * kGroup;
    const uint2 bytes = __ldg(reinterpret_cast<const uint2*>(packed) + g);
    const float a = __ldg(absmax + (j0 >> log2_blocksize));
    float values[kGroup];
#pragma unroll
    for (int i = 0; i < kGroup / 2; ++i) {
      const uint32_t word = i < 4 ? bytes.x : bytes.y;
      const uint32_t byte = (word >> (8 * (i % 4))) & 0xFFu;
      values[2 * i] = code[byte >> 4] * a;
      values[2 * i + 1] = code[byte & 0xFu] * a;
    }
    constexpr int kV = Vec<T>::kSize;
    uint4* dst = reinterpret_cast<uint4*>(out + j0);
#pragma unroll
    for (int s = 0; s < kGroup / kV; ++s) {
      Vec<T> v;
#pragma unroll
      for (int e = 0; e < kV; ++e) v.v[e] = from_float<T>(values[s * kV + e]);
      dst[s] = v.raw;
    }
  }

  // Tail (numel % 16 elements, an even count): one packed byte per thread, plain loads and stores.
  const int64_t tail_bytes = (numel - groups * kGroup) / 2;
  if (first < tail_bytes) {
    const int64_t p = groups * (kGroup / 2) + first;
    const uint32_t byte = packed[p];
    const float a = absmax[(2 * p) >> log2_blocksize];  // both elements of a byte share a block
    out[2 * p] = from_float<T>(code[byte >> 4] * a);
    out[2 * p + 1] = from_float<T>(code[byte & 0xFu] * a);
  }
}

}  // namespace adapterhub

extern "C" void launch_nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t numel,
                                      int64_t blocksize, void* out, AdapterhubDType dtype, cudaStream_t stream) {
  using namespace adapterhub;
  const int log2_blocksize = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const int64_t groups = numel / kGroup;
  // Grid-stride loop: enough blocks to fill an H100 several times over, never more than needed.
  const int64_t wanted = (groups + kDequantThreads - 1) / kDequantThreads;
  const int blocks = static_cast<int>(wanted < 1 ? 1 : (wanted > 65536 ? 65536 : wanted));
  ADAPTERHUB_DISPATCH_DTYPE(dtype, {
    auto* kernel = nf4_dequantize_kernel<T>;
    ADAPTERHUB_LAUNCH(kernel, blocks, kDequantThreads, stream)(packed, absmax, numel, log2_blocksize,
                                                               static_cast<T*>(out));
  });
}

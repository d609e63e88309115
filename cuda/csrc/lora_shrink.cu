// lora_shrink: the first half of batched LoRA, each row through its own adapter's A (Punica BGMV).
//
// CPU code reference (torch twin: adapterhub/runtime/kernels/ops.py::Ops.lora_shrink):
//   for b, t:  n = ids[b]
//              h[b, t] = (x[b, t].float() @ A_stack[n].float().T).to(x.dtype)   # (Din,) @ (Din, R) -> (R,)
// Flattened here to rows m = b * T + t; a row's slot is ids[m / T].
//
// One block per (row m, tile of 4 ranks). Threads stride over K with 128-bit loads: x[m] is read from
// global memory once per block and each loaded vector is reused for the 4 ranks of the tile, whose A
// rows are read coalesced along K. Per-thread partial sums are reduced per warp with shuffles, then
// across the block's warps through shared memory. Slot 0 (no adapter) is all zeros and takes the same
// path: no per-row branch.
#include "common.cuh"

namespace adapterhub {

constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / 32;
// 4 ranks per block: at decode (32 rows, R = 16) that is 128 blocks, about one per H100 SM.
constexpr int kRankTile = 4;

template <typename T>
__global__ void lora_shrink_kernel(const T* __restrict__ x, const T* __restrict__ A_stack,
                                   const int64_t* __restrict__ ids, int64_t tokens, int64_t K, int64_t R,
                                   T* __restrict__ h) {
  __shared__ float warp_partial[kShrinkWarps][kRankTile];
  constexpr int kV = Vec<T>::kSize;
  const int64_t m = blockIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t slot = ids[m / tokens];
  const T* xm = x + m * K;                          // (K,)
  const T* a_tile = A_stack + (slot * R + r0) * K;  // (min(4, R - r0), K): this slot's ranks of the tile

  float acc[kRankTile];
#pragma unroll
  for (int r = 0; r < kRankTile; ++r) acc[r] = 0.0f;

  for (int64_t k = kV * static_cast<int64_t>(threadIdx.x); k < K; k += kV * kShrinkThreads) {
    const Vec<T> xv = load_vec(xm + k);
    float xf[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) xf[e] = to_float(xv.v[e]);
#pragma unroll
    for (int r = 0; r < kRankTile; ++r) {
      if (r0 + r < R) {
        const Vec<T> av = load_vec(a_tile + r * K + k);
#pragma unroll
        for (int e = 0; e < kV; ++e) acc[r] = fmaf(xf[e], to_float(av.v[e]), acc[r]);
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kRankTile; ++r) {
    const float s = warp_sum(acc[r]);
    if (lane == 0) warp_partial[warp][r] = s;
  }
  __syncthreads();
  if (threadIdx.x < kRankTile && r0 + threadIdx.x < R) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kShrinkWarps; ++w) total += warp_partial[w][threadIdx.x];
    h[m * R + r0 + threadIdx.x] = from_float<T>(total);
  }
}

}  // namespace adapterhub

extern "C" void launch_lora_shrink(const void* x, const void* A_stack, const int64_t* ids, int64_t rows, int64_t tokens,
                                   int64_t K, int64_t R, void* h, AdapterhubDType dtype, cudaStream_t stream) {
  using namespace adapterhub;
  // Rows on grid x (up to 2^31 - 1: prefill rows can exceed the 65535 limit of y), rank tiles on y.
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((R + kRankTile - 1) / kRankTile));
  ADAPTERHUB_DISPATCH_DTYPE(dtype, {
    auto* kernel = lora_shrink_kernel<T>;
    ADAPTERHUB_LAUNCH(kernel, grid, kShrinkThreads, stream)(static_cast<const T*>(x), static_cast<const T*>(A_stack),
                                                            ids, tokens, K, R, static_cast<T*>(h));
  });
}

// lora_expand: the second half of batched LoRA plus the DoRA output scale, in place on the base output.
//
// CPU code reference (torch twin: adapterhub/runtime/kernels.py::lora_expand):
//   B = B_stack[ids]                                       # (M, Dout, R): row m gathers slot ids[m]
//   delta = torch.einsum("mr,mor->mo", h, B.float())       # (M, Dout) fp32
//   y[:] = (dora_scale[ids].float() * (y.float() + scaling[ids, None] * delta)).to(y.dtype)
// DoRA's m / ||W + s B A||_row is per slot and independent of x (SEMANTICS §5.3), so it is one multiply
// here; plain LoRA slots and slot 0 carry dora_scale = 1, so every row takes the same path.
//
// One thread per output element (m, o): it reads the R contiguous values of B[ids[m], o] (128-bit loads
// when R % 8 == 0), h[m] (the same address across the warp: a broadcast), and rounds once when it
// writes y. Consecutive threads read consecutive rows of B, so a block streams one contiguous tile.
#include "common.cuh"

namespace adapterhub {

constexpr int kExpandThreads = 256;

template <typename T>
__global__ void lora_expand_kernel(T* __restrict__ y, const float* __restrict__ h, const T* __restrict__ b_stack,
                                   const int64_t* __restrict__ ids, const float* __restrict__ scaling,
                                   const T* __restrict__ dora_scale, int64_t Dout, int64_t R) {
  const int64_t m = blockIdx.x;  // rows on x: prefill can have more than 65535 rows (the y limit)
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= Dout) return;
  const int64_t slot = ids[m];
  const float* hm = h + m * R;                    // (R,)
  const T* b_row = b_stack + (slot * Dout + o) * R;  // (R,)

  float delta = 0.0f;
  if (R % 8 == 0) {
    for (int64_t r = 0; r < R; r += 8) {
      const Vec8<T> bv = load_vec8(b_row + r);
#pragma unroll
      for (int e = 0; e < 8; ++e) delta = fmaf(__ldg(hm + r + e), to_float(bv.v[e]), delta);
    }
  } else {
    for (int64_t r = 0; r < R; ++r) delta = fmaf(__ldg(hm + r), to_float(b_row[r]), delta);
  }
  const int64_t out = m * Dout + o;
  const float base = to_float(y[out]);
  const float scaled = fmaf(__ldg(scaling + slot), delta, base);
  y[out] = from_float<T>(to_float(dora_scale[slot * Dout + o]) * scaled);
}

}  // namespace adapterhub

extern "C" void launch_lora_expand(void* y, const float* h, const void* b_stack, const int64_t* ids,
                                   const float* scaling, const void* dora_scale, int64_t M, int64_t Dout, int64_t R,
                                   AdapterhubDType dtype, cudaStream_t stream) {
  using namespace adapterhub;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((Dout + kExpandThreads - 1) / kExpandThreads));
  ADAPTERHUB_DISPATCH_DTYPE(dtype, {
    auto* kernel = lora_expand_kernel<T>;
    ADAPTERHUB_LAUNCH(kernel, grid, kExpandThreads, stream)(static_cast<T*>(y), h, static_cast<const T*>(b_stack), ids,
                                                            scaling, static_cast<const T*>(dora_scale), Dout, R);
  });
}

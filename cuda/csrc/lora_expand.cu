// lora_expand: the second half of batched LoRA plus the DoRA output scale, in place on the base output.
//
// CPU code reference (torch twin: adapterhub/runtime/kernels/ops.py::Ops.lora_expand):
//   for b, t:  n = ids[b]
//              hs = (h[b, t].float() * scaling[n]).to(y.dtype)                       # (R,)
//              v = (y[b, t].float() + hs.float() @ B_stack[n].float()).to(y.dtype)  # (R,) @ (R, Dout)
//              y[b, t] = (v.float() * dora_scale[n]).to(y.dtype)                    # only with dora_scale
// B_stack (N, R, Dout) is lora_B transposed. Every rounding above is mirrored here (products with
// their own rounding, as torch's elementwise ops, no FMA contraction), so the result differs from
// the twin only through the summation order of the R products.
//
// One thread per Vec<T>::kSize consecutive outputs of one row (8 for bf16 / fp16, 4 for fp32): for
// each rank it reads B_stack[n, r, o:o+8] with one 128-bit load (consecutive threads, consecutive
// addresses) and h[m, r] (one address for the whole warp: a broadcast). DoRA's m / ||W + s B A|| is
// per slot and independent of x (semantics §5.3), so it costs one multiply; slot 0 has zero B and
// takes the same path (no per-row branch).
#include "common.cuh"

namespace adapterhub {

// 128 threads x 8 outputs: at decode (32 rows, Dout = 4096) that is 128 blocks, about one per H100 SM.
constexpr int kExpandThreads = 128;

template <typename T, bool kHasDora>
__global__ void lora_expand_kernel(T* __restrict__ y, const T* __restrict__ h, const T* __restrict__ B_stack,
                                   const int64_t* __restrict__ ids, const float* __restrict__ scaling,
                                   const float* __restrict__ dora_scale, int64_t tokens, int64_t Dout, int64_t R) {
  constexpr int kV = Vec<T>::kSize;
  const int64_t m = blockIdx.x;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x) * kV;
  if (o0 >= Dout) return;
  const int64_t slot = ids[m / tokens];
  const T* hm = h + m * R;                       // (R,)
  const T* b_slot = B_stack + slot * R * Dout + o0;  // column o0 of this slot's (R, Dout)
  T* ym = y + m * Dout + o0;
  // Vector loads need the row segment whole and 16-byte aligned: Dout % kV == 0 (every real model).
  const bool is_vector = Dout % kV == 0;
  const int width = is_vector ? kV : static_cast<int>(Dout - o0 < kV ? Dout - o0 : kV);

  // Loops run over kV with a guard, not to `width`, so acc / out stay in registers (static indices).
  float acc[kV];
#pragma unroll
  for (int e = 0; e < kV; ++e) acc[e] = 0.0f;
  const float s = scaling[slot];
#pragma unroll 4
  for (int64_t r = 0; r < R; ++r) {
    const float hr = round_to<T>(__fmul_rn(to_float(hm[r]), s));
    const T* b_row = b_slot + r * Dout;
    if (is_vector) {
      const Vec<T> bv = load_vec(b_row);
#pragma unroll
      for (int e = 0; e < kV; ++e) acc[e] = fmaf(hr, to_float(bv.v[e]), acc[e]);
    } else {
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        if (e < width) acc[e] = fmaf(hr, to_float(b_row[e]), acc[e]);
      }
    }
  }

  const float* g = kHasDora ? dora_scale + slot * Dout + o0 : nullptr;
  Vec<T> out;
  if (is_vector) out.raw = *reinterpret_cast<const uint4*>(ym);
#pragma unroll
  for (int e = 0; e < kV; ++e) {
    if (e < width) {
      const float base = to_float(is_vector ? out.v[e] : ym[e]);
      float v = round_to<T>(__fadd_rn(base, acc[e]));
      if (kHasDora) v = __fmul_rn(v, g[e]);
      out.v[e] = from_float<T>(v);
    }
  }
  if (is_vector) {
    *reinterpret_cast<uint4*>(ym) = out.raw;
  } else {
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      if (e < width) ym[e] = out.v[e];
    }
  }
}

template <typename T, bool kHasDora>
void launch_expand(T* y, const T* h, const T* B_stack, const int64_t* ids, const float* scaling,
                   const float* dora_scale, int64_t rows, int64_t tokens, int64_t Dout, int64_t R,
                   cudaStream_t stream) {
  constexpr int64_t kPerBlock = static_cast<int64_t>(kExpandThreads) * Vec<T>::kSize;
  // Rows on grid x (prefill rows can exceed the 65535 limit of y), output tiles on y.
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((Dout + kPerBlock - 1) / kPerBlock));
  auto* kernel = lora_expand_kernel<T, kHasDora>;
  ADAPTERHUB_LAUNCH(kernel, grid, kExpandThreads, stream)(y, h, B_stack, ids, scaling, dora_scale, tokens, Dout, R);
}

}  // namespace adapterhub

extern "C" void launch_lora_expand(void* y, const void* h, const void* B_stack, const int64_t* ids,
                                   const float* scaling, const float* dora_scale, int64_t rows, int64_t tokens,
                                   int64_t Dout, int64_t R, AdapterhubDType dtype, cudaStream_t stream) {
  using namespace adapterhub;
  ADAPTERHUB_DISPATCH_DTYPE(dtype, {
    T* yt = static_cast<T*>(y);
    const T* ht = static_cast<const T*>(h);
    const T* bt = static_cast<const T*>(B_stack);
    if (dora_scale != nullptr) {
      launch_expand<T, true>(yt, ht, bt, ids, scaling, dora_scale, rows, tokens, Dout, R, stream);
    } else {
      launch_expand<T, false>(yt, ht, bt, ids, scaling, dora_scale, rows, tokens, Dout, R, stream);
    }
  });
}

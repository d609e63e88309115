// nf4_gemv: y = x @ dequant(W)^T for a few rows of x, reading W in NF4 (decode-time linear); the
// few-row path of the nf4_linear op (cuda/csrc/ops.cpp).
//
// CPU code reference (torch twin: adapterhub/runtime/kernels/ops.py::Ops.linear_4bit):
//   W = nf4_dequantize(packed, absmax, G, empty(N, K, dtype=x.dtype))   # (N, K)
//   y = (x.float() @ W.float().T).to(x.dtype)                            # (M, K) @ (K, N) -> (M, N)
// Deviation, by design (allowed by the twin's docstring): W is never rounded to bf16/fp16 here. Each
// 32-element chunk lies in one quant block (K % 32 == 0, G a power of two >= 32), so the kernel sums
// x * code in fp32 and multiplies by the block's absmax once: y differs from the twin by fp32
// reassociation plus the twin's rounding of W (<= 2^-9 relative per weight), within kernels.TOLERANCE.
//
// One warp per output feature n walks its packed row with one 128-bit load (32 codes) per lane per
// step, so a warp reads 512 contiguous bytes per step. Codes are decoded through a 256-entry table of
// (high, low) nibble pairs in shared memory: one lookup per packed byte. x (a few KB) stays in L1 / L2;
// rows of x are processed MT at a time (one pass over W per MT rows; later passes mostly hit L2).
// At M = 1 the kernel is memory bound (2 FMAs per packed byte); the fp32 FMAs grow with M and near
// the CUDA-core rate around M = 8 on an H100, which is why nf4_linear hands more rows to
// dequantize + GEMM (tensor cores). cuda/bench.py's row sweep measures the crossover.
#include "common.cuh"

namespace adapterhub {

constexpr int kGemvWarps = 4;   // output features per block
constexpr int kChunk = 32;      // elements per lane per step (16 packed bytes)
constexpr int kMaxRowsPerLaunch = 8;

template <typename T, int MT>
__global__ void nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                const float* __restrict__ absmax, int64_t M, int64_t N, int64_t K,
                                int log2_chunks_per_block, T* __restrict__ y) {
  __shared__ float2 pair_code[256];  // pair_code[byte] = (code[high nibble], code[low nibble])
  for (int b = threadIdx.x; b < 256; b += blockDim.x) pair_code[b] = make_float2(kNF4Code[b >> 4], kNF4Code[b & 15]);
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;  // first row of x handled by this block
  if (n >= N) return;  // warp-uniform; no barrier follows

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

  const int64_t chunks = K / kChunk;
  const int64_t row_chunk = n * chunks;  // chunk index of W[n, 0] in the flat weight
  const uint4* w_row = reinterpret_cast<const uint4*>(packed + n * (K / 2));
  // Software pipelining: the next step's weight chunk and absmax are loaded before this step's math,
  // so each lane keeps two HBM loads in flight instead of waiting out one latency per step.
  uint4 next_bytes = make_uint4(0, 0, 0, 0);
  float next_a = 0.0f;
  if (lane < chunks) {
    next_bytes = __ldg(w_row + lane);
    next_a = __ldg(absmax + ((row_chunk + lane) >> log2_chunks_per_block));
  }
  for (int64_t c = lane; c < chunks; c += 32) {
    const uint4 bytes = next_bytes;
    const float a = next_a;
    if (c + 32 < chunks) {
      next_bytes = __ldg(w_row + c + 32);
      next_a = __ldg(absmax + ((row_chunk + c + 32) >> log2_chunks_per_block));
    }
    float w[kChunk];  // codes in fp32, element order
    const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      const float2 p = pair_code[(words[i / 4] >> (8 * (i % 4))) & 0xFFu];
      w[2 * i] = p.x;
      w[2 * i + 1] = p.y;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m0 + m < M) {
        const T* xc = x + (m0 + m) * K + c * kChunk;
        float partial = 0.0f;
        constexpr int kV = Vec<T>::kSize;
#pragma unroll
        for (int v = 0; v < kChunk / kV; ++v) {
          const Vec<T> xv = load_vec(xc + kV * v);
#pragma unroll
          for (int e = 0; e < kV; ++e) partial = fmaf(to_float(xv.v[e]), w[kV * v + e], partial);
        }
        acc[m] = fmaf(partial, a, acc[m]);
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0 && m0 + m < M) y[(m0 + m) * N + n] = from_float<T>(total);
  }
}

template <typename T, int MT>
void launch_rows(const T* x, const uint8_t* packed, const float* absmax, int64_t M, int64_t N, int64_t K,
                 int log2_chunks_per_block, T* y, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + kGemvWarps - 1) / kGemvWarps), static_cast<unsigned>((M + MT - 1) / MT));
  auto* kernel = nf4_gemv_kernel<T, MT>;
  ADAPTERHUB_LAUNCH(kernel, grid, kGemvWarps * 32, stream)(x, packed, absmax, M, N, K, log2_chunks_per_block, y);
}

}  // namespace adapterhub

extern "C" void launch_nf4_gemv(const void* x, const uint8_t* packed, const float* absmax, int64_t M, int64_t N,
                                int64_t K, int64_t blocksize, void* y, AdapterhubDType dtype, cudaStream_t stream) {
  using namespace adapterhub;
  // G is a power of two >= 32 (checked by the binding): a quant block is 2^shift chunks of 32.
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize)) - 5;
  // The row tile is a template parameter so the accumulators stay in registers; M = 1 (decode of
  // one sequence) gets its own instantiation, larger M takes one pass over W per 8 rows.
  ADAPTERHUB_DISPATCH_DTYPE(dtype, {
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    if (M == 1) {
      launch_rows<T, 1>(xt, packed, absmax, M, N, K, shift, yt, stream);
    } else if (M <= 4) {
      launch_rows<T, 4>(xt, packed, absmax, M, N, K, shift, yt, stream);
    } else {
      launch_rows<T, kMaxRowsPerLaunch>(xt, packed, absmax, M, N, K, shift, yt, stream);
    }
  });
}

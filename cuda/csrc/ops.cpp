// The torch binding of the adapterhub CUDA ops: schemas, argument checks, launch on the current stream.
//
// Each op validates every argument (device, dtype, contiguity, shape, alignment) with a message that
// names the values, then calls its raw-pointer launcher (launchers.h) on the current CUDA stream of
// the tensors' device, then checks the launch error. Semantics and shapes: cuda/README.md and the
// torch twins in adapterhub/runtime/kernels/ops.py; fake (meta) implementations: runtime/kernels/cuda.py.
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

#define CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got device ", (t).device())
#define CHECK_CONTIGUOUS(t) \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous, got strides ", (t).strides(), "; call .contiguous()")
#define CHECK_DTYPE(t, dtype) \
  TORCH_CHECK((t).scalar_type() == (dtype), #t " must be ", (dtype), ", got ", (t).scalar_type())
#define CHECK_DIM(t, d) TORCH_CHECK((t).dim() == (d), #t " must have ", (d), " dims, got shape ", (t).sizes())
#define CHECK_SIZE(t, i, v) \
  TORCH_CHECK((t).size(i) == (v), #t ".size(", (i), ") must be ", (v), ", got shape ", (t).sizes())
#define CHECK_NUMEL(t, v) TORCH_CHECK((t).numel() == (v), #t " must have ", (v), " elements, got shape ", (t).sizes())
#define CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on one device, got ", (a).device(), " and ", (b).device())
#define CHECK_SAME_DTYPE(a, b) \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b " must have one dtype, got ", (a).scalar_type(), " and ", (b).scalar_type())
// The kernels use 64/128-bit loads; a fresh or .contiguous() tensor is aligned, an offset view may not be.
#define CHECK_ALIGNED(t, bytes)                                                        \
  TORCH_CHECK(reinterpret_cast<uintptr_t>((t).data_ptr()) % (bytes) == 0, #t " must be ", (bytes), \
              "-byte aligned (an offset view?); pass a .clone() or .contiguous() copy")
#define CHECK_INPUT(t) \
  do {                 \
    CHECK_CUDA(t);     \
    CHECK_CONTIGUOUS(t); \
  } while (0)

namespace {

AdapterhubDType element_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return kAdapterhubBFloat16;
    case at::kHalf:
      return kAdapterhubFloat16;
    case at::kFloat:
      return kAdapterhubFloat32;
    default:
      TORCH_CHECK(false, name, " must be bfloat16, float16 or float32, got ", t.scalar_type());
  }
}

// Rows up to which nf4_linear runs the fused GEMV (W read once per 8 rows, never materialised);
// above it, dequantize + one GEMM wins. A first guess from the byte counts, to be measured on a GPU
// with cuda/bench.py (bitsandbytes fuses only at one row).
constexpr int64_t kGemvMaxRows = 8;

void check_nf4_state(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize) {
  CHECK_INPUT(packed);
  CHECK_INPUT(absmax);
  CHECK_SAME_DEVICE(packed, absmax);
  CHECK_DTYPE(packed, at::kByte);
  CHECK_DTYPE(absmax, at::kFloat);
  TORCH_CHECK(blocksize >= 16 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two >= 16 (bitsandbytes' block sizes), got ", blocksize);
  TORCH_CHECK(numel % 2 == 0, "the NF4 weight must have an even number of elements, got ", numel);
  CHECK_NUMEL(packed, numel / 2);
  CHECK_NUMEL(absmax, (numel + blocksize - 1) / blocksize);
  CHECK_ALIGNED(packed, 16);
}

// out (any shape, numel n) of bf16 / fp16 / fp32 <- NF4 (packed (n/2,), absmax (n/G,)): semantics §1.5.
void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, at::Tensor& out) {
  CHECK_INPUT(out);
  CHECK_SAME_DEVICE(packed, out);
  check_nf4_state(packed, absmax, out.numel(), blocksize);
  const AdapterhubDType dtype = element_dtype(out, "out");
  CHECK_ALIGNED(out, 16);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  launch_nf4_dequantize(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), out.numel(), blocksize,
                        out.data_ptr(), dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y (..., Dout) = x (..., Din) @ dequant(W (Dout, Din))^T through the fused GEMV, at any row count
// (nf4_linear picks it for few rows; cuda/bench.py sweeps rows to place kGemvMaxRows).
at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                    int64_t out_features) {
  CHECK_INPUT(x);
  CHECK_SAME_DEVICE(x, packed);
  TORCH_CHECK(x.dim() >= 1, "x must have shape (..., in_features), got ", x.sizes());
  const AdapterhubDType dtype = element_dtype(x, "x");
  const int64_t N = out_features, K = x.size(-1);
  TORCH_CHECK(N > 0 && K > 0, "out_features and in_features must be positive, got ", N, " and ", K);
  TORCH_CHECK(K % 32 == 0 && blocksize >= 32, "the NF4 GEMV needs in_features % 32 == 0 and blocksize >= 32, ",
              "got in_features=", K, ", blocksize=", blocksize, "; use nf4_linear (dequantize + GEMM)");
  check_nf4_state(packed, absmax, N * K, blocksize);
  CHECK_ALIGNED(x, 16);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t rows = x.numel() / K;
  if (rows == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  launch_nf4_gemv(x.data_ptr(), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), rows, N, K, blocksize,
                  y.data_ptr(), dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// y (..., Dout) = x (..., Din) @ dequant(W (Dout, Din))^T, no bias: the GEMV for few rows, else
// dequantize into a temporary and one GEMM.
at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                      int64_t out_features, int64_t in_features) {
  CHECK_INPUT(x);
  TORCH_CHECK(out_features > 0 && in_features > 0, "out_features and in_features must be positive, got ",
              out_features, " and ", in_features);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "x must have shape (..., in_features=", in_features,
              "), got ", x.sizes());
  const int64_t rows = x.numel() / in_features;
  const bool is_aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;  // an offset view may not be
  if (rows <= kGemvMaxRows && in_features % 32 == 0 && blocksize >= 32 && is_aligned) {
    return nf4_gemv(x, packed, absmax, blocksize, out_features);
  }
  at::Tensor w = at::empty({out_features, in_features}, x.options());
  nf4_dequantize(packed, absmax, blocksize, w);
  return at::linear(x, w);
}

void check_ids(const at::Tensor& ids, const at::Tensor& x, int64_t B) {
  CHECK_INPUT(ids);
  CHECK_SAME_DEVICE(ids, x);
  CHECK_DTYPE(ids, at::kLong);
  CHECK_DIM(ids, 1);
  CHECK_SIZE(ids, 0, B);
}

// h (B, T, R) = x (B, T, Din) @ A_stack[ids]^T per row; ids (B,) are trusted to lie in [0, N): the
// pool hands out slots (validating them here would cost a device-to-host sync per call).
at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& A_stack, const at::Tensor& ids) {
  CHECK_INPUT(x);
  CHECK_INPUT(A_stack);
  CHECK_SAME_DEVICE(x, A_stack);
  CHECK_SAME_DTYPE(x, A_stack);
  CHECK_DIM(x, 3);
  CHECK_DIM(A_stack, 3);
  const AdapterhubDType dtype = element_dtype(x, "x");
  const int64_t B = x.size(0), T = x.size(1), K = x.size(2), R = A_stack.size(1);
  CHECK_SIZE(A_stack, 2, K);
  check_ids(ids, x, B);
  TORCH_CHECK(K % 8 == 0, "lora_shrink needs in_features % 8 == 0 (128-bit loads), got ", K);
  CHECK_ALIGNED(x, 16);
  CHECK_ALIGNED(A_stack, 16);
  at::Tensor h = at::empty({B, T, R}, x.options());
  if (B * T == 0 || R == 0) return h;
  const c10::cuda::CUDAGuard guard(x.device());
  launch_lora_shrink(x.data_ptr(), A_stack.data_ptr(), ids.data_ptr<int64_t>(), B * T, T, K, R, h.data_ptr(), dtype,
                     c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

void check_dora_scale(const at::Tensor& dora_scale, const at::Tensor& y, int64_t N, int64_t Dout) {
  CHECK_INPUT(dora_scale);
  CHECK_SAME_DEVICE(y, dora_scale);
  CHECK_DTYPE(dora_scale, at::kFloat);
  CHECK_DIM(dora_scale, 2);
  CHECK_SIZE(dora_scale, 0, N);
  CHECK_SIZE(dora_scale, 1, Dout);
}

// y (B, T, Dout) <- dora_scale[ids] * (y + scaling[ids] * h @ B_stack[ids]), in place; B_stack (N, R, Dout).
void lora_expand(at::Tensor& y, const at::Tensor& h, const at::Tensor& B_stack, const at::Tensor& ids,
                 const at::Tensor& scaling, const std::optional<at::Tensor>& dora_scale) {
  CHECK_INPUT(y);
  CHECK_INPUT(h);
  CHECK_INPUT(B_stack);
  CHECK_INPUT(scaling);
  CHECK_SAME_DEVICE(y, h);
  CHECK_SAME_DEVICE(y, B_stack);
  CHECK_SAME_DEVICE(y, scaling);
  CHECK_SAME_DTYPE(y, h);
  CHECK_SAME_DTYPE(y, B_stack);
  CHECK_DTYPE(scaling, at::kFloat);
  CHECK_DIM(y, 3);
  CHECK_DIM(h, 3);
  CHECK_DIM(B_stack, 3);
  CHECK_DIM(scaling, 1);
  const AdapterhubDType dtype = element_dtype(y, "y");
  const int64_t B = y.size(0), T = y.size(1), Dout = y.size(2), N = B_stack.size(0), R = B_stack.size(1);
  CHECK_SIZE(h, 0, B);
  CHECK_SIZE(h, 1, T);
  CHECK_SIZE(h, 2, R);
  CHECK_SIZE(B_stack, 2, Dout);
  CHECK_SIZE(scaling, 0, N);
  const float* dora = nullptr;
  if (dora_scale.has_value()) {
    check_dora_scale(*dora_scale, y, N, Dout);
    dora = dora_scale->data_ptr<float>();
  }
  check_ids(ids, y, B);
  CHECK_ALIGNED(y, 16);
  CHECK_ALIGNED(B_stack, 16);
  if (B * T == 0 || Dout == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  launch_lora_expand(y.data_ptr(), h.data_ptr(), B_stack.data_ptr(), ids.data_ptr<int64_t>(), scaling.data_ptr<float>(),
                     dora, B * T, T, Dout, R, dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY(adapterhub, m) {
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, Tensor(a!) out) -> ()");
  m.def("nf4_gemv(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features) -> Tensor");
  m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features, int in_features) -> Tensor");
  m.def("lora_shrink(Tensor x, Tensor A_stack, Tensor ids) -> Tensor");
  m.def("lora_expand(Tensor(a!) y, Tensor h, Tensor B_stack, Tensor ids, Tensor scaling, Tensor? dora_scale) -> ()");
}

TORCH_LIBRARY_IMPL(adapterhub, CUDA, m) {
  m.impl("nf4_dequantize", &nf4_dequantize);
  m.impl("nf4_gemv", &nf4_gemv);
  m.impl("nf4_linear", &nf4_linear);
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_expand", &lora_expand);
}

// Host emulation of the few CUDA features the adapterhub kernels use, so that the kernels' index
// math, nibble order and reductions run on a CPU-only machine (tests/test_cuda_compile.py builds
// cuda/csrc/*.cu with g++ and this header force-included, then compares against the torch twins).
//
// Not a general CUDA emulator. Each block runs its threads as fibers (ucontext) on one OS thread,
// round-robin from one synchronisation point to the next, so:
// - __syncthreads and the warp shuffles must be reached by every live thread of the block in the
//   same order (true of these kernels: their barriers and shuffles are block-uniform; threads or
//   whole warps may exit early);
// - blocks run one after another, and __shared__ arrays are function statics shared by all blocks
//   (a kernel that reads shared memory before writing it would not be caught);
// - no memory model, no races, no timing: it checks arithmetic and indexing, not speed.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The CUDA execution-space keywords become plain C++; __shared__ data is one static per kernel.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#undef __constant__
#define __constant__
#undef __forceinline__
#define __forceinline__ inline

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool is_done = false;
};

constexpr size_t kStackBytes = 1 << 16;

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<float> exchange;  // one slot per thread of the block, for shuffles
inline std::function<void()> body;
inline int current = 0;  // linear index of the running thread in its block

inline void yield() { swapcontext(&fibers[current].context, &scheduler); }

inline void fiber_entry() {
  body();
  fibers[current].is_done = true;  // returning resumes uc_link, the scheduler
}

// Runs `run` for every thread of one block until all threads have returned.
inline void run_block(int threads) {
  if (static_cast<int>(fibers.size()) < threads) fibers.resize(threads);
  exchange.assign(threads, 0.0f);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.stack.resize(kStackBytes);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_entry, 0);
    f.is_done = false;
  }
  for (bool any_live = true; any_live;) {
    any_live = false;
    for (int t = 0; t < threads; ++t) {
      if (fibers[t].is_done) continue;
      current = t;
      threadIdx = dim3(t);
      swapcontext(&scheduler, &fibers[t].context);
      any_live = any_live || !fibers[t].is_done;
    }
  }
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;

  template <typename... Args>
  void operator()(Args... args) const {
    gridDim = grid;
    blockDim = block;  // the kernels use 1-D blocks
    body = [&] { kernel(args...); };
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          run_block(static_cast<int>(block.x));
        }
  }
};

template <typename... Params>
Launch<Params...> make_launch(void (*kernel)(Params...), dim3 grid, dim3 block) {
  return Launch<Params...>{kernel, grid, block};
}

}  // namespace emu

#define ADAPTERHUB_LAUNCH(kernel, grid, block, stream) ::emu::make_launch(kernel, dim3(grid), dim3(block))

inline void __syncthreads() { emu::yield(); }

// Offsets < 32 stay inside the warp: warps are aligned groups of 32 linear thread indices.
inline float __shfl_xor_sync(unsigned /*mask*/, float value, int offset) {
  const int t = emu::current;
  emu::exchange[t] = value;
  emu::yield();  // every lane has published its value
  const float other = emu::exchange[t ^ offset];
  emu::yield();  // every lane has read before the next shuffle overwrites
  return other;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Round-to-nearest fp32 arithmetic, never contracted (g++ contracts nothing on baseline x86-64).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

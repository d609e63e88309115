#!/usr/bin/env bash
# Compile check of the CUDA sources, for machines with nvcc but not necessarily a GPU (CI).
#   - every cuda/csrc/*.cu: nvcc -std=c++17 -arch=sm_90 -O3 -c, into a temporary directory;
#   - cuda/csrc/ops.cpp: g++ -std=c++20 -fsyntax-only against torch's headers and the CUDA headers
#     (torch's extension tooling builds it as C++20).
# Exits non-zero on the first error; prints what it checked. Skips (exit 0, with a message) when nvcc
# is absent. Environment: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), CUDA_HOME,
# CXX (g++), PYTHON (python), CUDA_ARCH (sm_90).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
csrc="$here/csrc"
nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
cxx="${CXX:-g++}"
python="${PYTHON:-python}"
arch="${CUDA_ARCH:-sm_90}"

if [[ ! -x "$nvcc" ]]; then
    echo "compile_check: SKIP, no nvcc (looked for '$nvcc'); set NVCC=/path/to/nvcc"
    exit 0
fi
# The CUDA headers for ops.cpp: $CUDA_HOME as torch's tooling finds it, else /usr/local/cuda, else next
# to the real nvcc (the one on PATH may be a wrapper script).
cuda_home="${CUDA_HOME:-${CUDA_PATH:-}}"
if [[ -z "$cuda_home" ]]; then
    if [[ -d /usr/local/cuda/include ]]; then cuda_home=/usr/local/cuda; else cuda_home="$(dirname "$(dirname "$(readlink -f "$nvcc")")")"; fi
fi
cuda_include="$cuda_home/include"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "compile_check: $("$nvcc" --version | tail -n 2 | head -n 1)"
# The defines torch.utils.cpp_extension adds to every nvcc call (no implicit half / bf16 conversions),
# so code that only builds without them fails here rather than on the first GPU machine.
torch_nvcc_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
for source in "$csrc"/*.cu; do
    start=$SECONDS
    "$nvcc" -std=c++17 -arch="$arch" -O3 "${torch_nvcc_flags[@]}" -c "$source" -o "$out/$(basename "$source" .cu).o"
    echo "compile_check: ok  nvcc -arch=$arch $(basename "$source") ($((SECONDS - start)) s)"
done

# torch's include paths; a CPU-only torch wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h,
# whose absence c10 supports through C10_CUDA_NO_CMAKE_CONFIGURE_FILE.
read -r -a torch_includes < <("$python" -c \
    "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
defines=()
if ! "$python" -c "import torch, pathlib, sys; sys.exit(not (pathlib.Path(torch.__file__).parent / 'include/c10/cuda/impl/cuda_cmake_macros.h').exists())"; then
    defines+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
start=$SECONDS
"$cxx" -std=c++20 -fsyntax-only "${defines[@]}" "${torch_includes[@]}" -I"$cuda_include" "$csrc/ops.cpp"
echo "compile_check: ok  $cxx -fsyntax-only ops.cpp ($((SECONDS - start)) s)"
echo "compile_check: all CUDA sources compile"

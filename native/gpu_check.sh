#!/usr/bin/env bash
# The GGUF path on a real NVIDIA GPU, checked end to end on a machine with no network
# (native/README.md, "GPU check"):
#   1. builds CMakeLists.txt with -DHUATUO_CUDA=ON for this GPU's architecture only, from the
#      llama.cpp source carried in .gpu/ (native/pack_llama_src.sh), with every core;
#   2. answers the demo's eval questions with the built libraries on the CPU (GPU hidden) and
#      with every layer on the GPU (--gpu-layers -1), and compares them (native/gpu_report.py);
#   3. runs the libmtmd self-test on the CPU and the GPU (native/gpu_selftest.py) and, when the
#      GPU one passes, the eval again with image features from libmtmd on the GPU;
#   4. runs llama-bench on the demo GGUF on the CPU cores and on the GPU, in one run.
# Writes GPU_CHECK.md, gpu_check.json, gpu_check.log and evals.tar.gz under $OUT (default
# .gpu/out). Exit 0 when the check passed, 1 when it failed or could not run, 2 for bad usage.
#
#   native/gpu_check.sh [--out DIR] [--work DIR] [--jobs N] [--limit N] [--cmake-arg ARG]...
#                       [--configure-only]
#   native/gpu_check.sh --cpu-reference DIR [--limit N]
#
# --cpu-reference DIR: only the demo eval on this machine's CPU, with the libraries
# llama-cpp-python loads here, into DIR (needs no GPU; what .gpu/cpu-ref is made with).
# --configure-only: stop after configuring the CUDA build (checks the toolchain; builds nothing).
# --work DIR: the build and the unpacked source (default .gpu/work; a rerun on the same machine
# reuses the build). --cmake-arg: passed to cmake's configure step, e.g. -DGGML_CUDA_FA=OFF
# (compiles faster, no CUDA flash attention). GPU_CHECK_BUILD_TIMEOUT: seconds the build may
# take (default 420). PYTHON: the interpreter (default python3).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DATA=models/demo/eval/eval.json
MODEL=models/demo/gguf
BUILD_TARGETS=(llama ggml ggml-base ggml-cpu ggml-cuda mtmd llama-mtmd-cli llama-bench)
BUILD_TIMEOUT=${GPU_CHECK_BUILD_TIMEOUT:-420}

say() { echo "gpu_check: $*" >&2; }
die() { say "$1"; exit "${2:-1}"; }
usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------ arguments ----
out=${OUT:-$ROOT/.gpu/out}
work=$ROOT/.gpu/work
jobs=$(nproc 2>/dev/null || echo 4)
limit=""
cpu_reference=""
configure_only=""
cmake_args=()
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value; see native/gpu_check.sh --help." 2; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number above 0, not '$2'." 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) need_value "$@"; out=$2; shift 2 ;;
    --work) need_value "$@"; work=$2; shift 2 ;;
    --jobs) need_value "$@"; positive "$1" "$2"; jobs=$2; shift 2 ;;
    --limit) need_value "$@"; positive "$1" "$2"; limit=$2; shift 2 ;;
    --cmake-arg) need_value "$@"; cmake_args+=("$2"); shift 2 ;;
    --cpu-reference) need_value "$@"; cpu_reference=$2; shift 2 ;;
    --configure-only) configure_only=1; shift ;;
    *) die "unknown argument '$1'; see native/gpu_check.sh --help." 2 ;;
  esac
done
cd "$ROOT" || die "cannot enter $ROOT."
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n1)
src_archive=${GPU_CHECK_SRC:-$ROOT/.gpu/llama_cpp_python-$version-src.tar.gz}
limit_args=(); [[ -z "$limit" ]] || limit_args=(--limit "$limit")

# huatuo-lite eval of the demo: run_eval NAME OUTDIR [extra eval options...]
run_eval() {
  local name=$1 dir=$2; shift 2
  rm -rf "$dir"
  say "eval ($name): $DATA on $MODEL $*"
  "$PYTHON" -m huatuo_lite.cli eval "$DATA" -m "${EVAL_MODEL:-$MODEL}" -o "$dir" --no-progress \
    "${limit_args[@]}" "$@" > "$dir.log" 2>&1
  local rc=$?
  grep -h "Accuracy" "$dir.log" >&2
  [[ $rc -eq 0 ]] || { tail -n 5 "$dir.log" >&2; say "the $name eval failed (exit $rc); log: $dir.log."; }
  return $rc
}

if [[ -n "$cpu_reference" ]]; then
  mkdir -p "$(dirname "$cpu_reference")" || die "cannot create the folder of $cpu_reference."
  run_eval cpu "$cpu_reference" || exit 1
  exit 0
fi

# ------------------------------------------------------------------ preflight ----
cuda_home=${CUDA_HOME:-/usr/local/cuda}
nvcc=$(command -v nvcc || true)
[[ -n "$nvcc" || ! -x "$cuda_home/bin/nvcc" ]] || nvcc=$cuda_home/bin/nvcc
[[ -n "$nvcc" ]] || die "no CUDA compiler (nvcc) on PATH or in $cuda_home/bin; run this on a machine with the CUDA toolkit and an NVIDIA GPU."
gpu=""
command -v nvidia-smi >/dev/null 2>&1 && \
  gpu=$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)
[[ -n "$gpu" ]] || die "no NVIDIA GPU is visible (nvidia-smi is missing or lists none); run this on a machine with a CUDA GPU."
IFS=, read -r gpu_name gpu_cc gpu_driver gpu_memory <<< "$gpu"
trim() { local v=$1; v=${v#"${v%%[! ]*}"}; echo "${v%"${v##*[! ]}"}"; }
gpu_name=$(trim "$gpu_name"); gpu_cc=$(trim "$gpu_cc"); gpu_driver=$(trim "$gpu_driver"); gpu_memory=$(trim "$gpu_memory")
arch=$(echo "$gpu_cc" | tr -d ' .')
[[ "$arch" =~ ^[0-9]+$ ]] || die "nvidia-smi gave no compute capability for $gpu_name ('$gpu_cc'); pass --cmake-arg -DCMAKE_CUDA_ARCHITECTURES=NN."
command -v cmake >/dev/null 2>&1 || die "cmake is not on PATH; install CMake 3.20 or newer."
[[ -f "$src_archive" ]] || die "$src_archive is missing; run native/pack_llama_src.sh and name .gpu/$(basename "$src_archive") in the device call's carry list."
"$PYTHON" -c "import numpy, onnxruntime, PIL, click, tqdm" 2>/dev/null \
  || die "$PYTHON lacks numpy, onnxruntime, pillow, click or tqdm; carry their wheels in .gpu/wheels (native/pack_wheels.sh)."

mkdir -p "$out" "$work" || die "cannot create $out or $work."
timings=$work/timings.txt

check() {   # the whole check after the preflight; `die` ends it with its sentence
: > "$timings"
started=$SECONDS
phase() {   # phase NAME COMMAND...: run it and record its seconds
  local name=$1 t0=$SECONDS rc; shift
  "$@"; rc=$?
  echo "$name $((SECONDS - t0))" >> "$timings"
  return $rc
}
say "GPU: $gpu_name (compute capability $gpu_cc, driver $gpu_driver, $gpu_memory); nvcc: $nvcc ($("$nvcc" --version | tail -n1)); $jobs jobs"

# ------------------------------------------------------------ source + Python ----
unpack() {
  local stamp; stamp=$(sha256sum "$src_archive" | cut -c1-16)
  if [[ "$(cat "$work/src/.stamp" 2>/dev/null)" != "$stamp" ]]; then
    rm -rf "$work/src" && mkdir -p "$work/src" && tar -xzf "$src_archive" -C "$work/src" || return 1
    echo "$stamp" > "$work/src/.stamp"
  fi
  # llama_cpp (pure Python from the sdist) + carried wheels on PYTHONPATH; nothing is built
  rm -rf "$work/site" && mkdir -p "$work/site" && cp -r "$work/src/llama_cpp" "$work/site/" || return 1
  if compgen -G "$ROOT/.gpu/wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$ROOT"/.gpu/wheels/*.whl || return 1
  fi
}
phase unpack unpack || die "could not unpack $src_archive or install .gpu/wheels into $work/site."
export PYTHONPATH=$work/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import jinja2, diskcache, typing_extensions" 2>/dev/null \
  || die "$PYTHON cannot import jinja2, diskcache or typing_extensions (llama_cpp needs them); carry their wheels in .gpu/wheels (native/pack_wheels.sh)."

# ------------------------------------------------------------------ cuBLAS -------
# ggml-cuda links cuBLAS. A compiler-only toolkit has none; then take the pip wheels' copy
# (nvidia-cublas, beside PyTorch) and tell CMake's FindCUDAToolkit where it is.
# the toolkit's folder (nvcc may be a wrapper script elsewhere, as /usr/local/bin/nvcc is here)
cuda_root=""
for dir in "$cuda_home" "$(dirname "$(readlink -f "$nvcc")")/.." /usr/local/cuda; do
  [[ -z "$cuda_root" && -f "$dir/include/cuda_runtime.h" && -x "$dir/bin/nvcc" ]] && cuda_root=$(cd "$dir" && pwd)
done
[[ -n "$cuda_root" ]] || die "found nvcc ($nvcc) but no CUDA toolkit folder with include/cuda_runtime.h; set CUDA_HOME to it."
cmake_args=("-DCMAKE_CUDA_COMPILER=$cuda_root/bin/nvcc" "${cmake_args[@]}")
find_first() {   # find_first NAME DIR...: the first file called NAME under the DIRs
  local name=$1; shift
  find "$@" -name "$name" \( -type f -o -type l \) 2>/dev/null | head -n1
}
nvidia_dirs=$("$PYTHON" -c "import nvidia, sys; print(' '.join(nvidia.__path__))" 2>/dev/null || true)
search=("$cuda_root" /usr/local/cuda /usr/include /usr/lib/x86_64-linux-gnu $nvidia_dirs)
extra_ld=""
if [[ ! -f "$cuda_root/include/cublas_v2.h" ]]; then
  header=$(find_first cublas_v2.h "${search[@]}")
  cublas=$(find_first 'libcublas.so*' "${search[@]}")
  cublaslt=$(find_first 'libcublasLt.so*' "${search[@]}")
  [[ -n "$header" && -n "$cublas" && -n "$cublaslt" ]] \
    || die "cuBLAS (cublas_v2.h, libcublas, libcublasLt) is neither in $cuda_root nor in Python's nvidia packages; install the CUDA toolkit's cuBLAS."
  say "cuBLAS from $(dirname "$cublas") (headers $(dirname "$header"))"
  cmake_args=("-DCUDA_cublas_LIBRARY=$cublas" "-DCUDA_cublasLt_LIBRARY=$cublaslt"
              "-DCMAKE_CUDA_FLAGS=-I$(dirname "$header")" "-DCMAKE_CXX_FLAGS=-I$(dirname "$header")" "${cmake_args[@]}")
  extra_ld=$(dirname "$cublas")
fi
# the driver library: FindCUDAToolkit wants an unversioned libcuda.so (or the stubs)
if [[ -z "$(find_first 'libcuda.so' "$cuda_root" /usr/lib/x86_64-linux-gnu /usr/local/nvidia)" ]]; then
  driver=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
  [[ -n "$driver" ]] || driver=$(find_first 'libcuda.so.1' /usr/local/nvidia /usr/lib /usr/lib64)
  if [[ -n "$driver" ]]; then cmake_args=("-DCUDA_cuda_driver_LIBRARY=$driver" "${cmake_args[@]}")
  else say "no libcuda.so found: building with -DGGML_CUDA_NO_VMM=ON"; cmake_args=(-DGGML_CUDA_NO_VMM=ON "${cmake_args[@]}"); fi
fi

# ------------------------------------------------------------------- build -------
generator=(); command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
[[ ! -f "$work/build/CMakeCache.txt" ]] || grep -q "CMAKE_CUDA_ARCHITECTURES:STRING=$arch$" "$work/build/CMakeCache.txt" \
  || rm -rf "$work/build"
configure() {
  cmake -S "$ROOT" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DHUATUO_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DLLAMA_CPP_SOURCE_DIR="$work/src/llama.cpp" -DGGML_CCACHE=OFF \
    "${cmake_args[@]}" > "$work/configure.log" 2>&1
}
phase configure configure || { tail -n 25 "$work/configure.log"; die "configuring the CUDA build failed; its last lines are above (log: $work/configure.log)."; }
if [[ -n "$configure_only" ]]; then
  grep -h "CUDA\|cuBLAS\|class-token" "$work/configure.log"; say "configured (--configure-only): $work/build"; return 0
fi
say "configured for CUDA architecture $arch; building ${BUILD_TARGETS[*]} with $jobs jobs (at most $BUILD_TIMEOUT s)"
build() { timeout "$BUILD_TIMEOUT" cmake --build "$work/build" -j "$jobs" --target "${BUILD_TARGETS[@]}" > "$work/build.log" 2>&1; }
phase build build; rc=$?
if [[ $rc -ne 0 ]]; then
  tail -n 25 "$work/build.log"
  [[ $rc -eq 124 ]] && die "the CUDA build did not finish within $BUILD_TIMEOUT s; run the check again on the same machine to continue it (it keeps $work), or pass --cmake-arg -DGGML_CUDA_FA=OFF."
  die "the CUDA build failed (exit $rc); its last lines are above (log: $work/build.log)."
fi
bin=$work/build/bin
export LLAMA_CPP_LIB_PATH=$bin MTMD_CPP_LIB=$bin HUATUO_LLAMA_BIN=$bin
export LD_LIBRARY_PATH=$bin${extra_ld:+:$extra_ld}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$PYTHON" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" \
  || die "llama-cpp-python with the libraries in $bin cannot offload to a GPU; see $work/build.log."

# ------------------------------------------------------------ eval + self-test ----
evals=()
CUDA_VISIBLE_DEVICES="" phase eval-cpu run_eval cpu "$work/eval-cpu" && evals+=(--eval "cpu=$work/eval-cpu")
phase eval-gpu run_eval gpu "$work/eval-gpu" --gpu-layers -1 && evals+=(--eval "gpu=$work/eval-gpu")
phase selftest "$PYTHON" native/gpu_selftest.py "$MODEL" --json "$work/selftest.json" > "$work/selftest.log" 2>&1
grep -h '"min_cosine"\|"backend"\|"passed"' "$work/selftest.json" >&2 || tail -n 5 "$work/selftest.log" >&2
selftest_args=(); [[ -f "$work/selftest.json" ]] && selftest_args=(--selftest "$work/selftest.json")
# with the GPU verdict recorded in a copy of the folder, the engine takes image features from
# libmtmd on the GPU instead of vision.onnx: the whole pipeline on the GPU
if "$PYTHON" - "$MODEL" "$work/demo-gguf-mtmd" "$work/selftest.json" <<'EOF'
import json, shutil, sys
from pathlib import Path
src, dst, selftest = map(Path, sys.argv[1:])
verdict = json.loads(selftest.read_text())
if not verdict.get("gpu", {}).get("passed"):
    sys.exit(1)
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst)
manifest = json.loads((dst / "manifest.json").read_text())
manifest["mtmd_self_test"] = {"llama_cpp_python": verdict["llama_cpp_python"], "passed": True,
                              "min_cosine": verdict["gpu"]["min_cosine"], "mean_cosine": verdict["gpu"]["mean_cosine"]}
(dst / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
EOF
then
  EVAL_MODEL=$work/demo-gguf-mtmd phase eval-gpu-mtmd run_eval gpu-mtmd "$work/eval-gpu-mtmd" --gpu-layers -1 \
    && evals+=(--eval "gpu-mtmd=$work/eval-gpu-mtmd")
fi
[[ -n "$limit" || ! -f "$ROOT/.gpu/cpu-ref/results.jsonl" ]] || evals+=(--eval "project-cpu=$ROOT/.gpu/cpu-ref")

# ------------------------------------------------------------------ bench --------
text_gguf=$(ls "$MODEL"/*.gguf | grep -v '/mmproj-' | head -n1)
bench() {
  "$bin/llama-bench" -m "$text_gguf" -dev none,CUDA0 -ngl 99 -t "$(nproc)" -r 3 -o jsonl \
    > "$work/bench.jsonl" 2> "$work/bench.log"
}
phase bench bench || { tail -n 5 "$work/bench.log"; say "llama-bench failed; log: $work/bench.log."; }
bench_args=(); [[ -s "$work/bench.jsonl" ]] && bench_args=(--bench "$work/bench.jsonl")
echo "total $((SECONDS - started))" >> "$timings"

# ------------------------------------------------------------------ report -------
"$PYTHON" native/gpu_report.py "${evals[@]}" "${selftest_args[@]}" "${bench_args[@]}" --timings "$timings" \
  --fact "device=$gpu_name" --fact "compute capability=$gpu_cc" --fact "driver=$gpu_driver" \
  --fact "GPU memory=$gpu_memory" --fact "nvcc=$("$nvcc" --version | tail -n1)" --fact "CPU threads=$(nproc)" \
  --fact "llama-cpp-python=$version" --fact "data=$DATA${limit:+ (first $limit)}" --fact "model=$MODEL" \
  --md "$out/GPU_CHECK.md" --json "$out/gpu_check.json"
rc=$?
(cd "$work" && tar -czf "$out/evals.tar.gz" eval-* selftest.* bench.* timings.txt configure.log build.log 2>/dev/null)
[[ $rc -eq 0 ]] && say "passed; report: $out/GPU_CHECK.md" || say "FAILED (see $out/GPU_CHECK.md)"
return $rc
}

# everything from here on also goes to $out/gpu_check.log, which comes back from a device call
check 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Pack the llama.cpp source that native/gpu_check.sh builds on a GPU machine with no network.
#
# From the llama-cpp-python sdist pinned in pyproject.toml it keeps
#   llama.cpp/  the vendored llama.cpp minus what a CUDA build of our targets never reads
#               (docs, models, tests, examples, the web UI, the other GPU backends' sources)
#   llama_cpp/  the pure-Python package (ctypes bindings; it loads the libraries named by
#               LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB, so nothing of it is compiled)
# into one gzip archive, .gpu/llama-cpp-python-<version>-src.tar.gz, because the device call
# carries at most 64 MiB together with the working tree. Prints the archive's size.
#
#   native/pack_llama_src.sh [SDIST.tar.gz]
#
# SDIST: default build/_deps/llama_cpp_python-<version>.tar.gz (what configuring CMakeLists.txt
# downloads) when present, else `pip download` fetches it into a temporary folder.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY_DIR="$ROOT/.gpu"
# Paths under vendor/llama.cpp that the CUDA build of our targets never reads. The top-level
# CMakeLists.txt adds tests/ and examples/ only with LLAMA_BUILD_TESTS/EXAMPLES (forced OFF),
# tools/ui and tools/server only with LLAMA_BUILD_SERVER (OFF), and ggml adds a backend's folder
# only when that backend is switched on.
TRIM=(docs models tests media benches examples pocs .github .devops gguf-py conversion ci skills
      tools/ui tools/server
      ggml/src/ggml-cann ggml/src/ggml-sycl ggml/src/ggml-vulkan ggml/src/ggml-opencl
      ggml/src/ggml-hexagon ggml/src/ggml-webgpu ggml/src/ggml-openvino ggml/src/ggml-et
      ggml/src/ggml-virtgpu ggml/src/ggml-zdnn ggml/src/ggml-zendnn)

die() { echo "pack_llama_src: $*" >&2; exit "${2:-1}"; }

[[ $# -le 1 ]] || die "give at most one argument, the sdist archive (see the comment at the top)." 2
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -n1)
[[ -n "$version" ]] || die "pyproject.toml pins no llama-cpp-python==VERSION; add the pin."
name="llama_cpp_python-$version"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sdist=${1:-$ROOT/build/_deps/$name.tar.gz}
if [[ $# -eq 0 && ! -f "$sdist" ]]; then
  echo "pack_llama_src: downloading the llama-cpp-python $version sdist with pip (a few minutes)" >&2
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp/dl" \
    || die "pip could not download the llama-cpp-python $version sdist; check the network or pass the archive."
  sdist="$tmp/dl/$name.tar.gz"
fi
[[ -f "$sdist" ]] || die "$sdist does not exist; pass the llama-cpp-python $version sdist (.tar.gz)." 2

excludes=()
for path in "${TRIM[@]}"; do excludes+=(--exclude="$name/vendor/llama.cpp/$path"); done
tar -xzf "$sdist" -C "$tmp" "${excludes[@]}" "$name/vendor/llama.cpp" "$name/llama_cpp" \
  || die "$sdist is not a llama-cpp-python $version sdist (no $name/vendor/llama.cpp in it)."
[[ -f "$tmp/$name/vendor/llama.cpp/CMakeLists.txt" ]] || die "$sdist holds no llama.cpp CMakeLists.txt."
mv "$tmp/$name/vendor/llama.cpp" "$tmp/llama.cpp"
mv "$tmp/$name/llama_cpp" "$tmp/llama_cpp"
# the wheel's bundled libraries are not in an sdist; a stray lib/ would shadow nothing, but say so
[[ ! -d "$tmp/llama_cpp/lib" ]] || rm -rf "$tmp/llama_cpp/lib"

mkdir -p "$CARRY_DIR"
out="$CARRY_DIR/$name-src.tar.gz"
tar -czf "$out.part" -C "$tmp" llama.cpp llama_cpp
mv "$out.part" "$out"
# the carried folder must not be committed; .git/info/exclude keeps it out of `git status`
if ! git -C "$ROOT" check-ignore -q "$CARRY_DIR/x" 2>/dev/null; then
  mkdir -p "$(git -C "$ROOT" rev-parse --git-path info)"
  echo "/.gpu/" >> "$(git -C "$ROOT" rev-parse --git-path info/exclude)"
fi
unpacked=$(du -sm "$tmp/llama.cpp" | cut -f1)
echo "$out: $(du -k "$out" | cut -f1) KiB ($unpacked MiB unpacked; sdist $(du -m "$sdist" | cut -f1) MiB)"

#!/usr/bin/env bash
# Wheels that native/gpu_check.sh installs (offline, --no-deps, into a folder on PYTHONPATH) on
# the GPU machine, whose image lacks them: llama-cpp-python's pure-Python `diskcache`. The rest
# of what the GGUF eval imports is in that image already (numpy, onnxruntime, pillow, click,
# tqdm, jinja2, typing-extensions: /work/.library/device/KINDS.md), and llama_cpp itself comes
# from the sdist (native/pack_llama_src.sh), not from its 60 MB wheel with CPU libraries.
#
#   native/pack_wheels.sh        -> .gpu/wheels/*.whl; prints their size
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=(diskcache==5.6.3)
dest=$ROOT/.gpu/wheels
[[ $# -eq 0 ]] || { echo "pack_wheels: takes no arguments (it fetches ${WHEELS[*]})." >&2; exit 2; }
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$dest" "${WHEELS[@]}" \
  || { echo "pack_wheels: pip could not download ${WHEELS[*]}; check the network or the package index." >&2; exit 1; }
echo "$dest: $(du -k "$dest" | cut -f1) KiB ($(ls "$dest" | tr '\n' ' '))"

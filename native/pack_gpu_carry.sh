#!/usr/bin/env bash
# Prepare everything native/gpu_check.sh needs on a GPU machine with no network, in .gpu/
# (ignored by git), and measure what a device call would carry:
#   .gpu/llama_cpp_python-<v>-src.tar.gz  trimmed llama.cpp + llama_cpp Python package (pack_llama_src.sh)
#   .gpu/wheels/                          wheels the GPU image lacks (pack_wheels.sh)
#   .gpu/cpu-ref/                         the demo eval on THIS machine's CPU with the installed
#                                         llama-cpp-python, compared there with the GPU run
# The working tree travels too (tracked + untracked-not-ignored files); all together must stay
# under 64 MiB.
#
#   native/pack_gpu_carry.sh [SDIST.tar.gz]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIMIT_BYTES=$((64 * 1024 * 1024))
cd "$ROOT"
native/pack_llama_src.sh "$@"
native/pack_wheels.sh
native/gpu_check.sh --cpu-reference .gpu/cpu-ref
rm -f .gpu/cpu-ref.log

sum_bytes() { xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
tracked=$(git ls-files -z | sum_bytes)
untracked=$(git ls-files -z --others --exclude-standard | sum_bytes)
carry=(.gpu/llama_cpp_python-*-src.tar.gz .gpu/wheels .gpu/cpu-ref)
carried=$(find "${carry[@]}" -type f -print0 | sum_bytes)
total=$((tracked + untracked + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "travels: tracked $(mib "$tracked") + untracked $(mib "$untracked") + carried $(mib "$carried") = $(mib "$total") (limit 64 MiB)"
echo "carry: [$(printf '"%s", ' "${carry[@]}" | sed 's/, $//')]"
[[ $total -lt $LIMIT_BYTES ]] || { echo "pack_gpu_carry: $(mib "$total") would travel, over the 64 MiB limit; ignore or remove large untracked files first." >&2; exit 1; }

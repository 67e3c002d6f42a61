#!/usr/bin/env bash
# fastblt GPU check: export (fp32, fp16) -> TensorRT engines -> parity ORT vs TRT vs torch ->
# greedy modes on trt (lossless ones against torch) -> bench trt and the torch-CUDA baseline,
# in at most 10 minutes, into one report (OUT/gpu_check.json and OUT/gpu_check.md).
#
#   scripts/gpu_check.sh [OUT_DIR] [--checkpoint DIR] [--max-context N] [--max-bytes N]
#
# Exit 0: every check passed, or TensorRT / a CUDA device is absent (one "SKIP" line says why).
# Exit 1: a check failed or did not run. Exit 124: killed at the 10-minute limit.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="gpu_check_out"
if [[ $# -gt 0 && "$1" != --* ]]; then
  out="$1"
  shift
fi
exec timeout --kill-after=15 600 "${PYTHON:-python}" "$here/gpu_check.py" --out "$out" "$@"

#!/usr/bin/env bash
# fastblt GPU check: the torch backend on CUDA (parity, bench) -> onnxruntime's CUDA provider
# (placement, parity, greedy vs torch) -> export (fp32, fp16) -> TensorRT parse and engines ->
# parity ORT vs TRT vs torch -> greedy modes on trt (lossless ones against ar) -> bench trt, in at
# most 10 minutes, into one report (OUT/gpu_check.json and OUT/gpu_check.md).
#
#   scripts/gpu_check.sh [OUT_DIR] [--checkpoint DIR] [--max-step N] [--max-bytes N]
#
# Exit 0: every check passed, or TensorRT / a CUDA device is absent (one "SKIP" line says why;
# onnxruntime without its CUDA provider: those checks are "skipped", with the reason).
# Exit 1: a check failed or did not run. Exit 124: killed at the 10-minute limit.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="gpu_check_out"
if [[ $# -gt 0 && "$1" != --* ]]; then
  out="$1"
  shift
fi
exec timeout --kill-after=15 600 "${PYTHON:-python}" "$here/gpu_check.py" --out "$out" "$@"

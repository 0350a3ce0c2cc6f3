#!/usr/bin/env bash
# The benchmark matrix on a 2 x H200 host (no 4-GPU rows), in four device calls of under 10 minutes each:
#
#   for i in 1 2 3 4; do bash bench/h200x2.sh $i OUT$i; done
#   python -m qfsdp.bench report DOCS_DIR OUT3 OUT1 OUT2 OUT4
#
# As bench/h200x4.sh, fitted to two GPUs: part 1 runs two one-GPU lanes side by side; parts 2 and 4 run two-GPU rows
# one after another; part 3 runs the rows whose tokens/s are compared, alone on the host. Sized from the row times on
# 4 x H200 (2026-11-21, aa7eeb5); part 3 ran on 2 x H200 (cd3a114; stock-2-ddp cut by the stop time), the others not
# yet.
set -euo pipefail
part=${1:?usage: bash bench/h200x2.sh 1|2|3|4 OUT}
out=${2:?usage: bash bench/h200x2.sh 1|2|3|4 OUT}
case $part in
  1) bash bench/gpu.sh "$out" 0:kaggle-1,qfsdp-1-fp16 1:qfsdp-1-det,qfsdp-1-noac,qfsdp-1-offload ;;
  2) bash bench/gpu.sh "$out" all:kaggle-2,qfsdp-2-det,qfsdp-2-offload-det ;;
  3) bash bench/gpu.sh "$out" all:stock-1,qfsdp-1,qfsdp-2,qfsdp-1-compile,stock-2-ddp ;;
  4) bash bench/gpu.sh "$out" all:qfsdp-2-compile-det,qfsdp-2-fp16 ;;
  *) echo "part must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac

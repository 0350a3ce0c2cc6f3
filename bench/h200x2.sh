#!/usr/bin/env bash
# The benchmark matrix on a 2 x H200 host (no 4-GPU rows), in three device calls of under 10 minutes each:
#
#   bash bench/h200x2.sh 1 OUT1 ; bash bench/h200x2.sh 2 OUT2 ; bash bench/h200x2.sh 3 OUT3
#   python -m qfsdp.bench report DOCS_DIR OUT1 OUT2 OUT3
#
# As bench/h200x4.sh, fitted to two GPUs: lanes side by side for arithmetic and memory checks (parts 1 and 2), the
# rows whose tokens/s are compared one after another with the host to themselves (part 3).
set -euo pipefail
part=${1:?usage: bash bench/h200x2.sh 1|2|3 OUT}
out=${2:?usage: bash bench/h200x2.sh 1|2|3 OUT}
case $part in
  1) bash bench/gpu.sh "$out" 0:kaggle-1,qfsdp-1-fp16 1:qfsdp-1-det,qfsdp-1-noac,qfsdp-1-offload ;;
  2) bash bench/gpu.sh "$out" all:kaggle-2,qfsdp-2-det,qfsdp-2-offload-det,qfsdp-2-compile-det,qfsdp-2-fp16 ;;
  3) bash bench/gpu.sh "$out" all:stock-1,qfsdp-1,qfsdp-2,qfsdp-1-compile,stock-2-ddp ;;
  *) echo "part must be 1, 2 or 3" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The benchmark matrix on a 4 x H200 host, in two device calls of under 10 minutes each (run from the repo root):
#
#   bash bench/h200x4.sh 1 OUT1 ; bash bench/h200x4.sh 2 OUT2 ; python -m qfsdp.bench report DOCS_DIR OUT1 OUT2
#
# Lanes run side by side on disjoint GPUs (bench/gpu.sh). Comparisons that gate a check share a lane or a call.
set -euo pipefail
part=${1:?usage: bash bench/h200x4.sh 1|2 OUT}
out=${2:?usage: bash bench/h200x4.sh 1|2 OUT}
case $part in
  1) bash bench/gpu.sh "$out" 0:stock-1,qfsdp-1,qfsdp-1-compile \
       1,2:qfsdp-2,qfsdp-2-det,qfsdp-2-offload-det,qfsdp-2-compile-det,qfsdp-2-fp16 3:qfsdp-1-det,qfsdp-1-fp16 ;;
  2) bash bench/gpu.sh "$out" 0:kaggle-1 1,2:kaggle-2 3:qfsdp-1-offload,qfsdp-1-noac \
       all:qfsdp-4-det,qfsdp-4 ;;
  *) echo "part must be 1 or 2" >&2; exit 2 ;;
esac

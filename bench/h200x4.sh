#!/usr/bin/env bash
# The benchmark matrix on a 4 x H200 host, in two device calls of under 10 minutes each (run from the repo root):
#
#   bash bench/h200x4.sh 1 OUT1 ; bash bench/h200x4.sh 2 OUT2 ; python -m qfsdp.bench report DOCS_DIR OUT1 OUT2
#
# Part 1: rows whose checks are about arithmetic and memory (parity, offload, compile, fp16, Kaggle), in lanes side
# by side on disjoint GPUs (bench/gpu.sh). Part 2: the rows whose tokens/s are compared (qfsdp vs the stock recipe,
# 2 and 4 GPUs vs 1), one after another with the host to themselves: beside other lanes, a row's speed depends on
# what those lanes do at the time (loading a checkpoint, quantizing), which differs from row to row.
set -euo pipefail
part=${1:?usage: bash bench/h200x4.sh 1|2 OUT}
out=${2:?usage: bash bench/h200x4.sh 1|2 OUT}
case $part in
  1) bash bench/gpu.sh "$out" 0:kaggle-1,qfsdp-1-fp16 \
       1,2:kaggle-2,qfsdp-2-det,qfsdp-2-offload-det,qfsdp-2-compile-det,qfsdp-2-fp16 \
       3:qfsdp-1-det,qfsdp-1-noac,qfsdp-1-offload ;;
  2) bash bench/gpu.sh "$out" all:stock-1,qfsdp-1,qfsdp-2,qfsdp-1-compile,qfsdp-4-det,qfsdp-4 ;;
  *) echo "part must be 1 or 2" >&2; exit 2 ;;
esac

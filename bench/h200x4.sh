#!/usr/bin/env bash
# The benchmark matrix on a 4 x H200 host, in three device calls of under 10 minutes each (run from the repo root):
#
#   bash bench/h200x4.sh 1 OUT1 ; bash bench/h200x4.sh 2 OUT2 ; bash bench/h200x4.sh 3 OUT3
#   python -m qfsdp.bench report DOCS_DIR OUT2 OUT1 OUT3
#
# Parts 1 and 3: rows whose checks are about arithmetic and memory (parity, offload, compile, fp16, Kaggle), in
# lanes side by side on disjoint GPUs (bench/gpu.sh), then (part 3) the 4-GPU and DDP rows on every GPU. Part 2: the
# rows whose tokens/s are compared (qfsdp vs the stock recipe, 2 GPUs vs 1), one after another with the host to
# themselves: beside other lanes, a row's speed depends on what those lanes do at the time (loading a checkpoint,
# quantizing), which differs from row to row. Parts 1 and 2 fit their 9 minutes on 2026-11-21 (aa7eeb5); part 3's
# stock-2-ddp and qfsdp-4 did not run then (the stop time cuts what does not fit, and the report lists it).
set -euo pipefail
part=${1:?usage: bash bench/h200x4.sh 1|2|3 OUT}
out=${2:?usage: bash bench/h200x4.sh 1|2|3 OUT}
case $part in
  1) bash bench/gpu.sh "$out" 0:kaggle-1 1,2:kaggle-2,qfsdp-2-det,qfsdp-2-offload-det \
       3:qfsdp-1-det,qfsdp-1-noac,qfsdp-1-fp16 ;;
  2) bash bench/gpu.sh "$out" all:stock-1,qfsdp-1,qfsdp-2,qfsdp-1-compile ;;
  3) bash bench/gpu.sh "$out" 0,1:qfsdp-2-compile-det,qfsdp-2-fp16 2:qfsdp-1-offload \
       all:qfsdp-4-det,stock-2-ddp,qfsdp-4 ;;
  *) echo "part must be 1, 2 or 3" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Run the benchmark matrix on an offline GPU host (see ../shared/gpu/README.md), from the repo root:
#
#   bash bench/gpu.sh OUT [ROWS]          e.g. bash bench/gpu.sh /tmp/out qfsdp-1,qfsdp-2,stock-1
#
# Needs, carried along: .gpu-site/ (make-site.sh's default packages) and .gpu-wheels/transformers-5.23.0-*.whl
# (the host's transformers 5.17 lacks the Trainer path for pre-sharded models). Everything lands in OUT.
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT [ROWS]}
rows=${2:-qfsdp-1,qfsdp-2,stock-1}
mkdir -p "$out"
. bench/gpu_env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft, trl, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "bitsandbytes", b.__version__)'
} | tee "$out/host.txt"
# run directories stay outside OUT: OUT holds the few files to keep (results, table, plots, log)
python3 -m qfsdp.bench run "$out" --rows "$rows" --rows-dir /tmp/qfsdp-bench-rows

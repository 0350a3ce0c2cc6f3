#!/usr/bin/env bash
# Llama 3.1 70B (random weights drawn on the GPU, no checkpoint) on one GPU, for docs/BENCHMARKS.md's 70B figures.
# Run from the repo root on a GPU host (see bench/gpu_env.sh):
#
#   bash bench/big_model.sh OUT offload24     # fsdp2=offload, each GPU capped at 24 GiB (a 24 GB card's budget)
#   bash bench/big_model.sh OUT resident      # no offload, no cap: the 4-bit model held on the GPU
#
# Extra arguments after the mode go to launch.py (e.g. world_size=2, trainer.max_steps=10). OUT gets launch.log,
# metrics.jsonl and summary.json of the run, host memory and GPU memory sampled every 2 s (host.csv, gpu.csv),
# and the wall time of each phase in times.txt. MODEL (default llama3_1_70b) and SEQ (2048) pick the shape.
set -uo pipefail
out=${1:?usage: bash bench/big_model.sh OUT offload24|resident [launch.py overrides]}
mode=${2:?usage: bash bench/big_model.sh OUT offload24|resident [launch.py overrides]}
shift 2
mkdir -p "$out"
command -v nvidia-smi >/dev/null && . bench/gpu_env.sh  # a CPU dry run uses this machine's packages
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft, trl, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "bitsandbytes", b.__version__)'
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -5; nproc; free -g | head -2
} > "$out/host.txt" 2>&1

seq=${SEQ:-2048}
args=(model=${MODEL:-llama3_1_70b} model.random_init=true dataset=synthetic dataset.seq_length=$seq
      trainer.max_length=$seq trainer.max_steps=20 trainer.global_batch_size=4 trainer.per_device_train_batch_size=2)
case $mode in
  offload24) args+=(fsdp2=offload gpu_memory_limit_gib=24) ;;
  resident) ;;
  *) echo "bench/big_model.sh: mode '$mode' is offload24 or resident" >&2; exit 2 ;;
esac
run=${RUNS:-/tmp/qfsdp-big}/$mode
rm -rf "$run"

# Samplers: used host memory (MiB) and each GPU's used memory (MiB), every 2 s, until the run ends.
( while :; do echo "$(date +%s),$(free -m | awk '/^Mem:/ {print $3}')"; sleep 2; done ) > "$out/host.csv" &
host_pid=$!
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader -lms 2000 > "$out/gpu.csv" &
  gpu_pid=$!
fi
start=$(date +%s)
echo "start $start $mode ${args[*]} $*" > "$out/times.txt"
timeout "${BIG_SECONDS:-560}" python3 launch.py "${args[@]}" "$@" hydra.run.dir="$run" > "$out/console.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$out/times.txt"
kill $host_pid ${gpu_pid:-} 2>/dev/null
cp "$run"/{launch.log,metrics.jsonl,summary.json,loss.png} "$out/" 2>/dev/null
python3 - "$out" <<'EOF' | tee -a "$out/times.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
host = [int(l.split(",")[1]) for l in (out / "host.csv").read_text().splitlines() if l.count(",") == 1]
print(f"steps logged: {len(rows)}; losses: {[round(r['loss'], 4) for r in rows if 'loss' in r]}")
if host:
    print(f"host memory used: min {min(host) / 1024:.1f} GiB, peak {max(host) / 1024:.1f} GiB (free -m, whole host)")
s = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
if s:
    print(f"tokens/s {s['tokens_per_second']:.1f}; peak GPU GiB {s['peak_memory_gib']}; wall {s['wall_time_s']:.0f} s")
    print(f"load GPU {s['load_memory']}; load host {s.get('load_host_memory_per_node')}")
EOF
tail -5 "$out/console.log"

#!/usr/bin/env bash
# The Llama-3.1-8B shape (random weights) on one GPU, for the checkpoint, export and packing figures of
# docs/BENCHMARKS.md. Run from the repo root on a GPU host (see bench/gpu_env.sh):
#
#   bash bench/one_gpu_features.sh OUT [resume] [export] [pack]      (default: all three)
#
# resume: 20 steps saving every 5 (deterministic=true), then the step-10 checkpoint resumed into a new run:
#         losses of steps 11-20 compared, save time and size per checkpoint.
# export: the 20-step run's adapter merged into the base (python -m qfsdp.export): time and peak host memory.
# pack:   lengths like instruction data (log-normal, median 256, cut at 2048), the same run unpacked and packed:
#         real (non-padding) tokens/s of each.
set -uo pipefail
out=${1:?usage: bash bench/one_gpu_features.sh OUT [resume] [export] [pack]}
shift
parts=${*:-resume export pack}
mkdir -p "$out"
command -v nvidia-smi >/dev/null && . bench/gpu_env.sh  # a CPU dry run uses this machine's packages
runs=${RUNS:-/tmp/qfsdp-features}
mkdir -p "$runs"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft, trl, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "bitsandbytes", b.__version__)'
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -5
} | tee "$out/host.txt"

# SHAPE and SEQ replace the model and sequence length (a CPU dry run: SHAPE="model=tiny" SEQ=256)
read -r -a shape <<< "${SHAPE:-model=llama3_1_8b model.random_init=true lora.r=16}"
shape+=(compile=false)  # eager, as its recorded figures were (compile is on by default on GPUs)
seq=${SEQ:-2048}
shape+=(trainer.max_length=$seq)

if [[ $parts == *resume* ]]; then
  fixed=("${shape[@]}" dataset=synthetic dataset.seq_length=$seq dataset.num_samples=512
         trainer.global_batch_size=8 trainer.per_device_train_batch_size=4 deterministic=true)
  python3 launch.py "${fixed[@]}" trainer.max_steps=20 trainer.save_strategy=steps trainer.save_steps=5 \
    hydra.run.dir=$runs/full 2>&1 | tail -4 | tee "$out/resume.log"
  python3 launch.py "${fixed[@]}" trainer.max_steps=20 trainer.save_strategy=steps trainer.save_steps=5 \
    resume=$runs/full/checkpoints/step-10 hydra.run.dir=$runs/resumed 2>&1 | tail -4 | tee -a "$out/resume.log"
  cp $runs/full/metrics.jsonl "$out/resume-full-metrics.jsonl" 2>/dev/null
  cp $runs/resumed/metrics.jsonl "$out/resume-resumed-metrics.jsonl" 2>/dev/null
  python3 - "$runs" <<'EOF' | tee -a "$out/resume.log"
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
rows = {n: {r["step"]: r for r in map(json.loads, (runs / n / "metrics.jsonl").read_text().splitlines())}
        for n in ("full", "resumed")}
diffs = [abs(rows["full"][s]["loss"] - rows["resumed"][s]["loss"]) for s in range(11, 21)]
print(f"resume: steps 11-20 max |loss(full) - loss(resumed)| = {max(diffs):.3g} "
      f"({sum(d == 0 for d in diffs)} of 10 bit-identical)")
for s, r in sorted(rows["full"].items()):
    if "save_s" in r:
        print(f"save at step {s}: {r['save_s']:.2f} s, {r['save_bytes'] / 2**20:.1f} MiB")
EOF
fi

if [[ $parts == *export* && -f $runs/full/summary.json ]]; then
  rm -rf $runs/merged
  timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
  start=$(date +%s)
  ${timer[@]+"${timer[@]}"} python3 -m qfsdp.export $runs/full $runs/merged > "$out/export.log" 2>&1
  echo "export: exit $?, $(( $(date +%s) - start )) s wall" | tee -a "$out/export.log"
  grep -E "Elapsed|Maximum resident|qfsdp|peak" "$out/export.log" | tail -6
  du -sh $runs/merged | tee -a "$out/export.log"
  rm -rf $runs/merged
fi

if [[ $parts == *pack* ]]; then
  lengths=("${shape[@]}" dataset=synthetic dataset.lengths=lognormal dataset.median_length=256
           dataset.seq_length=$seq dataset.num_samples=2048 trainer.global_batch_size=16
           trainer.per_device_train_batch_size=4 trainer.max_steps=12)
  for packing in false true; do
    python3 launch.py "${lengths[@]}" trainer.packing=$packing hydra.run.dir=$runs/pack-$packing 2>&1 | tail -3 \
      | tee -a "$out/pack.log"
    cp $runs/pack-$packing/summary.json "$out/pack-$packing-summary.json" 2>/dev/null
  done
  python3 - "$runs" <<'EOF' | tee -a "$out/pack.log"
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
tps = {}
for packing in ("false", "true"):
    s = json.loads((runs / f"pack-{packing}" / "summary.json").read_text())
    tps[packing] = s["tokens_per_second"]
    print(f"packing={packing}: {s['tokens_per_second']:.0f} real tokens/s, peak {max(s['peak_memory_gib']):.2f} GiB, "
          f"padding tokens {s.get('padding_tokens')}")
print(f"packed / unpacked real tokens/s: {tps['true'] / tps['false']:.2f}x")
EOF
fi

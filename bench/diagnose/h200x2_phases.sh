#!/usr/bin/env bash
# One 2 x H200 call (from the repo root, .gpu-site and .gpu-wheels carried):  OUT=DIR bash bench/diagnose/h200x2_phases.sh
#   q1, q2        qfsdp at 1 and 2 GPUs, 8 steps: metrics.jsonl's step phases (metrics.StepPhases: each micro-step,
#                 the optimizer step, the time between steps) say whether 2 GPUs lose their time per micro-step or
#                 per optimizer step (which 2 GPUs share among 4 micro-steps, 1 GPU among 8)
#   offload-det   fsdp2=offload deterministic=true at 2 GPUs, 20 steps: its losses against the qfsdp-2-det row of the
#                 same code (strict determinism gives the same bits on the same GPU model and software)
# About 6 minutes with the checkpoint build. Per-run metrics.jsonl copied to OUT. The figure: docs/BENCHMARKS.md's
# 2 x H200 parity table, offload over 20 steps on two machines (fdf2717; micro batch 2 then, the preset's 4 now).
out=${OUT:-/tmp/out}; mkdir -p $out /tmp/d
. bench/diagnose/common.sh
python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
{
  run q1 1 trainer.max_steps=8
  run q2 2 trainer.max_steps=8
  run offload-det 2 fsdp2=offload deterministic=true trainer.max_steps=20
} 2>&1 | tee $out/tokens.txt
for n in q1 q2 offload-det; do cp /tmp/d/$n/metrics.jsonl $out/$n.jsonl; done
python3 - <<'PY'
import json, statistics as st
for n in ["q1", "q2"]:
    rows = [json.loads(l) for l in open(f"/tmp/d/{n}/metrics.jsonl")][3:]
    print(n, "median micro-step ms", round(st.median(m for r in rows for m in r["micro_steps_ms"]), 1),
          "optimizer", round(st.median(r["optimizer_ms"] for r in rows), 1),
          "after", round(st.median(r["after_optimizer_ms"] for r in rows), 1),
          "between", round(st.median(r["between_steps_ms"] for r in rows), 1))
    for r in rows:
        print(" ", r["step"], r["micro_steps_ms"], r["optimizer_ms"], r["after_optimizer_ms"], r["between_steps_ms"])
PY

#!/usr/bin/env bash
# Is strict deterministic=true deterministic on GPUs? On a 2 x H200 host, one device call (about 6 minutes): qfsdp
# at 2 GPUs twice, then with offload and with compile=true: step-1 gradient norms and per-step losses side by side
# (10 steps each). The figures of docs/BENCHMARKS.md's 2 x H200 parity table, first two rows
# (docs/benchmarks/2026-11-21-h200x2/a3182b1-determinism.txt; micro batch 2 then, the preset's 4 now).
#   OUT=DIR bash bench/diagnose/h200x2_det_scaling.sh     (from the repo root, .gpu-site and .gpu-wheels carried)
set -x
out=${OUT:-/tmp/out}; mkdir -p $out /tmp/d
. bench/diagnose/common.sh
python3 -m qfsdp.bench prepare --rows qfsdp-2 > /tmp/d/prepare.log 2>&1
run det-a 2 deterministic=true trainer.max_steps=10
run det-b 2 deterministic=true trainer.max_steps=10
run det-offload 2 deterministic=true fsdp2=offload trainer.max_steps=10
run det-compile 2 deterministic=true compile=true trainer.max_steps=10
python3 - <<'PY' | tee $out/determinism.txt
import json
def rows(n):
    try:
        return [json.loads(l) for l in open(f"/tmp/d/{n}/metrics.jsonl")]
    except OSError:
        print(n, "did not finish (its log: logs.tar.gz)")
a = rows("det-a")
for n in ("det-b", "det-offload", "det-compile") if a else ():
    b = rows(n)
    if not b:
        continue
    gaps = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    same = all(g == 0 for g in gaps) and all(x["grad_norm"] == y["grad_norm"] for x, y in zip(a, b))
    print(f"det-a vs {n}: step-1 grad norm {a[0]['grad_norm']!r} vs {b[0]['grad_norm']!r}; "
          f"max |dloss| {max(gaps):.2e} over {len(gaps)} steps; losses and grad norms identical={same}")
PY
grep -h "cuDNN\|Flash Attention\|deterministic" /tmp/d/det-*.log | sort | uniq -c | head > $out/warnings.txt
tar czf $out/logs.tar.gz -C /tmp/d --exclude='*.safetensors' --exclude='adapter' --exclude='trace.json.gz' .
ls -la $out

#!/usr/bin/env bash
# Two questions left by the fourth 4 x H200 run, on a 2 x H200 host in one device call (about 9 minutes):
# 1. Is strict deterministic=true (commit c1fb518) deterministic on GPUs? qfsdp at 2 GPUs twice, then with offload
#    and with compile=true: step-1 gradient norms and per-step losses side by side (10 steps each).
# 2. Where does 2-GPU throughput go? profile=true at 1 and at 2 GPUs (steps 4-5: profile.txt with the GPU-idle table).
#   OUT=DIR bash bench/diagnose/h200x2_det_scaling.sh     (from the repo root, .gpu-site and .gpu-wheels carried)
set -x
out=${OUT:-/tmp/out}; mkdir -p $out /tmp/d
. bench/diagnose/common.sh
python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
run() {  # NAME WORLD_SIZE OVERRIDES...
  local name=$1 ws=$2; shift 2
  python3 launch.py world_size=$ws $P "$@" hydra.run.dir=/tmp/d/$name > /tmp/d/$name.log 2>&1 || tail -30 /tmp/d/$name.log
  tps /tmp/d/$name $name
}
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
# Profiles only while the call has time left (a device call stops at 10 minutes; what follows must still run).
if [ $SECONDS -lt 390 ]; then
  CUDA_VISIBLE_DEVICES=0 run prof-1 1 profile=true trainer.max_steps=6
  [ $SECONDS -lt 470 ] && run prof-2 2 profile=true trainer.max_steps=6
fi
for n in prof-1 prof-2; do cp /tmp/d/$n/profile.txt $out/profile_$n.txt 2>/dev/null; done
grep -h "cuDNN\|Flash Attention\|deterministic" /tmp/d/det-*.log | sort | uniq -c | head > $out/warnings.txt
tar czf $out/logs.tar.gz -C /tmp/d --exclude='*.safetensors' --exclude='adapter' --exclude='trace.json.gz' .
grep -h -A 22 "GPU idle" $out/profile_prof-*.txt
ls -la $out

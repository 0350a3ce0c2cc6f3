#!/usr/bin/env bash
# 2-GPU scaling on one 2 x H200 machine, in one device call (from the repo root, .gpu-site and .gpu-wheels carried);
# docs/BENCHMARKS.md, "Open questions", first item:
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh profile-N   profile=true at N GPUs (1 or 2), 8 steps: steps 4-5
#                                                            profiled (profile.txt with the GPU-idle table; the
#                                                            figures of cba6489-profile-{1,2}gpu.txt), about 6 minutes
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh mb4         1 and 2 GPUs at micro batch 4, then at 2, 8 steps each:
#                                                            the gap per micro-step at both (cba6489-micro-batch-4-vs-
#                                                            2.txt), about 6.5 minutes
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh units       FSDP2 units of one and of two decoder layers
#                                                            (fsdp2.layers_per_unit=1|2) at 2 GPUs, then at 1, 10 steps
#                                                            each: host work per micro-step against the memory bound
#                                                            (not run yet), about 8 minutes
# Every run takes the bench's llama8b preset less its step count (bench/diagnose/common.sh). Machines of one kind
# differ in throughput by up to a third: compare GPU counts only within one call.
set -x
out=${OUT:-/tmp/out}; mkdir -p $out /tmp/d
. bench/diagnose/common.sh
if [ "$1" = profile-1 ] || [ "$1" = profile-2 ]; then
  n=${1#profile-}
  python3 -m qfsdp.bench prepare --rows qfsdp-$n > /tmp/d/prepare.log 2>&1
  run prof-$n $n profile=true trainer.max_steps=8 | tee $out/tokens.txt
  cp /tmp/d/prof-$n/profile.txt $out/profile_prof-$n.txt
elif [ "$1" = mb4 ]; then
  python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
  {
    run q1-mb4 1 trainer.max_steps=8 trainer.per_device_train_batch_size=4
    run q2-mb4 2 trainer.max_steps=8 trainer.per_device_train_batch_size=4
    run q2 2 trainer.max_steps=8 trainer.per_device_train_batch_size=2
    run q1 1 trainer.max_steps=8 trainer.per_device_train_batch_size=2
  } 2>&1 | tee $out/tokens.txt
elif [ "$1" = units ]; then
  python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
  {
    run q2-u1 2 trainer.max_steps=10 fsdp2.layers_per_unit=1
    run q2-u2 2 trainer.max_steps=10 fsdp2.layers_per_unit=2
    run q1-u1 1 trainer.max_steps=10 fsdp2.layers_per_unit=1
    run q1-u2 1 trainer.max_steps=10 fsdp2.layers_per_unit=2
  } 2>&1 | tee $out/tokens.txt
else
  echo "usage: OUT=DIR bash bench/diagnose/h200x2_scaling.sh profile-1|profile-2|mb4|units" >&2; exit 2
fi
nvidia-smi > $out/host.txt; lscpu >> $out/host.txt
tar czf $out/logs.tar.gz -C /tmp/d --exclude='*.safetensors' --exclude='adapter' --exclude='trace.json.gz' .
grep -h -A 24 "GPU idle" $out/profile_prof-*.txt 2>/dev/null
cat $out/tokens.txt

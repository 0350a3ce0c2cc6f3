#!/usr/bin/env bash
# 2-GPU scaling on one 2 x H200 host, in one device call (from the repo root, .gpu-site and .gpu-wheels carried):
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh             qfsdp at 1 and 2 GPUs, then 2-GPU variants that each
#                                                            remove one suspected cost, 8 steps each (about 9.5
#                                                            minutes with the checkpoint build; sixth session's
#                                                            results: docs/BENCHMARKS.md):
#       q2-simple      NCCL_PROTO=Simple (the profile showed every all-gather in NCCL's LL protocol, whose kernels hold
#                      SMs beside the matmuls for longer)
#       q2-noreshard   fsdp2.reshard_after_forward=false (each layer gathered once per micro-step, not twice: what the
#                      second gather costs; holds the whole 4-bit model per GPU)
#       q1-lean/q2-lean  per-micro-step host syncs of TRL's and Trainer's metrics removed (bench/diagnose/lean)
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh pin         q1, q2, then 2-GPU variants, 8 steps each, with each
#                                                            GPU's clocks, power and throttle reasons logged
#                                                            (smi.csv; about 8.5 minutes):
#       q2-pin         each rank pinned to its own half of the physical cores (bench/diagnose/pin)
#       q2-ch4         NCCL_MAX_NCHANNELS=4 (all-gathers on fewer SMs, so the matmuls beside them keep theirs)
#       q2-again       q2 once more (its spread within the call)
#       prof-2         profile=true (steps 4-5 profiled: profile.txt with the GPU-idle table, on the host of q1)
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh mb4         1 and 2 GPUs at micro batch 4 (global batch 16: 4 and 2
#                                                            micro-steps per step), then at micro batch 2, 8 steps
#                                                            each: does doubling the work per launch close the gap,
#                                                            and what does it cost in memory (about 6.5 minutes)
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh knobs       the eighth session's two changes, each turned off on its
#                                                            own, on one host: q1 and q2 (defaults), q2-nopf
#                                                            (fsdp2.forward_prefetch=false), q2-foreach and q1-foreach
#                                                            (trainer.optim=adamw_torch), 8 steps each (about 8.5
#                                                            minutes; not run yet: call K's version ran the bench's rows
#                                                            first and cut its 2-GPU runs at 90 s each, before they
#                                                            printed anything)
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh units       FSDP2 units of one and of two decoder layers
#                                                            (fsdp2.layers_per_unit=1|2) at 2 GPUs, then at 1, 10
#                                                            steps each (tokens/s over steps 4-10; about 8 minutes):
#                                                            fewer units, less host work per micro-step; peak memory
#                                                            against the 0.75 bound
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh profile-N   profile=true at N GPUs (1 or 2) for 8 steps: steps 4-5
#                                                            profiled (profile.txt with the GPU-idle table), steps 6-8
#                                                            unprofiled (about 6 minutes)
# Every run takes the bench's llama8b preset less its step count (bench/diagnose/common.sh): micro batch 4 since the
# seventh session; the runs of the sixth and seventh sessions were at micro batch 2 unless named mb4.
# Throughput differs from host to host by up to a third (docs/BENCHMARKS.md, fifth session): compare GPU counts
# only within one call.
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
elif [ "$1" = knobs ]; then
  python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
  {
    run q1 1 trainer.max_steps=8
    run q2 2 trainer.max_steps=8
    run q2-nopf 2 trainer.max_steps=8 fsdp2.forward_prefetch=false
    run q2-foreach 2 trainer.max_steps=8 trainer.optim=adamw_torch
    run q1-foreach 1 trainer.max_steps=8 trainer.optim=adamw_torch
  } 2>&1 | tee $out/tokens.txt
elif [ "$1" = pin ]; then
  python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
  nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 1000 > $out/smi.csv 2>&1 &
  smi=$!
  {
    run q1 1 trainer.max_steps=8
    run q2 2 trainer.max_steps=8
    PYTHONPATH=$PWD/bench/diagnose/pin:$PYTHONPATH QFSDP_DIAG_PIN=1 run q2-pin 2 trainer.max_steps=8
    NCCL_MAX_NCHANNELS=4 run q2-ch4 2 trainer.max_steps=8
    run q2-again 2 trainer.max_steps=8
    run prof-2 2 profile=true trainer.max_steps=8
  } 2>&1 | tee $out/tokens.txt
  kill $smi
  grep -h "\[pin\]" /tmp/d/q2-pin.log
  cp /tmp/d/prof-2/profile.txt $out/profile_prof-2.txt
  for f in /tmp/d/*/launch.log; do echo "== $f"; grep -i "rank\|switch\|nccl" $f | head -5; done > $out/launch-logs.txt
else
  python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
  {
    run q1 1 trainer.max_steps=8
    run q2 2 trainer.max_steps=8
    NCCL_PROTO=Simple run q2-simple 2 trainer.max_steps=8
    run q2-noreshard 2 trainer.max_steps=8 fsdp2.reshard_after_forward=false
    lean=$PWD/bench/diagnose/lean:$PYTHONPATH  # assignments before a shell function reach the commands it runs
    PYTHONPATH=$lean QFSDP_DIAG_LEAN=1 run q1-lean 1 trainer.max_steps=8
    PYTHONPATH=$lean QFSDP_DIAG_LEAN=1 run q2-lean 2 trainer.max_steps=8
  } 2>&1 | tee $out/tokens.txt
fi
nvidia-smi > $out/host.txt; lscpu >> $out/host.txt
tar czf $out/logs.tar.gz -C /tmp/d --exclude='*.safetensors' --exclude='adapter' --exclude='trace.json.gz' .
grep -h -A 24 "GPU idle" $out/profile_prof-*.txt 2>/dev/null
cat $out/tokens.txt

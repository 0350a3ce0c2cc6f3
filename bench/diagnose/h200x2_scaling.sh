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
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh pin         q1, q2, q2-pin (each rank pinned to its own half of the
#                                                            physical cores, bench/diagnose/pin), q2 again (its
#                                                            spread), 8 steps each (about 6 minutes; not yet run)
#   OUT=DIR bash bench/diagnose/h200x2_scaling.sh profile-N   profile=true at N GPUs (1 or 2) for 8 steps: steps 4-5
#                                                            profiled (profile.txt with the GPU-idle table), steps 6-8
#                                                            unprofiled (about 6 minutes)
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
elif [ "$1" = pin ]; then
  python3 -m qfsdp.bench prepare --rows qfsdp-1,qfsdp-2 > /tmp/d/prepare.log 2>&1
  {
    run q1 1 trainer.max_steps=8
    run q2 2 trainer.max_steps=8
    PYTHONPATH=$PWD/bench/diagnose/pin:$PYTHONPATH QFSDP_DIAG_PIN=1 run q2-pin 2 trainer.max_steps=8
    run q2-again 2 trainer.max_steps=8
  } 2>&1 | tee $out/tokens.txt
  grep -h "\[pin\]" /tmp/d/q2-pin.log
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

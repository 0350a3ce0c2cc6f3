#!/usr/bin/env bash
# One-GPU diagnosis on a 2 x H200 host (one device call): GPU 0 profiles qfsdp and the stock recipe (profile=true:
# profile.txt with the GPU-idle table, trace.json.gz) and runs qfsdp with the NaN/inf loss filter on; GPU 1 measures
# activation memory of compiled vs eager layers (compile_memory.py), then qfsdp and the stock recipe for 10 steps.
#   OUT=DIR bash bench/diagnose/h200x2_profile.sh        (from the repo root, .gpu-site and .gpu-wheels carried)
set -x
out=${OUT:-/tmp/out}; mkdir -p $out /tmp/d
. bench/diagnose/common.sh
lane0() {
  export CUDA_VISIBLE_DEVICES=0
  python3 -m qfsdp.bench prepare --rows qfsdp-1,stock-1
  touch /tmp/d/prepared
  python3 launch.py world_size=1 $P trainer.max_steps=6 profile=true hydra.run.dir=/tmp/d/q1p
  torchrun --standalone --nproc_per_node=1 -m qfsdp.bench.stock /tmp/d/s1p $P trainer.max_steps=6 profile=true
  python3 launch.py world_size=1 $P trainer.max_steps=10 trainer.logging_nan_inf_filter=true hydra.run.dir=/tmp/d/q1n
  tps /tmp/d/q1n q1-nanfilter-ON
}
lane1() {
  export CUDA_VISIBLE_DEVICES=1
  for v in "1 1" "0 1" "1 0"; do
    torchrun --standalone --nproc_per_node=1 --master_port 29611 bench/diagnose/compile_memory.py $v 4 /tmp/d/cm_${v// /_}.json
  done
  while [ ! -f /tmp/d/prepared ]; do sleep 5; done
  python3 launch.py world_size=1 $P trainer.max_steps=10 hydra.run.dir=/tmp/d/q1
  tps /tmp/d/q1 q1
  torchrun --standalone --nproc_per_node=1 --master_port 29612 -m qfsdp.bench.stock /tmp/d/s1 $P trainer.max_steps=10
  tps /tmp/d/s1 s1
}
lane0 > /tmp/d/lane0.log 2>&1 &
lane1 > /tmp/d/lane1.log 2>&1 &
wait
python3 -c "
import json,glob; json.dump([json.load(open(f)) for f in sorted(glob.glob('/tmp/d/cm_*.json'))], open('$out/compile_mem.json','w'), indent=1)"
cp /tmp/d/q1p/profile.txt $out/profile_q1.txt; cp /tmp/d/s1p/profile.txt $out/profile_s1.txt
for f in q1p s1p; do [ -f /tmp/d/$f/trace.json.gz ] && [ $(stat -c %s /tmp/d/$f/trace.json.gz) -lt 15000000 ] && cp /tmp/d/$f/trace.json.gz $out/trace_$f.json.gz; done
cat /tmp/d/lane0.log /tmp/d/lane1.log > $out/lanes.log
grep -h "tok/s" /tmp/d/lane*.log
grep -h -A 25 "GPU idle" $out/profile_q1.txt $out/profile_s1.txt
python3 -c "
import json; [print(r['compile'], r['ac'], r['steps'][-1]) for r in json.load(open('$out/compile_mem.json'))]"
ls -la $out

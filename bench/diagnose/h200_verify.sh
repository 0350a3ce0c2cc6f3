#!/usr/bin/env bash
# One H200 (one device call): compile_memory.py for compile + checkpointing, qfsdp vs the stock recipe for 10 steps,
# qfsdp compile=true, and a qfsdp profile.   OUT=DIR bash bench/diagnose/h200_verify.sh   (from the repo root)
set -x
out=${OUT:-/tmp/out}; mkdir -p $out /tmp/d
. bench/diagnose/common.sh
torchrun --standalone --nproc_per_node=1 --master_port 29611 bench/diagnose/compile_memory.py 1 1 4 /tmp/d/cm_1_1.json > /tmp/d/cm.log 2>&1 &
python3 -m qfsdp.bench prepare --rows qfsdp-1,stock-1 > /tmp/d/prep.log 2>&1
wait
python3 launch.py world_size=1 $P trainer.max_steps=10 hydra.run.dir=/tmp/d/q1 > /tmp/d/q1.log 2>&1; tps /tmp/d/q1 q1 | tee -a $out/summary.txt
torchrun --standalone --nproc_per_node=1 -m qfsdp.bench.stock /tmp/d/s1 $P trainer.max_steps=10 > /tmp/d/s1.log 2>&1; tps /tmp/d/s1 s1 | tee -a $out/summary.txt
python3 launch.py world_size=1 $P trainer.max_steps=10 compile=true hydra.run.dir=/tmp/d/q1c > /tmp/d/q1c.log 2>&1; tps /tmp/d/q1c q1-compile | tee -a $out/summary.txt
python3 launch.py world_size=1 $P trainer.max_steps=6 profile=true hydra.run.dir=/tmp/d/q1p > /tmp/d/q1p.log 2>&1
cp /tmp/d/q1p/profile.txt $out/profile_q1.txt; cp /tmp/d/cm_1_1.json $out/; cat /tmp/d/*.log > $out/logs.txt
python3 -c "
import json; r=json.load(open('/tmp/d/cm_1_1.json')); print(r['steps'][-1])"
grep -A 25 "GPU idle" $out/profile_q1.txt

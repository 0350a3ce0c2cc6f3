#!/usr/bin/env bash
# Run benchmark rows on an offline GPU host (see ../shared/gpu/README.md), from the repo root, in lanes that run
# side by side on disjoint GPUs:
#
#   bash bench/gpu.sh OUT LANE [LANE...]     LANE = GPUS:ROW,ROW...   e.g.  0:stock-1,qfsdp-1  2,3:qfsdp-2
#                                            GPUS "all": the lane runs after the others, on every GPU
#
# Lanes share the host's CPUs, disks and PCIe, not their GPUs: a row's speed then depends on what the other
# lanes do meanwhile, so rows whose tokens/s are compared go in the "all" lane, alone on the host
# (bench/h200x4.sh part 2). Every lane's rows end 9 minutes after the call begins (a device
# call lasts at most 10; BENCH_SECONDS below), and OUT then gets the merged results.json / results.md / plots, host.txt,
# bench.log and extras.tar.gz (every row's metrics, summary, profile and the lane logs).
#
# BENCH_SET="KEY=VALUE ..." applies those overrides to every qfsdp row (`bench run --set`; the stock recipe stays the
# baseline), e.g. BENCH_SET=fsdp2.layers_per_unit=2. BENCH_SECONDS (default 540) is when every
# row has ended: a row still running then is stopped (its log keeps the steps it made), later rows are skipped, and
# a row starting with less than 60 s left is skipped. So lower it only to leave the call time for other work.
#
# Carried along: .gpu-site/ (make-site.sh's default packages) and .gpu-wheels/transformers-5.23.0-*.whl (the
# host's transformers 5.17 lacks the Trainer path for models sharded before training).
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT GPUS:ROWS [GPUS:ROWS...]}
shift
for lane in "$@"; do
  [[ $lane == *:* ]] || { echo "bench/gpu.sh: lane '$lane' is not GPUS:ROWS (e.g. 0,1:qfsdp-2,qfsdp-2-det)" >&2; exit 2; }
done
stop_at=$(( $(date +%s) + ${BENCH_SECONDS:-540} ))
# An earlier call on the same host left its rows here: set them aside, or the launcher refuses to run a row again
# in its finished run directory (and the merged report would read an earlier lane's results).
for d in /tmp/qfsdp-lanes /tmp/qfsdp-bench-rows; do
  [ -e "$d" ] && mkdir -p /tmp/qfsdp-earlier-calls && mv "$d" "/tmp/qfsdp-earlier-calls/${d#/tmp/}-$stop_at"
done
mkdir -p "$out" /tmp/qfsdp-lanes
. bench/gpu_env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft, trl, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "bitsandbytes", b.__version__)'
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} | tee "$out/host.txt"

# BENCH_SET split on whitespace only (no glob expansion: Hydra values may hold brackets)
read -r -a set_kvs <<< "${BENCH_SET:-}"
set_args=(); for kv in ${set_kvs[@]+"${set_kvs[@]}"}; do set_args+=(--set "$kv"); done
all_rows=$(for lane in "$@"; do echo "${lane#*:}"; done | paste -sd, -)
# checkpoints and tokenizers first, once: lanes would otherwise race to build the same ones
python3 -m qfsdp.bench prepare --rows "$all_rows" ${set_args[@]+"${set_args[@]}"} > /tmp/qfsdp-lanes/prepare.log 2>&1 || tail -20 /tmp/qfsdp-lanes/prepare.log

run_lane() {  # GPUS ROWS DIR
  CUDA_VISIBLE_DEVICES=$1 python3 -m qfsdp.bench run "$3" --rows "$2" --rows-dir /tmp/qfsdp-bench-rows \
    --stop-at "$stop_at" ${set_args[@]+"${set_args[@]}"} > "$3.log" 2>&1
}
sources=() pids=() i=0
for lane in "$@"; do
  gpus=${lane%%:*}
  [ "$gpus" = all ] && continue
  i=$((i + 1)); sources+=(/tmp/qfsdp-lanes/lane$i)
  run_lane "$gpus" "${lane#*:}" /tmp/qfsdp-lanes/lane$i & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for lane in "$@"; do
  [ "${lane%%:*}" = all ] || continue
  i=$((i + 1)); sources+=(/tmp/qfsdp-lanes/lane$i)
  all=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
  run_lane "$all" "${lane#*:}" /tmp/qfsdp-lanes/lane$i
done

existing=(); for s in "${sources[@]}"; do [ -f "$s/results.json" ] && existing+=("$s"); done
[ ${#existing[@]} -gt 0 ] && python3 -m qfsdp.bench report "$out" "${existing[@]}" > /dev/null
cat /tmp/qfsdp-lanes/lane*/bench.log > "$out/bench.log" 2>/dev/null
( cd /tmp && tar czf "$out/extras.tar.gz" --exclude='*.safetensors' --exclude='*.bin' --exclude='trainer' \
    qfsdp-lanes qfsdp-bench-rows 2>/dev/null )
cat "$out/results.md" 2>/dev/null
for s in "${sources[@]}"; do tail -3 "$s.log"; done

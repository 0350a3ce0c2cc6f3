# Sourced by the diagnosis scripts here, from the repo root on a GPU host: the packages (bench/gpu_env.sh), the
# bench's llama8b preset without its step count (P), tps RUN_DIR NAME (tokens/s over steps 4+ and per step, peak,
# losses), and run NAME WORLD_SIZE OVERRIDES... (launch.py with P into /tmp/d/NAME, log /tmp/d/NAME.log, then tps).
. bench/gpu_env.sh
P=$(python3 -c "from qfsdp.bench.matrix import PRESETS; print(' '.join(o for o in PRESETS['llama8b'] if 'max_steps' not in o))")
tps() { python3 -c "
import json; from qfsdp.metrics import steady_tokens_per_second as s
r = [json.loads(l) for l in open('$1/metrics.jsonl')]
print('$2', round(s(r, 3)), 'tok/s', 'peak', r[-1]['peak_memory_gib'], 'losses', [round(x['loss'], 4) for x in r])
print('$2 tokens/s per step', [round(x['tokens_per_second']) for x in r])
if 'micro_steps_ms' in r[-1]:  # step phases (metrics.StepPhases), steps 4+: the last micro-step reduces gradients
    import statistics as st; late = r[3:]
    print('$2 phases ms: micro-step', round(st.median(m for x in late for m in x['micro_steps_ms'][:-1]), 1),
          'last micro-step', round(st.median(x['micro_steps_ms'][-1] for x in late), 1),
          'optimizer', round(st.median(x['optimizer_ms'] for x in late), 1),
          'after', round(st.median(x['after_optimizer_ms'] for x in late), 1),
          'between', round(st.median(x.get('between_steps_ms', 0) for x in late), 1))"; }
run() {  # NAME WORLD_SIZE OVERRIDES...
  local name=$1 ws=$2; shift 2
  python3 launch.py world_size=$ws $P "$@" hydra.run.dir=/tmp/d/$name > /tmp/d/$name.log 2>&1 || tail -30 /tmp/d/$name.log
  tps /tmp/d/$name $name
}

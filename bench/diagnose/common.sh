# Sourced by the diagnosis scripts here, from the repo root on a GPU host: the packages (bench/gpu_env.sh), the
# bench's llama8b preset without its step count (P), and tps RUN_DIR NAME (tokens/s over steps 4+, peak, losses).
. bench/gpu_env.sh
P=$(python3 -c "from qfsdp.bench import PRESETS; print(' '.join(o for o in PRESETS['llama8b'] if 'max_steps' not in o))")
tps() { python3 -c "
import json; from qfsdp.metrics import steady_tokens_per_second as s
r = [json.loads(l) for l in open('$1/metrics.jsonl')]
print('$2', round(s(r, 3)), 'tok/s', 'peak', r[-1]['peak_memory_gib'], 'losses', [round(x['loss'], 4) for x in r])"; }

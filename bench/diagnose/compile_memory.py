"""Activation memory of the Llama-3.1-8B layer shape (random weights, LAYERS layers) on one GPU, eager or compiled,
with activation checkpointing on or off: memory kept from forward to backward, tensors saved outside checkpoints,
and the allocation stacks of what is still live after the third forward (a CUDA memory snapshot).

    torchrun --nproc_per_node 1 bench/diagnose/compile_memory.py COMPILE(0|1) AC(0|1) LAYERS OUT.json
"""
import collections
import json
import sys

import torch
from transformers import AutoModelForCausalLM
from qfsdp.config import compose_config
from qfsdp.distributed import init_distributed, data_parallel_mesh
from qfsdp.model import load_config, defer_4bit, bnb_config, attach_lora, make_trainable_fp32
from qfsdp.shard import parallelize

compile_, ac, layers, outfile = sys.argv[1] == "1", sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
cfg = compose_config(["model=llama3_1_8b", "model.random_init=true"])
d = init_distributed()
conf = load_config(cfg.model)
conf.num_hidden_layers = layers
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16, attn_implementation="sdpa")
model = model.cpu()
model.config.use_cache = False
defer_4bit(model, bnb_config(cfg.quant, torch.bfloat16))
model = attach_lora(model, cfg.lora, 0)
make_trainable_fp32(model)
mesh = data_parallel_mesh("cuda", 1)
parallelize(model, mesh, d.device, param_dtype=torch.bfloat16, activation_checkpointing=ac, compile=compile_,
            reshard_after_forward=True, cpu_offload=False)
model.train()
ids = torch.randint(0, 128000, (2, 2048), device="cuda")
res = {"compile": compile_, "ac": ac, "layers": layers, "steps": []}
for step in range(3):
    if step == 2:
        torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    saved = []
    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    torch.cuda.synchronize()
    after_fwd = torch.cuda.memory_allocated()
    if step == 2:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    loss.backward()
    torch.cuda.synchronize()
    res["steps"].append({"base_gib": base / 2**30, "retained_after_fwd_gib": (after_fwd - base) / 2**30,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "saved_outside_ckpt_gib": sum(saved) / 2**30, "n_saved": len(saved)})
    model.zero_grad(set_to_none=True)
# live blocks after the 3rd forward, grouped by allocation stack
groups = collections.defaultdict(lambda: [0, 0])
for seg in snap["segments"]:
    for b in seg["blocks"]:
        if b["state"] != "active_allocated":
            continue
        skip = ("torch/nn/modules/module.py", "contextlib", "<frozen", "_contextlib")
        frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']}:{f['name']}" for f in b.get("frames", [])
                  if not any(x in f["filename"] for x in skip)]
        key = " | ".join(frames[:10])
        groups[key][0] += b["size"]
        groups[key][1] += 1
top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:12]
res["live_after_fwd"] = [{"gib": v[0] / 2**30, "blocks": v[1], "stack": k} for k, v in top]
print(json.dumps(res["steps"], indent=1))
json.dump(res, open(outfile, "w"), indent=1)

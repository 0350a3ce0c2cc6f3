"""Run under torchrun (1 process): the tiny model with activation checkpointing, eager and then compiled; count
the tensors autograd saves for backward outside every checkpoint during one forward.

Writes JSON to argv[1]: {"eager": [n, bytes], "compiled": [n, bytes], "compiled_graphs": k}. With checkpointing
working, a compiled model saves no more than the eager one (only each layer's inputs and what lies outside the
layers); k > 0 shows the compiled run did compile.
"""

import json
import sys

import torch
from torch._dynamo.utils import counters

from qfsdp.config import FSDP2Config, compose_config
from qfsdp.distributed import data_parallel_mesh, init_distributed, shutdown_and_exit
from qfsdp.model import attach_lora, load_model, make_trainable_fp32, prepare_checkpoint
from qfsdp.shard import parallelize

cfg = compose_config([])
prepare_checkpoint(cfg.model, torch.bfloat16)
d = init_distributed()
mesh = data_parallel_mesh(d.device.type, d.world_size)
ids = torch.randint(0, 500, (2, 128))
result = {}
for name, compile_ in (("eager", False), ("compiled", True)):
    model = attach_lora(load_model(cfg.model, cfg.quant, torch.bfloat16), cfg.lora, cfg.seed)
    make_trainable_fp32(model)
    parallelize(model, mesh, d.device, FSDP2Config(), param_dtype=torch.bfloat16, compile=compile_)
    model.train()
    for _ in range(2):  # the first compiled call compiles; count the second
        saved = []
        # Innermost hooks win: a tensor saved inside a checkpoint goes to the checkpoint's hooks, not these.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    result[name] = [len(saved), sum(saved)]
result["compiled_graphs"] = counters["stats"]["unique_graphs"]
with open(sys.argv[1], "w") as f:
    json.dump(result, f)
shutdown_and_exit(0)

"""Run under torchrun (gloo): a `model.random_init` model drawn on the device (no checkpoint), quantized and sharded;
writes JSON to argv[1].

argv[2]: "digests": a sha256 of every frozen weight as the model computes with it (4-bit bytes gathered, their quant
state, embeddings, norms, head), so 1 and N processes can be compared. "memory": peak resident memory while loading
argv[3] (a model directory holding only config.json), and the peak of the process' own anonymous memory as a run
measures it (hostmem.LoadHostMemory), against the full-precision bytes of its weights.
"""

import hashlib
import resource
import sys

import bitsandbytes as bnb
import torch
from torch.distributed.tensor import DTensor

from qfsdp.config import FSDP2Config, LoraConfig, ModelConfig, QuantConfig
from qfsdp.distributed import data_parallel_mesh, init_distributed
from qfsdp.model import attach_lora, load_model, prepare_checkpoint, random_weights
from qfsdp.nf4 import PACKED_4BIT, packed_bytes
from qfsdp.shard import parallelize, quantized_bytes
from rank_results import write_and_exit  # beside this script

mode = sys.argv[2]
path = sys.argv[3] if len(sys.argv) > 3 else "tiny"
model_cfg = ModelConfig(path=path, random_init=True)
assert prepare_checkpoint(model_cfg, torch.float32) is None  # nothing to build
d = init_distributed()
mesh = data_parallel_mesh(d.device.type, d.world_size)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def quant_state_tensors(qs) -> list[torch.Tensor]:
    """Everything that gives the packed bytes their meaning (double quantization: the nested state too)."""
    tensors = [qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    return tensors


def digest(t: torch.Tensor) -> str:
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


if mode == "digests":
    model = attach_lora(load_model(model_cfg, QuantConfig(), torch.float32, seed=int(sys.argv[4])),
                        LoraConfig(r=4, lora_alpha=8), seed=0)
    pending = len(random_weights(model).pending)
    parallelize(model, mesh, d.device, FSDP2Config(activation_checkpointing=False), param_dtype=torch.float32)
    rank_bytes = quantized_bytes(model)  # this rank's shards
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    for layer in model.base_model.model.model.layers:
        layer.unshard()  # the 4-bit weights as compute sees them
    digests, standard = {}, []
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            digests[name] = digest(packed_bytes(m.weight))
            digests[name + ".quant_state"] = [digest(t) for t in quant_state_tensors(m.quant_state)]
            standard.append(float(torch.std(bnb.functional.dequantize_4bit(
                packed_bytes(m.weight).view(-1, 1), m.quant_state))))
    for module_name, m in model.named_modules():
        for name, p in m.named_parameters(recurse=False):
            # embeddings, norms, head (the 4-bit statistics are in the quant state digests above)
            if not p.requires_grad and not isinstance(m, bnb.nn.Linear4bit) and name != PACKED_4BIT:
                digests[f"{module_name}.{name}"] = digest(p)
    result = {"digests": digests, "loss": float(loss), "pending_before": pending,
              "pending_after": len(random_weights(model).pending), "rank_bytes": rank_bytes,
              "std_4bit": [min(standard), max(standard)]}
else:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    full_precision = sum(p.numel() * p.element_size() for p in meta.parameters())
    del meta
    from qfsdp.hostmem import GIB, LoadHostMemory

    before, anon_before = rss_bytes(), anon_bytes()
    host_memory = LoadHostMemory()
    model = load_model(model_cfg, QuantConfig(), torch.float32, seed=0)
    after_build = rss_bytes()
    parallelize(model, mesh, d.device, FSDP2Config(activation_checkpointing=False), param_dtype=torch.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    host = host_memory.stop()
    result = {"full_precision_bytes": full_precision, "rss_before": before, "rss_after_build": after_build,
              "peak_rss": peak, "peak_growth": peak - before, "rank_bytes": quantized_bytes(model),
              "layers": config.num_hidden_layers, "anon_before": anon_before,
              "peak_anon": host["peak_anon_gib"] * GIB, "host_peak_rss": host["peak_rss_gib"] * GIB}

write_and_exit(sys.argv[1], result)

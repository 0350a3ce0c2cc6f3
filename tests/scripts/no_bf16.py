"""Run under torchrun: one training step (forward, backward, AdamW update) of a composed config, recording every
op that computes in bfloat16. (fp16's loss scaler is left out: accelerate creates it on GPUs only.)

Writes JSON to argv[1]: {"bf16_compute_ops": [...]} from rank 0. argv[2:] are config overrides.
The Kaggle T4 path must have none: T4s have no bfloat16 arithmetic. (bfloat16 *storage* is fine: NF4Weight holds
packed 4-bit bytes as a bfloat16 view, which only ever moves bytes.)
"""

import json
import sys

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qfsdp.config import compose_config
from qfsdp.distributed import init_distributed, shutdown_and_exit
from qfsdp.model import attach_lora, load_model, load_tokenizer, make_trainable_fp32, prepare_checkpoint
from qfsdp.shard import parallelize

aten = torch.ops.aten
# Ops that compute (as opposed to view, copy, pad or communicate bytes).
COMPUTE = {aten.mm, aten.addmm, aten.bmm, aten.matmul, aten.linear, aten.sum, aten.mean, aten._softmax,
           aten._log_softmax, aten.embedding, aten.rsqrt, aten.pow, aten.silu, aten.nll_loss_forward,
           aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
           aten._scaled_dot_product_flash_attention}


class RecordBf16Compute(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        computes = (torch.Tag.pointwise in func.tags or func.overloadpacket in COMPUTE
                    or func.namespace == "bitsandbytes")
        if computes and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tree_flatten(out)[0]):
            self.ops.add(str(func))
        return out


cfg = compose_config(sys.argv[2:])
dtype = getattr(torch, cfg.precision.dtype)
prepare_checkpoint(cfg.model, dtype)
tokenizer = load_tokenizer(cfg.model)
d = init_distributed()
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

model = attach_lora(load_model(cfg.model, cfg.quant, dtype), cfg.lora, cfg.seed)
make_trainable_fp32(model)
mesh = init_device_mesh(d.device.type, (d.world_size,))
parallelize(model, mesh, d.device, OmegaConf.to_object(cfg.fsdp2), param_dtype=dtype)
ids = tokenizer(["<human>: hello there <bot>: hi"] * 2, return_tensors="pt").input_ids.to(d.device)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)  # Trainer's default
mode = RecordBf16Compute()
with mode:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()  # the update too (on the offloaded CPU shards with fsdp2=offload)
if d.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"bf16_compute_ops": sorted(mode.ops), "loss": loss.item()}, f)
shutdown_and_exit(0)

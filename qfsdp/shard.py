"""Parallelize the model, in the order it must happen (as torchtitan does):

1. packed 4-bit weights become `NF4Weight`s, so FSDP2 shards and gathers them with their quant state;
2. activation checkpointing per decoder layer (transformers' own, non-reentrant);
3. `torch.compile` per decoder layer, after checkpointing and before sharding;
4. `fully_shard` per decoder layer, then the root, with the mixed-precision and offload policies.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from qfsdp.model import decoder_layers
from qfsdp.nf4 import NF4Weight, packed_bytes, to_nf4_weight


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None,
    *,
    param_dtype: torch.dtype,
    activation_checkpointing: bool,
    compile: bool,
    reshard_after_forward: bool,
    cpu_offload: bool,
) -> nn.Module:
    """Apply steps 1-4 above in place; `mesh=None` leaves the model unsharded (the single-process reference)."""
    layers = decoder_layers(model)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            to_nf4_weight(module)

    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    if compile:
        for layer in layers:
            layer.compile()

    if mesh is None:
        return model

    mp_policy = MixedPrecisionPolicy(
        # None keeps float32: FSDP2 then does no cast at all (the bit-exact reference path).
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=torch.float32,
    )
    # pin_memory needs a GPU; on CPU the offloaded shards are ordinary memory.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                    offload_policy=offload)
    # The root (embeddings, final norm, head) is needed again right at the start of backward: keep it gathered.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy, offload_policy=offload)
    _check_4bit_shards(model)
    return model


def _check_4bit_shards(model: nn.Module) -> None:
    """Every sharded 4-bit weight must still be an NF4Weight. If an op FSDP2 applied to it is missing from
    nf4._BYTE_PRESERVING_OPS, the shard silently becomes plain bytes: bitsandbytes would then fall back to the
    module's own quant state (and a float16 policy would cast the bytes)."""
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            local = module.weight.to_local() if hasattr(module.weight, "to_local") else module.weight
            if not isinstance(local, NF4Weight):
                raise RuntimeError(f"{name}.weight lost its NF4Weight wrapper during fully_shard "
                                   f"(now {type(local).__name__}); an FSDP2 op is missing from nf4._BYTE_PRESERVING_OPS")


def quantized_bytes(model: nn.Module) -> int:
    """Packed 4-bit weight bytes this rank holds (its shards; the whole model when unsharded)."""
    return sum(packed_bytes(m.weight).numel() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))

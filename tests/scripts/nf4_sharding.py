"""Run under torchrun (gloo): sharded vs unsharded 4-bit model, compared exactly. Writes JSON to argv[1].

argv[2] (optional, default 1): HSDP replica groups; the mesh is then (replicate, world_size / replicate), as
`fsdp2=hsdp` builds it (and the same processes compare as one shard group too, under "one_shard_group"). argv[3]
(optional): "shards" runs `compare_shards` alone, with fsdp2=offload at 1 process so that FSDP2 holds the 4-bit state
there too.
"""

import json
import re
import sys

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from qfsdp.config import FSDP2Config, LoraConfig, ModelConfig, QuantConfig
from qfsdp.distributed import (
    check_trainable_same_on_all_ranks,
    data_parallel_mesh,
    init_distributed,
    shutdown_and_exit,
)
from qfsdp.model import attach_lora, load_model, prepare_checkpoint
from qfsdp.nf4 import PACKED_4BIT, NF4Weight, packed_bytes
from qfsdp.shard import parallelize, quantized_bytes

for name in ("tiny", "tiny_4layers"):
    prepare_checkpoint(ModelConfig(path=name), torch.float32)  # before the process group (see tiny.py)
d = init_distributed()
replicate = int(sys.argv[2]) if len(sys.argv) > 2 else 1
shards_only = len(sys.argv) > 3 and sys.argv[3] == "shards"
UNSHARDED = FSDP2Config(activation_checkpointing=False)  # the reference: no mesh, no checkpointing


def build(storage: str, seed: int = 0, path: str = "tiny", target_modules="all-linear"):
    model = load_model(ModelConfig(path=path), QuantConfig(storage=storage), torch.float32)
    model = attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules), seed=seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so A gets gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0)).to(d.device)


def loss_and_grads(model):
    model.train()
    result = model(input_ids=ids, labels=ids)
    result.loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return result.logits.detach(), grads


def compare_shards(replicate: int, offload: bool = False) -> dict:
    """Per storage dtype: the sharded model on a (replicate, world_size / replicate) mesh against the unsharded
    one: logits, LoRA gradients, the gathered 4-bit state, and what each rank holds."""
    out = {}
    for storage in ("uint8", "bfloat16"):
        ref, sharded = build(storage), build(storage)
        parallelize(ref, None, d.device, UNSHARDED, param_dtype=torch.float32)
        total = quantized_bytes(ref)
        mesh = data_parallel_mesh(d.device.type, d.world_size, replicate)
        parallelize(sharded, mesh, d.device, FSDP2Config(offload=offload), param_dtype=torch.float32)
        packed = [p for n, p in sharded.named_parameters() if n.endswith(PACKED_4BIT)]
        # no rank keeps a whole weight or quant state beside its shards: the layers get views of them when gathered
        no_whole_quant_state = all(m.quant_state is None and m.weight is None
                                   for m in sharded.modules() if isinstance(m, bnb.nn.Linear4bit))
        ref_logits, ref_grads = loss_and_grads(ref)
        logits, grads = loss_and_grads(sharded)

        # the gathered 4-bit bytes of every quantized layer equal the unsharded bytes
        ref_linears = [m for m in ref.modules() if isinstance(m, bnb.nn.Linear4bit)]
        layers = sharded.base_model.model.model.layers
        bytes_equal, qs_kept, stats_equal, stats_gathered = True, True, True, True
        for layer in layers:
            layer.unshard()
        owners = {m: layer for layer in layers for m in layer.modules()}
        for m_ref, m in zip(ref_linears, [m for m in sharded.modules() if isinstance(m, bnb.nn.Linear4bit)]):
            gathered = m.weight  # the gathered weight, as compute sees it (after the forward above)
            bytes_equal &= (gathered.dtype, gathered.shape) == (m_ref.weight.dtype, m_ref.weight.shape)
            bytes_equal &= torch.equal(packed_bytes(gathered), packed_bytes(m_ref.weight))
            # compute used the quant state attached to the gathered weight
            qs, qs_ref = gathered.quant_state, m_ref.weight.quant_state
            qs_kept &= qs is m.quant_state
            # every statistic and code table bit for bit as unsharded (double quantization: the nested ones too)
            pairs = [(qs.absmax, qs_ref.absmax), (qs.code, qs_ref.code), (qs.offset, qs_ref.offset),
                     (qs.state2.absmax, qs_ref.state2.absmax), (qs.state2.code, qs_ref.state2.code)]
            stats_equal &= qs.nested and all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(
                a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) for a, b in pairs)
            stats_equal &= (qs.shape, qs.blocksize, qs.dtype) == (qs_ref.shape, qs_ref.blocksize, qs_ref.dtype)
            # ... read from the gathered parameter itself, not from a copy
            held = getattr(owners[m], PACKED_4BIT).untyped_storage().data_ptr()
            stats_gathered &= all(t.untyped_storage().data_ptr() == held
                                  for t in (gathered, qs.absmax, qs.offset, qs.state2.absmax))
        for layer in layers:
            layer.reshard()
        # Forward prefetch (shard.prefetch_next_unit): FSDP2 names each prefetch in the profiler's record
        # ("FSDP::forward_prefetch for <module>"), issued from the previous layer's forward.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
            sharded(input_ids=ids)
        prefetched = sorted(e.name.rsplit(".", 1)[-1] for e in prof.events() if "FSDP::forward_prefetch" in e.name)
        for unit in [*layers, sharded]:  # what the no-grad forward left gathered (the last layer, the root)
            unit.reshard()
        # A state dict between gathers (as a checkpoint takes one) holds each layer's packed_4bit shard and no
        # 4-bit layer's weight or quant state (their storage is freed); the views are back after it (a recomputing
        # backward reads them without a forward hook), and the next forward computes as before.
        linears = {n: m for n, m in sharded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        views = {n: m.weight for n, m in linears.items()}
        state = sharded.state_dict()
        state_dict_clean = (sum(k.endswith(PACKED_4BIT) for k in state) == len(layers)
                            and not any(k.startswith(f"{n}.weight") for k in state for n in linears)
                            and all(m.weight is views[n] is not None for n, m in linears.items()))
        logits_after_state_dict, _ = loss_and_grads(sharded)
        head = sharded.get_output_embeddings().weight  # frozen: its own unit, gathered by whoever reads it
        out[storage] = {
            "head_rows": [head.to_local().shape[0], head.shape[0]] if isinstance(head, DTensor) else None,
            "next_layer_prefetched": prefetched,
            "logits_equal": torch.equal(logits, ref_logits),
            "grads_equal": all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads),
            "n_grads": len(ref_grads),
            "state_dict_between_gathers": state_dict_clean and torch.equal(logits_after_state_dict, ref_logits),
            # norm weights stay whole on every rank, outside FSDP2 (shard._frozen_vectors)
            "layer_vectors_whole": [(n, isinstance(q, DTensor)) for n, q in layers.named_parameters()
                                    if not q.requires_grad and q.dim() <= 1],
            "bytes_equal": bool(bytes_equal),
            "quant_state_kept": bool(qs_kept),
            "statistics_equal": bool(stats_equal),
            "statistics_are_gathered_views": bool(stats_gathered),
            # one parameter per decoder layer holds all its 4-bit state, sharded
            "packed_sharded": len(packed) == len(layers)
            and all(isinstance(p, DTensor) and isinstance(p.to_local(), NF4Weight) for p in packed),
            "no_whole_quant_state_before_forward": no_whole_quant_state,
            "rank_bytes": quantized_bytes(sharded),
            "total_bytes": total,
        }
    return out


out = compare_shards(replicate, offload=shards_only and d.world_size == 1)
if replicate > 1:  # the same processes as one shard group: 1/world_size each
    out["one_shard_group"] = compare_shards(1)


def finish(out):
    results = [None] * d.world_size
    dist.all_gather_object(results, out)
    if d.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    shutdown_and_exit(0)


if shards_only:
    finish(out)


def compare_to_unsharded(**kwargs):
    """Shard a 4-layer model (fsdp2.layers_per_unit and LoRA targets from kwargs) and compare logits, LoRA gradients
    and forward prefetches with the unsharded model's."""
    units = kwargs.pop("layers_per_unit", 1)
    ref, sharded = build("uint8", path="tiny_4layers", **kwargs), build("uint8", path="tiny_4layers", **kwargs)
    parallelize(ref, None, d.device, UNSHARDED, param_dtype=torch.float32)
    parallelize(sharded, data_parallel_mesh(d.device.type, d.world_size, replicate), d.device,
                FSDP2Config(layers_per_unit=units), param_dtype=torch.float32)
    ref_logits, ref_grads = loss_and_grads(ref)
    logits, grads = loss_and_grads(sharded)
    layers = sharded.base_model.model.model.layers
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        sharded(input_ids=ids)
    states = [layer._get_fsdp_state() for layer in layers]
    return {
        "equal": torch.equal(logits, ref_logits) and len(grads) == len(ref_grads) > 0
        and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads),
        "units": len({id(state) for state in states}),
        # a unit's name in the profiler lists its modules ("...layers.2, ...layers.3"): here "2+3"
        "prefetched": sorted("+".join(re.findall(r"layers\.(\d+)", e.name)) for e in prof.events()
                             if "FSDP::forward_prefetch" in e.name),
        "lora_layers": sorted({n.split(".")[0] for n, _ in layers.named_parameters() if "lora_A" in n}),
    }


# Two layers per unit: units {0, 1} and {2, 3}, the first resharded after forward and gathered again in backward.
out["units_of_two"] = compare_to_unsharded(layers_per_unit=2)
# LoRA on layer 0 only (a regex, as PEFT takes it): layers 1-3 hold 4-bit weights and norms alone; their norms stay
# in FSDP2, else the unit would be gathered as 16-bit integers (shard._frozen_vectors).
out["lora_on_layer_0_only"] = compare_to_unsharded(target_modules=r".*layers\.0\.self_attn\.q_proj")


# Where parameters live (see shard.py's docstring). CPU offload: frozen weights in units with CPU offload, trained
# (LoRA) weights in units without it, so the optimizer step runs where the model computes. One process per shard
# group (HSDP with replicate == world_size here; world_size=1 alike): frozen weights stay plain tensors outside
# FSDP2, trained ones are FSDP2's. Both compute exactly what the unsharded model does.
def offload_kinds(model):
    """{parameter name: "cpu" | "device"} from the offload policy of the FSDP2 unit that manages it."""
    kinds = {}
    for m in model.modules():
        state = fully_shard.state(m) if isinstance(m, FSDPModule) else None
        group = state._fsdp_param_group if state is not None else None
        for fp in group.fsdp_params if group is not None else []:
            name = next(n for n, q in model.named_parameters() if q is fp.sharded_param)
            kinds[name] = "cpu" if isinstance(group.offload_policy, CPUOffloadPolicy) else "device"
    return kinds


ref = build("uint8")
parallelize(ref, None, d.device, UNSHARDED, param_dtype=torch.float32)
ref_logits, ref_grads = loss_and_grads(ref)
placement = {}
# Once, in the plain 2-process run (the HSDP run of this script asserts nothing about placement). A 1-process mesh
# takes the same branch as replicate == world_size: one process per shard group.
cases = (("offload", 1, True), ("one_per_shard_group", d.world_size, False)) if replicate == 1 else ()
for case, replicate_, offload in cases:
    model = build("uint8")
    parallelize(model, data_parallel_mesh(d.device.type, d.world_size, replicate_), d.device,
                FSDP2Config(offload=offload), param_dtype=torch.float32)
    logits, grads = loss_and_grads(model)
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    frozen_4bit = {n for n, _ in model.named_parameters() if n.endswith(PACKED_4BIT)}
    kinds = offload_kinds(model)
    placement[case] = {
        "logits_equal": torch.equal(logits, ref_logits),
        "grads_equal": all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads) and len(grads) == len(ref_grads),
        "trained_in_device_units": bool(trained) and all(kinds.get(n) == "device" for n in trained),
        "frozen_4bit_in_cpu_units": bool(frozen_4bit) and all(kinds.get(n) == "cpu" for n in frozen_4bit),
        "frozen_outside_fsdp": all(not isinstance(q, DTensor) for n, q in model.named_parameters()
                                   if not q.requires_grad),
        "trained_sharded": all(isinstance(q, DTensor) for n, q in model.named_parameters() if q.requires_grad),
    }
out["placement"] = placement

# Silent-bug regression (bitsandbytes CPU repacking): an eval no-grad forward, then training, must give the same
# LoRA gradients as training alone.
def eval_then_grads(model):
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    return loss_and_grads(model)[1]


guarded = build("uint8")
parallelize(guarded, None, d.device, UNSHARDED, param_dtype=torch.float32)
before = loss_and_grads(guarded)[1]
after = eval_then_grads(guarded)
out["eval_then_train_equal"] = all(torch.equal(before[n], after[n]) for n in before)
# Without the guard (plain bitsandbytes), on CPUs with AVX512-BF16 the same sequence changes the gradients.
plain = build("uint8").to(d.device)  # bitsandbytes quantizes on the move, as in its own docs
before = loss_and_grads(plain)[1]
after = eval_then_grads(plain)
out["unguarded_eval_then_train_max_rel_err"] = max(
    ((before[n] - after[n]).norm() / before[n].norm().clamp_min(1e-30)).item() for n in before)

# LoRA initialized differently per rank must be caught before training.
try:
    check_trainable_same_on_all_ranks(build("uint8", seed=d.rank))
    out["rank_dependent_init_caught"] = False
except RuntimeError as e:
    out["rank_dependent_init_caught"] = "differs between ranks" in str(e)
check_trainable_same_on_all_ranks(build("uint8", seed=0))  # and the same seed passes
finish(out)

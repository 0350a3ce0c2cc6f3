"""Place and parallelize the model, in the order it must happen (as torchtitan does):

1. activation checkpointing per decoder layer (transformers' own, non-reentrant);
2. per unit of `layers_per_unit` consecutive decoder layers (default 1), one unit at a time: cast its layers'
   frozen weights to the compute dtype, move them to the device (bitsandbytes quantizes weights as they arrive),
   make their packed 4-bit weights `NF4Weight`s (so FSDP2 shards and gathers them byte-exactly; compute receives
   the gathered bytes as plain tensors, given their quant state by `attach_quant_states`), `torch.compile` each
   layer (`compile_layer`), and `fully_shard` the unit, before the next unit comes. With frozen weights sharded (or
   offloaded), each unit's forward then starts the next unit's all-gather (`prefetch_next_unit`);
3. the input embeddings and the frozen head, each as its own FSDP2 unit (see below), then the root (final norm,
   buffers).

Mixed precision is an FSDP2 policy on every unit. Frozen weights stay out of FSDP2 where it would only cost time:
- with one process per shard group (world_size=1) a shard is the whole weight, and FSDP2 would copy every frozen
  weight into a second buffer before each use (for the 8B shape, 3.25 GiB twice per micro-step in thousands of small
  copies). Frozen weights are then left to their modules (`ignored_params`, as bitsandbytes made them); FSDP2
  manages only the trained ones (mixed precision, float32 gradients), exactly as when it shards;
- frozen vectors in decoder layers (norm weights, biases) stay whole on every rank when FSDP2 shards the rest and
  the unit holds LoRA weights too (`_frozen_vectors`: less host work per gather, 0.5 MB per GPU for the 8B shape);
- CPU offload moves the frozen weights to CPU RAM (for the 8B shape, 3.25 GiB of 4-bit bytes); LoRA's A and B
  (modules whose weights are all trained), their gradients and AdamW state stay on the GPU, in one FSDP2 unit for
  each unit of layers (r=16: 4.2e7 weights x 16 bytes = 0.63 GiB, all ranks together). The optimizer step then runs
  on the GPU with the same arithmetic as without offload, not as a CPU Adam between steps. (Equal losses are
  expected; on GPUs that waits on strict `deterministic=true` being run there.) Trained weights that share a module
  with frozen ones (`lora.bias`, full fine-tuning) stay with them in CPU RAM, their optimizer step on the CPU.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from qfsdp.model import base_model, decoder_layers
from qfsdp.nf4 import NF4Weight, attach_quant_states, keep_portable_cpu_kernels, packed_bytes, to_nf4_weight


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None,
    device: torch.device,
    *,
    param_dtype: torch.dtype,
    activation_checkpointing: bool,
    compile: bool,
    reshard_after_forward: bool,
    cpu_offload: bool,
    forward_prefetch: bool = True,
    layers_per_unit: int = 1,
    deterministic: bool = False,
) -> nn.Module:
    """Apply steps 1-3 above in place. `mesh=None` leaves the model whole on `device` (the unsharded reference).

    `layers_per_unit` consecutive decoder layers form one FSDP2 unit (the last unit may hold fewer). Each unit costs
    the host a fixed amount of work per all-gather and per reduce-scatter whatever its size (hooks, collective
    launches, buffer copies), and eager steps wait on the host: on 2 H200s a micro-step of the 8B shape is 40-51 ms
    longer than on one, about 0.7 ms per gather (docs/BENCHMARKS.md). Fewer, larger units cost the host less; each
    unit's gathered weights are held whole, two units at a time with prefetch, so larger units hold more memory (for
    the 8B shape at 2 GPUs, 0.1 GiB of gathered 4-bit weights per layer).
    """
    layers = decoder_layers(model)
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # Accelerate refuses to train a 4-bit model whose recorded placement (`hf_device_map`) differs from the training
    # device; the model was loaded into CPU memory and lives on `device` from here on.
    base = base_model(model)
    base.hf_device_map = {"": device.index if device.type == "cuda" else device.type}

    if mesh is None:
        # Unsharded: bitsandbytes' own Params4bit as they are (an NF4Weight would only add Python dispatch).
        cast_frozen(model, param_dtype)
        model.to(device)
        for m in _linears_4bit(model):
            keep_portable_cpu_kernels(m)
        for layer in layers if compile else []:
            compile_layer(layer, activation_checkpointing, deterministic)
        return model

    mp_policy = MixedPrecisionPolicy(
        # None keeps float32: FSDP2 then does no cast at all (the bit-exact reference path).
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=torch.float32,
    )
    shard = dict(mesh=mesh, mp_policy=mp_policy)
    # pin_memory needs a GPU; on CPU the offloaded shards are ordinary memory.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    sharding = mesh.size(mesh.ndim - 1) > 1  # more than one process per shard group
    manage_frozen = cpu_offload or sharding  # see the module docstring
    units = [layers[i:i + layers_per_unit] for i in range(0, len(layers), layers_per_unit)]
    for u, unit in enumerate(units):
        for layer in unit:
            # This rank's GPU holds its shards so far plus one unit in full precision, never the whole model.
            cast_frozen(layer, param_dtype)
            layer.to(device)
            _prepare_4bit(layer, manage_frozen)
            if compile:
                compile_layer(layer, activation_checkpointing, deterministic)
        # The last unit's weights would be gathered again right away for backward: keep them (as torchtitan does).
        # A unit that leaves the layers' frozen weights alone holds only their LoRA weights (~0.6% of an 8B layer):
        # keep them all (full fine-tuning, with nothing frozen, still reshards).
        frozen = [p for layer in unit for p in _frozen(layer)]
        lora_only = not manage_frozen and bool(frozen)
        reshard = reshard_after_forward and not lora_only and u < len(units) - 1
        trained = [m for layer in unit for m in _trained_modules(layer)]
        # Frozen vectors stay whole where the unit keeps trained weights beside its 4-bit ones (see _frozen_vectors).
        vectors = _frozen_vectors(frozen) if trained and not cpu_offload else set()
        if cpu_offload and trained and frozen:
            # One unit for the LoRA modules (`fully_shard([...])`: one gather and one reduce for all). A unit
            # per LoRA module (448 units, each gathered and reduced on its own) ran at 4,637 tokens/s against 10,111
            # on 2 H200s and came no closer to the losses without offload (docs/bench-h200x4-run4/call-p3-results.md).
            # With compile=true the LoRA units' FSDP2 hooks (kept out of torch.compile) split each compiled part.
            fully_shard(trained, reshard_after_forward=reshard, offload_policy=OffloadPolicy(), **shard)
        # Several layers in one unit (`fully_shard([...])`): one all-gather and one reduce-scatter for all of them
        # (see layers_per_unit above).
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=reshard, offload_policy=offload,
                    ignored_params=vectors if manage_frozen else set(frozen), **shard)
        if manage_frozen:
            for layer in unit:
                attach_quant_states(layer, _linears_4bit(layer))
    if manage_frozen and forward_prefetch:
        prefetch_next_unit([unit[0] for unit in units])
    # The input embeddings and the head are the largest full-precision weights (1 GiB each in bf16 for Llama 3.1
    # 8B). As its own unit, the embedding is gathered only during its forward. So is a frozen head, by a different
    # road: TRL's fused LM head reads `lm_head.weight` directly, not through `lm_head.forward` (FSDP2's hooks), and
    # gathers a sharded (DTensor) weight itself with `full_tensor()`, keeping the full copy only until its own
    # backward, right after the loss. The head's shard therefore stays on the device, even with CPU offload (TRL
    # computes where the weight is). Outside the loss each GPU then holds only its share of the head (at 2 GPUs 0.49
    # of 0.98 GiB for the 8B shape), through the backward of the decoder layers too. In the root the head would stay
    # gathered from the start of forward to the end of backward. With one process per shard group there is nothing
    # to shard: the head stays a plain weight (FSDP2's `ignored_params`). Tied to the embedding, both are one weight
    # and stay in the root.
    in_layers = {m for layer in layers for m in layer.modules()}
    embed, head = _embeddings(model)
    if embed is not None:
        cast_frozen(embed, param_dtype)
        embed.to(device)
        if manage_frozen or not _frozen(embed):
            fully_shard(embed, reshard_after_forward=True, offload_policy=offload, **shard)
    ignored = set()
    if head is not None and not head.weight.requires_grad:
        cast_frozen(head, param_dtype)
        head.to(device)
        if sharding:
            # No reduce dtype (the head has no gradient to reduce): FSDP2's end-of-backward callback runs every
            # unit's post-backward, and with a reduce dtype set it reads the gathered parameter of a unit that was
            # never gathered through its hooks, which does not exist (AttributeError; torch 2.11 and 2.13 alike).
            fully_shard(head, mesh=mesh, offload_policy=OffloadPolicy(), reshard_after_forward=True,
                        mp_policy=MixedPrecisionPolicy(param_dtype=mp_policy.param_dtype))
        else:
            ignored = {head.weight}
    # 4-bit layers outside the decoder layers, if the architecture has any; then the root, and fully_shard moves
    # what is left (final norm, rotary buffers) to the device.
    outside = [m for m in _linears_4bit(model) if m not in in_layers]
    for m in outside:
        cast_frozen(m, param_dtype)
        _prepare_4bit(m.to(device), manage_frozen)
    cast_frozen(model, param_dtype)  # what is left: final norm
    if not manage_frozen:  # the root's frozen weights (final norm) stay plain too, moved here by hand
        for m in model.modules():
            for p in _frozen(m, recurse=False) if m not in in_layers else []:
                p.data = p.data.to(device)
                ignored.add(p)
    fully_shard(model, reshard_after_forward=False, offload_policy=offload, ignored_params=ignored, **shard)
    if outside and manage_frozen:
        attach_quant_states(model, outside)
    if manage_frozen:
        _check_4bit_shards(model)
    return model


def prefetch_next_unit(units: list[nn.Module]) -> None:
    """Each decoder layer unit's forward starts the next unit's all-gather (FSDP2's explicit forward prefetch);
    `units` holds one layer of each unit (the unit's FSDP2 state is shared by its layers).

    Without it FSDP2 issues a unit's all-gather in the unit's own forward pre-hook, and it overlaps compute only
    if the host runs ahead of the GPU. Eager steps of the 8B shape are launch-bound (the GPU idle about 30% of a step
    on an H200, docs/BENCHMARKS.md), so the host may reach a unit about when the GPU does. Backward needs no such
    call: FSDP2 prefetches the next unit there by default. Cost: two units' gathered weights at a time in forward,
    as when the host runs ahead. Measured on 2 × H200 (eighth session): no visible change in throughput (1.892x one
    GPU with it, 1.884x without, on two machines) or in peak memory.
    """
    for unit, following in zip(units, units[1:]):
        unit.set_modules_to_forward_prefetch([following])


def compile_layer(layer: nn.Module, checkpointed: bool, deterministic: bool = False) -> None:
    """torch.compile a decoder layer: the whole layer, or with activation checkpointing its parts.

    transformers checkpoints a layer's activations inside its `forward`; compiling the whole layer traces that
    checkpoint into the graph, where bitsandbytes' 4-bit matmul (an autograd.Function) keeps its outputs for backward
    outside the checkpoint: on an H200 the 8B shape kept ~300 MB per layer (15.5 vs 5.8 GiB per GPU at 2 GPUs).
    Compiled parts (attention, MLP, norms) run inside the eager checkpoint, which frees everything they save.
    FSDP2's hooks stay on the layer either way.

    `deterministic`: only the parts that hold linear layers (attention, MLP) are compiled, always as parts; parts
    without (the norms of Llama- and Qwen2-style layers) stay eager. Inductor sums a norm's row in another order than
    eager's reduction kernel on GPUs, which moves some bf16 roundings of every normalized activation. With the norms
    compiled (fifth session, 2 H200s, 8B shape) step 1's loss was 6.6e-5 off eager's and losses 1.08e-3 apart by
    step 7; with them eager (and worker.py's Inductor switches), step 1's loss is bit-identical and losses stay
    within 6.1e-4 over 20 steps (docs/BENCHMARKS.md, sixth session). The norms are a small part of a layer's work;
    eager there keeps compile=true comparable with eager runs, which is what deterministic=true is for.
    """
    if not checkpointed and not deterministic:
        layer.compile()
        return
    for child in layer.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward of their own
            compile_layer(child, checkpointed, deterministic)
        elif deterministic and not any(isinstance(m, nn.Linear) for m in child.modules()):
            continue  # a norm (see above)
        elif any(True for _ in child.parameters()):  # parameter-free parts (dropout, activations) gain nothing
            child.compile()


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast `module`'s frozen floating-point weights to the compute dtype, in place, just before they move to the
    device (see model.load_model: the checkpoint stays memory-mapped until then). Skips trained weights (float32
    masters), packed 4-bit bytes and what is already sharded."""
    for p in module.parameters():
        packed = getattr(p, "bnb_quantized", False) or isinstance(p.data, NF4Weight)
        if p.requires_grad or packed or isinstance(p, DTensor) or not p.is_floating_point() or p.dtype == dtype:
            continue
        p.data = p.data.to(dtype)


def _frozen(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=recurse) if not p.requires_grad]


def _frozen_vectors(frozen: list[nn.Parameter]) -> set[nn.Parameter]:
    """Frozen vectors (norm weights, biases of frozen linears) to leave whole on every rank, outside FSDP2, where
    FSDP2 shards a unit's other frozen weights (see the module docstring).

    FSDP2's host work per gather grows with the number of parameters in the unit, whatever their size (swapping each
    into its module and out, allocating and freeing its gathered storage): about 50 Python calls per parameter per
    gather. A Llama layer's two norm weights are 2 of its 23 parameters at 2+ GPUs and 16 KB of 0.1 GiB for the 8B
    shape (4096 x 2 x 2 bytes): replicated, they cost 0.5 MB per GPU for all 32 layers, and at 2 processes a
    32-layer micro-step makes 6,276 fewer Python calls (bench/diagnose/host_overhead.py, docs/BENCHMARKS.md).

    Only for units that keep trained (LoRA) weights beside their 4-bit ones: not with CPU offload (LoRA weights are
    a unit of their own there), nor for layers that LoRA's `target_modules` leaves out. The packed 4-bit weights are
    gathered as 16-bit integers (nf4.NF4Weight.fsdp_pre_all_gather), for which NCCL has no type and gloo fails
    ("Invalid scalar type"); FSDP2 gathers a unit of mixed dtypes as one byte buffer instead, so a unit must not be
    left with 4-bit weights alone.
    """
    return {p for p in frozen if p.dim() <= 1}


def _trained_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules whose own parameters are all trained (LoRA's A and B), in module order."""
    found = []
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own and all(p.requires_grad for p in own):
            found.append(m)
    return found


def _linears_4bit(module: nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _prepare_4bit(module: nn.Module, sharded: bool) -> None:
    """Sharded by FSDP2: make the 4-bit weights NF4Weights; left alone: keep bitsandbytes' portable CPU kernels."""
    for m in _linears_4bit(module):
        if sharded:
            to_nf4_weight(m)  # keeps the portable kernels too
        else:
            keep_portable_cpu_kernels(m)


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embedding, head) to treat apart from the root; (None, None) when they share one weight."""
    base = base_model(model)
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if outputs is None or inputs.weight is outputs.weight:
        return None, None
    return inputs, outputs


def _check_4bit_shards(model: nn.Module) -> None:
    """Every sharded 4-bit weight must still be an NF4Weight. If an op FSDP2 applied to it is missing from
    nf4._BYTE_PRESERVING_OPS, the shard silently becomes plain data: FSDP2 would then gather it through its default
    path, where a mixed-precision policy casts it (float storage numerically converted: garbage weights)."""
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            local = module.weight.to_local() if hasattr(module.weight, "to_local") else module.weight
            if not isinstance(local, NF4Weight):
                raise RuntimeError(f"{name}.weight lost its NF4Weight wrapper during fully_shard "
                                   f"(now {type(local).__name__}); an FSDP2 op is missing from "
                                   "nf4._BYTE_PRESERVING_OPS")


def quantized_bytes(model: nn.Module) -> int:
    """Packed 4-bit weight bytes this rank holds (its shards; the whole model when unsharded)."""
    return sum(packed_bytes(m.weight).numel() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))

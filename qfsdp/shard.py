"""Place and parallelize the model, in the order it must happen (as torchtitan does; docs/design.md explains why):

1. activation checkpointing per decoder layer;
2. one unit of `layers_per_unit` decoder layers at a time: draw its random weights on the device if the model has
   no checkpoint (`model.random_model`), cast its frozen weights, move them to the device (bitsandbytes quantizes
   as they arrive), move each layer's 4-bit weights and their quantization statistics into one `NF4Weight`, compile,
   `fully_shard` the unit;
   so no device ever holds more than its shards plus one unit in full precision;
3. the input embedding and the frozen head as units of their own, stray 4-bit layers, then the root.

Without a mesh (fsdp2=off) the model moves whole to the device: the unsharded reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import bitsandbytes as bnb
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.modeling_layers import GradientCheckpointingLayer

from qfsdp.config import FSDP2Config
from qfsdp.model import base_model, decoder_layers, random_weights
from qfsdp.nf4 import (PACKED_4BIT, NF4Weight, attach_4bit_views, held_bytes, keep_portable_cpu_kernels,
                        to_nf4_weights)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """What every step of `parallelize` shares."""

    device: torch.device
    param_dtype: torch.dtype  # compute dtype of frozen weights
    mesh: DeviceMesh
    mp_policy: MixedPrecisionPolicy
    frozen_offload: OffloadPolicy  # CPUOffloadPolicy with fsdp2.offload, else none
    sharding: bool  # more than one process per shard group
    manage_frozen: bool  # FSDP2 holds frozen weights (sharded or offloaded); else they stay plain, outside it
    draw: Callable[[nn.Module], None]  # draws a module's random weights on the device (no-op with a checkpoint)

    @property
    def fsdp_kwargs(self) -> dict:
        """The keywords every fully_shard call shares."""
        return dict(mesh=self.mesh, mp_policy=self.mp_policy)


def parallelize(model: nn.Module, mesh: DeviceMesh | None, device: torch.device, fsdp2: FSDP2Config, *,
                param_dtype: torch.dtype, compile: bool = False, deterministic: bool = False,
                fused_norms: bool = False) -> nn.Module:
    """Apply steps 1-3 above in place; `mesh=None` leaves the model whole on `device`. `fused_norms`: the norms run
    fused kernels already (kernels=liger), so compile leaves them eager (compile_layer)."""
    layers = decoder_layers(model)
    if fsdp2.activation_checkpointing:
        enable_checkpointing(model, layers, fsdp2.checkpointed_layers)
    _record_training_device(model, device)
    draw = _drawing(model, device)
    if mesh is None:
        _place_unsharded(model, layers, device, param_dtype, compile, fsdp2.activation_checkpointing, deterministic,
                         draw, fused_norms)
        _check_all_drawn(model)
        return model

    place = _placement(mesh, device, param_dtype, fsdp2.offload, draw)
    units = shard_decoder_layers(layers, place, fsdp2, compile, deterministic, fused_norms)
    if place.manage_frozen and fsdp2.forward_prefetch:
        prefetch_next_unit([unit[0] for unit in units])
        logger.info("forward prefetch: each unit's forward starts the next unit's all-gather")
    embedding, head = _embeddings(model)
    shard_embedding(embedding, place)
    ignored = shard_frozen_head(head, place)
    in_layers = {m for layer in layers for m in layer.modules()}
    stray = prepare_stray_4bit(model, in_layers, place)
    shard_root(model, in_layers, place, ignored)
    for m in stray if place.manage_frozen else []:
        attach_4bit_views(model, m)
    if place.manage_frozen:
        _check_4bit_shards(model)
    _check_all_drawn(model)
    return model


def enable_checkpointing(model: nn.Module, layers: list[nn.Module], count: int | str | None) -> None:
    """Activation checkpointing through transformers' own switch, on the first `count` decoder layers (None, "all",
    or "auto" left unresolved: all; the worker resolves "auto", qfsdp/activations.py). The last layers keep their
    activations: backward reaches them first and frees them before any recompute."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    count = len(layers) if count in (None, "all", "auto") else count
    if not 0 <= count <= len(layers):
        raise ValueError(f"fsdp2.checkpointed_layers={count} but the model has {len(layers)} decoder layers")
    if count < len(layers) and not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        raise ValueError(f"fsdp2.checkpointed_layers={count}: {type(layers[0]).__name__} has no per-layer "
                         f"checkpointing switch (transformers' GradientCheckpointingLayer); use all")
    for layer in layers[count:]:
        layer.gradient_checkpointing = False
    kept = len(layers) - count
    logger.info("activation checkpointing on %d decoder layers%s", count,
                f"; the last {kept} keep their activations" if kept else "")


def is_checkpointed(layer: nn.Module, enabled: bool) -> bool:
    """Whether this decoder layer's activations are recomputed in backward: its own flag, or for layers without one
    (checkpointed by the model around each layer) whether checkpointing is `enabled` at all."""
    return layer.gradient_checkpointing if isinstance(layer, GradientCheckpointingLayer) else enabled


def _drawing(model: nn.Module, device: torch.device) -> Callable[[nn.Module], None]:
    weights = random_weights(model)
    return (lambda module: weights(module, device)) if weights is not None else (lambda module: None)


def _check_all_drawn(model: nn.Module) -> None:
    # A weight left a stand-in would compute with zeros, silently.
    if (weights := random_weights(model)) is not None:
        weights.check_done()


def _placement(mesh: DeviceMesh, device: torch.device, param_dtype: torch.dtype, offload: bool,
               draw: Callable[[nn.Module], None]) -> Placement:
    # param_dtype None keeps float32 as it is: FSDP2 does no cast at all (the bit-exact reference path).
    mp_policy = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                                     reduce_dtype=torch.float32)
    # pin_memory needs a GPU; on CPU the offloaded shards are ordinary memory.
    frozen_offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    sharding = mesh.size(mesh.ndim - 1) > 1
    # With one process per shard group a shard is the whole weight: FSDP2 would only copy frozen weights.
    return Placement(device, param_dtype, mesh, mp_policy, frozen_offload, sharding, manage_frozen=offload or sharding,
                     draw=draw)


def _record_training_device(model: nn.Module, device: torch.device) -> None:
    # Accelerate refuses to train a 4-bit model whose recorded placement differs from the training device.
    base_model(model).hf_device_map = {"": device.index if device.type == "cuda" else device.type}


def _place_unsharded(model: nn.Module, layers: list[nn.Module], device: torch.device, param_dtype: torch.dtype,
                     compile: bool, checkpointing: bool, deterministic: bool,
                     draw: Callable[[nn.Module], None], fused_norms: bool = False) -> nn.Module:
    # bitsandbytes' own Params4bit as they are: an NF4Weight would only add Python dispatch.
    for layer in layers:  # random weights: one layer in full precision at a time
        draw(layer)
        cast_frozen(layer, param_dtype)
        layer.to(device)
    draw(model)
    cast_frozen(model, param_dtype)
    model.to(device)
    for m in _linears_4bit(model):
        keep_portable_cpu_kernels(m)
    for layer in layers if compile else []:
        compile_layer(layer, is_checkpointed(layer, checkpointing), deterministic, fused_norms)
    logger.info("unsharded on %s%s", device, ", decoder layers compiled" if compile else "")
    return model


def shard_decoder_layers(layers: list[nn.Module], place: Placement, fsdp2: FSDP2Config, compile: bool,
                         deterministic: bool, fused_norms: bool = False) -> list[list[nn.Module]]:
    """One FSDP2 unit per `layers_per_unit` consecutive layers (the last may hold fewer); returns the units."""
    units = [layers[i:i + fsdp2.layers_per_unit] for i in range(0, len(layers), fsdp2.layers_per_unit)]
    for index, unit in enumerate(units):
        for layer in unit:
            place.draw(layer)
            cast_frozen(layer, place.param_dtype)
            layer.to(place.device)
            _prepare_4bit(layer, place.manage_frozen)
            if compile:
                compile_layer(layer, is_checkpointed(layer, fsdp2.activation_checkpointing), deterministic, fused_norms)
        frozen = [p for layer in unit for p in _frozen(layer)]
        trained = [m for layer in unit for m in _trained_modules(layer)]
        # The last unit is gathered again at once for backward: keep it. So is a unit holding only LoRA weights
        # (frozen weights left plain): they are tiny.
        lora_only = not place.manage_frozen and bool(frozen)
        reshard = fsdp2.reshard_after_forward and not lora_only and index < len(units) - 1
        if fsdp2.offload and trained and frozen:
            # LoRA A/B stay on the device, one unit for all of this unit's: the optimizer step runs there.
            fully_shard(trained, reshard_after_forward=reshard, offload_policy=OffloadPolicy(), **place.fsdp_kwargs)
        vectors = _frozen_vectors(frozen) if trained and not fsdp2.offload else set()
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=reshard,
                    offload_policy=place.frozen_offload,
                    ignored_params=vectors if place.manage_frozen else set(frozen), **place.fsdp_kwargs)
        if place.manage_frozen:
            for layer in unit:
                if hasattr(layer, PACKED_4BIT):
                    attach_4bit_views(layer, layer)
    logger.info("fully_shard: %d decoder layers in %d units%s%s%s", len(layers), len(units),
                ", frozen weights offloaded to CPU" if fsdp2.offload else "",
                "" if place.manage_frozen else ", frozen weights outside FSDP2 (one process per shard group)",
                ", each layer compiled (compile=false runs eager)" if compile else "")
    return units


def shard_embedding(embedding: nn.Module | None, place: Placement) -> None:
    """The input embedding as its own unit: gathered only during its forward."""
    if embedding is None:
        return
    place.draw(embedding)
    cast_frozen(embedding, place.param_dtype)
    embedding.to(place.device)
    if place.manage_frozen or not _frozen(embedding):
        fully_shard(embedding, reshard_after_forward=True, offload_policy=place.frozen_offload, **place.fsdp_kwargs)
        logger.info("fully_shard: input embedding")


def shard_frozen_head(head: nn.Module | None, place: Placement) -> set[nn.Parameter]:
    """A frozen head as its own unit, sharded on the device (TRL's fused loss gathers it itself); returns the
    weights to leave out of the root (the head, when there is nothing to shard). A trained head stays in the root."""
    if head is None:
        return set()
    place.draw(head)
    if head.weight.requires_grad:
        return set()
    cast_frozen(head, place.param_dtype)
    head.to(place.device)
    if not place.sharding:
        return {head.weight}
    # No reduce dtype: the head has no gradient, and with one FSDP2's end-of-backward callback would read a
    # gathered parameter that never existed (AttributeError on torch 2.11 and 2.13).
    fully_shard(head, mesh=place.mesh, mp_policy=MixedPrecisionPolicy(param_dtype=place.mp_policy.param_dtype),
                offload_policy=OffloadPolicy(), reshard_after_forward=True)
    logger.info("fully_shard: frozen LM head")
    return set()


def prepare_stray_4bit(model: nn.Module, in_layers: set[nn.Module], place: Placement) -> list[bnb.nn.Linear4bit]:
    """4-bit layers outside the decoder layers, if the architecture has any: they go to the root unit."""
    stray = [m for m in _linears_4bit(model) if m not in in_layers]
    for m in stray:
        place.draw(m)
        cast_frozen(m, place.param_dtype)
        _prepare_4bit(m.to(place.device), place.manage_frozen)  # its 4-bit state a parameter of its own
    return stray


def shard_root(model: nn.Module, in_layers: set[nn.Module], place: Placement, ignored: set[nn.Parameter]) -> None:
    """The root unit holds what is left (final norm, rotary buffers); fully_shard moves it to the device."""
    place.draw(model)
    cast_frozen(model, place.param_dtype)
    ignored = set(ignored)
    if not place.manage_frozen:  # the root's frozen weights stay plain too, moved by hand
        for m in model.modules():
            for p in _frozen(m, recurse=False) if m not in in_layers else []:
                p.data = p.data.to(place.device)
                ignored.add(p)
    fully_shard(model, reshard_after_forward=False, offload_policy=place.frozen_offload, ignored_params=ignored,
                **place.fsdp_kwargs)
    logger.info("fully_shard: root")


def prefetch_next_unit(units: list[nn.Module]) -> None:
    """Each unit's forward starts the next unit's all-gather, so it overlaps compute even when the host is barely
    ahead of the device; `units` holds one layer of each unit (they share its FSDP2 state)."""
    for unit, following in zip(units, units[1:]):
        unit.set_modules_to_forward_prefetch([following])


def compile_layer(layer: nn.Module, checkpointed: bool, deterministic: bool = False, fused_norms: bool = False) -> None:
    """torch.compile a decoder layer, or with activation checkpointing its parts (attention, MLP, norms) inside the
    eager checkpoint: a compiled whole layer traces the checkpoint and keeps bitsandbytes' matmul outputs alive.
    `deterministic`: only parts holding linear layers are compiled, so norms keep eager's summation order.
    `fused_norms`: the norms are one fused kernel each already; tracing Liger's kernels has failed under
    torch.compile before (Liger-Kernel issue 174), so they stay eager too."""
    eager_norms = deterministic or fused_norms
    if not checkpointed and not eager_norms:
        layer.compile()
        return
    for child in layer.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward of their own
            compile_layer(child, checkpointed, deterministic, fused_norms)
        elif eager_norms and not any(isinstance(m, nn.Linear) for m in child.modules()):
            continue  # a norm
        elif any(True for _ in child.parameters()):  # parameter-free parts (dropout, activations) gain nothing
            child.compile()


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen floating-point weights to the compute dtype in place, just before they move to the device (the
    checkpoint stays memory-mapped until then). Skips trained weights, packed 4-bit bytes and DTensors."""
    for p in module.parameters():
        packed = getattr(p, "bnb_quantized", False) or isinstance(p.data, NF4Weight)
        if p.requires_grad or packed or isinstance(p, DTensor) or not p.is_floating_point() or p.dtype == dtype:
            continue
        p.data = p.data.to(dtype)


def _frozen(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=recurse) if not p.requires_grad]


def _frozen_vectors(frozen: list[nn.Parameter]) -> set[nn.Parameter]:
    """Frozen vectors (norm weights, biases) to keep whole on every rank, outside FSDP2: its host work per gather
    grows with the number of parameters, whatever their size. Only for units that keep LoRA weights too: a unit of
    4-bit weights alone is gathered as 16-bit integers, which NCCL and gloo lack."""
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
    """Sharded by FSDP2: move the 4-bit weights and their statistics into one NF4Weight parameter of `module`; left
    alone: keep bitsandbytes' portable CPU kernels."""
    if sharded:
        to_nf4_weights(module, _linears_4bit(module))  # keeps the portable kernels too
        return
    for m in _linears_4bit(module):
        keep_portable_cpu_kernels(m)


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embedding, head) to treat apart from the root; (None, None) when they share one weight."""
    base = base_model(model)
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if outputs is None or inputs.weight is outputs.weight:
        return None, None
    return inputs, outputs


def _check_4bit_shards(model: nn.Module) -> None:
    """Every sharded `packed_4bit` parameter must still be an NF4Weight: an FSDP2 op missing from
    nf4._BYTE_PRESERVING_OPS would silently make it plain data, which a mixed-precision cast then turns into garbage
    weights."""
    for name, module in model.named_modules():
        if (p := module._parameters.get(PACKED_4BIT)) is None:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        if not isinstance(local, NF4Weight):
            raise RuntimeError(f"{name}.{PACKED_4BIT} lost its NF4Weight wrapper during fully_shard "
                               f"(now {type(local).__name__}); an FSDP2 op is missing from nf4._BYTE_PRESERVING_OPS")


def quantized_bytes(model: nn.Module) -> int:
    """4-bit weight bytes this rank holds, packed bytes and their quantization statistics (its shards; the whole
    model when unsharded): summary.json's `quantized_bytes_per_rank` (nf4.held_bytes)."""
    return sum(held_bytes(m) for m in model.modules())

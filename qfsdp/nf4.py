"""Packed 4-bit bitsandbytes weights that FSDP2 can shard and gather exactly.

`fully_shard` turns a bitsandbytes `Params4bit` into a plain DTensor: the packed bytes are sharded, but the
`quant_state` (absmax, code table, original shape) is dropped from the parameter, and bitsandbytes only keeps
working because `Linear4bit.forward` re-attaches the module's copy. `NF4Weight` is a small tensor subclass that
holds the packed bytes *and* their quant state, and implements FSDP2's all-gather extension points:

- `fsdp_pre_all_gather` hands FSDP2 this rank's slice of the packed bytes as integers of the storage's width
  (byte-exact whatever the storage dtype: FSDP2 never casts the packed data, and NaN bit patterns in float storage
  cannot be touched);
- `fsdp_post_all_gather` hands the gathered bytes to compute as a plain tensor, which `attach_quant_states`
  gives the same quant state: the weight used for compute is bit-identical to the unsharded one, and bitsandbytes'
  kernels run on it without this subclass's Python dispatch.

Every other op on an `NF4Weight` runs on the packed bytes. Ops that only move, view or copy bytes (the ones FSDP2
uses to chunk, pad and offload a parameter) return an `NF4Weight` again; anything else receives the plain bytes
and returns plain tensors (compute never sees an `NF4Weight`: it gets the gathered plain tensor, and `fsdp2=off`
keeps bitsandbytes' own `Params4bit`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# Ops that keep the bytes' meaning: their result is still (part of) the packed weight.
_BYTE_PRESERVING_OPS = {
    aten.detach.default,
    aten.alias.default,
    aten.clone.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.as_strided.default,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.narrow.default,
    aten.t.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.empty_like.default,
    aten.zeros_like.default,
    aten._to_copy.default,
    aten._pin_memory.default,  # FSDP2's CPU offload pins each shard
    aten.copy_.default,
    aten.cat.default,
    aten.constant_pad_nd.default,
}


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


class NF4Weight(torch.Tensor):
    """Packed 4-bit weight bytes plus the bitsandbytes `QuantState` that gives them meaning."""

    packed: torch.Tensor
    quant_state: QuantState

    @staticmethod
    def __new__(cls, packed: torch.Tensor, quant_state: QuantState):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            packed.shape,
            strides=packed.stride(),
            storage_offset=packed.storage_offset(),
            dtype=packed.dtype,
            device=packed.device,
            requires_grad=False,
        )

    def __init__(self, packed: torch.Tensor, quant_state: QuantState):
        self.packed = packed
        self.quant_state = quant_state

    def __repr__(self) -> str:
        return f"NF4Weight(shape={tuple(self.quant_state.shape)}, packed={tuple(self.packed.shape)}, {self.dtype})"

    # torch.compile: the quant state is constant metadata, the packed bytes the only traced tensor.
    def __tensor_flatten__(self):
        return ["packed"], self.quant_state

    @staticmethod
    def __tensor_unflatten__(inner_tensors, quant_state, outer_size, outer_stride):
        return NF4Weight(inner_tensors["packed"], quant_state)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        quant_state = next(a.quant_state for a in _flat(args, kwargs) if isinstance(a, NF4Weight))

        def unwrap(x):
            return x.packed if isinstance(x, NF4Weight) else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is aten.copy_.default:
            return args[0]  # in place into the destination's bytes
        if func not in _BYTE_PRESERVING_OPS:
            return out

        def wrap(x):
            return NF4Weight(x, quant_state) if isinstance(x, torch.Tensor) else x

        return tree_map(wrap, out)

    # -- FSDP2 extension points -------------------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        # With uneven sharding FSDP2 expects every rank's input padded to the first (largest) shard's size.
        padded_rows = math.ceil(outer_size[0] / mesh.size())
        local = self.packed
        if local.size(0) < padded_rows:
            pad = local.new_zeros((padded_rows - local.size(0), *local.shape[1:]))
            local = torch.cat([local, pad])
        # Gathered as integers of the storage's width: bytes move exactly (no float semantics, NaN patterns
        # included), and the shape stays the one FSDP2 checks padded shards against. A unit must also hold
        # parameters of another dtype, which makes FSDP2 gather it as bytes (see shard._frozen_vectors).
        return (local.contiguous().view(_SAME_WIDTH_INT[local.element_size()]),), (self.packed.dtype,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (gathered,) = all_gather_outputs
        (storage_dtype,) = metadata
        if out is not None:
            # FSDP2 re-gathers into the same buffer `out` already views; nothing to rebuild.
            return
        # Compute gets the gathered bytes as a plain tensor: every op on a tensor subclass goes through Python
        # dispatch. `attach_quant_states` gives the gathered parameter its quant state on first use.
        return gathered.view(storage_dtype), (gathered,)


class _SignedMethod:
    """A method whose bound form carries its signature, so `inspect.signature` of it is a lookup: FSDP2 calls it at
    every all-gather of every 4-bit weight, on the host that eager steps wait on (docs/design.md).
    """

    def __init__(self, fn):
        self.fn = fn
        params = list(inspect.signature(fn).parameters.values())[1:]
        self.signature = inspect.Signature(params)

    def __get__(self, obj, objtype=None):
        return self.fn if obj is None else _Bound(self.fn, obj, self.signature)


class _Bound:
    __slots__ = ("fn", "obj", "__signature__")

    def __init__(self, fn, obj, signature):
        self.fn, self.obj, self.__signature__ = fn, obj, signature

    def __call__(self, *args, **kwargs):
        return self.fn(self.obj, *args, **kwargs)


NF4Weight.fsdp_pre_all_gather = _SignedMethod(NF4Weight.fsdp_pre_all_gather)


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def to_nf4_weight(module: bnb.nn.Linear4bit) -> None:
    """Replace a quantized `Linear4bit`'s `Params4bit` by an `NF4Weight` parameter, in place."""
    weight = module.weight
    if isinstance(weight, nn.Parameter) and isinstance(weight.data, NF4Weight):
        return
    if getattr(weight, "quant_state", None) is None:
        raise ValueError(f"{module} holds no quantized weight (no quant_state); quantize before sharding")
    packed = weight.data
    if packed.dtype == torch.uint8 and packed.numel() % 2 == 0:
        # FSDP2 before torch 2.13 creates every sharded parameter with requires_grad=True, which integer tensors
        # refuse. Byte pairs reinterpreted as bfloat16 (a view, not a cast) are a float parameter to FSDP2, and
        # are still gathered as raw bytes (fsdp_pre_all_gather), so no value is ever converted.
        packed = packed.view(-1).view(torch.bfloat16).view(-1, 1)
    module.weight = nn.Parameter(NF4Weight(packed, weight.quant_state), requires_grad=False)
    module.quant_state = weight.quant_state  # the gathered weight gets it from here (see attach_quant_states)
    keep_portable_cpu_kernels(module)


def keep_portable_cpu_kernels(module: bnb.nn.Linear4bit) -> None:
    """Keep bitsandbytes' CPU path on the portable kernels: its AVX512-BF16 path repacks the weight in place during
    the first no-grad eval forward, after which training silently computes wrong LoRA gradients."""
    module.support_avx512bf16_for_cpu = False


def attach_quant_states(unit: nn.Module, linears: list[bnb.nn.Linear4bit]) -> None:
    """Give the gathered weights of `linears` (managed by the FSDP2 unit `unit`) their quant state, in a forward
    pre-hook of `unit` that runs right after FSDP2 gathers them.

    FSDP2 keeps the gathered parameter object for the whole run, so this sets the attribute once. Without it,
    bitsandbytes' `Linear4bit.forward` would replace `module.weight` by a new `Params4bit` on every call (its fallback
    for sharded weights), and a compiled layer would see a different weight on its first call than later (at which
    point 1- and 2-process compiled runs stopped matching). The hook is kept out of torch.compile; on the unit, not
    on each linear, it costs one graph break before the unit's body rather than one per linear.
    """

    @torch.compiler.disable
    def hook(module, args):
        for m in linears:
            if getattr(m.weight, "quant_state", None) is None:
                m.weight.quant_state = m.quant_state

    unit.register_forward_pre_hook(hook)


def packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed 4-bit bytes held by this rank, as a flat uint8 vector (plain, NF4Weight and DTensor weights)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    local = local.packed if isinstance(local, NF4Weight) else local
    return local.detach().contiguous().view(torch.uint8).view(-1)


def dequantize(weight: torch.Tensor, quant_state: Any = None) -> torch.Tensor:
    """Dequantize a full (unsharded) packed weight; used by tests and adapter merging."""
    qs = quant_state or weight.quant_state
    data = weight.packed if isinstance(weight, NF4Weight) else weight
    return bnb.functional.dequantize_4bit(data.view(-1, 1).contiguous(), qs)

"""Packed 4-bit bitsandbytes weights and their quantization statistics, sharded by FSDP2 and gathered exactly.

`fully_shard` turns a bitsandbytes `Params4bit` into a plain DTensor: the packed bytes are sharded, but the
`quant_state` (absmax, code table, original shape) is dropped from the parameter, and bitsandbytes only keeps
working because `Linear4bit.forward` re-attaches the module's copy, whole on every rank. Here the 4-bit state of a
module holding 4-bit layers (a decoder layer) is one parameter FSDP2 shards, `packed_4bit`: the packed bytes of its
4-bit weights, then their statistics (absmax, and with double quantization the nested absmax and offset). Each
rank holds 1/world_size of it; only the code tables and sizes (`_Layout`, a few hundred bytes per weight) stay
whole on every rank, as constant metadata. One parameter per layer rather than one per weight: FSDP2's host work
per gather grows with the number of parameters it gathers (docs/design.md).

It is an `NF4Weight`, a small tensor subclass implementing FSDP2's all-gather extension points:

- `fsdp_pre_all_gather` hands FSDP2 this rank's slice of the bytes as integers of the storage's width (byte-exact
  whatever the storage dtype: FSDP2 never casts them, and NaN bit patterns in float storage cannot be touched);
- `fsdp_post_all_gather` hands the gathered bytes to compute as a plain tensor; `attach_4bit_views` gives each
  4-bit layer, once, a weight that is a view of its bytes in the gathered tensor, of the dtype and shape bitsandbytes
  gave it, with a quant state whose statistics are views too. FSDP2 gathers into the same storage for the whole run,
  so compute always sees exactly the unsharded weight's bytes and statistics, and bitsandbytes' kernels run on them
  without this subclass's Python dispatch.

Every other op on an `NF4Weight` runs on the bytes. Ops that only move, view or copy bytes (the ones FSDP2 uses to
chunk, pad and offload a parameter) return an `NF4Weight` again; anything else receives the plain bytes and returns
plain tensors (compute never sees an `NF4Weight`: it gets views of the gathered plain tensor, and `fsdp2=off` keeps
bitsandbytes' own `Params4bit`).
"""

from __future__ import annotations

import inspect
import math

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn
from torch.utils._pytree import tree_map

aten = torch.ops.aten

PACKED_4BIT = "packed_4bit"  # the parameter holding a module's 4-bit weights and statistics (to_nf4_weights)
ALIGN = 128  # byte alignment of each packed weight in it, for bitsandbytes' vectorized loads

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
_QUANT_STATE_FIELDS = ("absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2")


class NF4Weight(torch.Tensor):
    """Bytes FSDP2 shards and gathers exactly: the packed 4-bit weights and statistics of a module's 4-bit layers;
    `quant_layout` says whose they are and where: ((linear's name under the module, _Layout), ...)."""

    packed: torch.Tensor
    quant_layout: tuple | None

    @staticmethod
    def __new__(cls, packed: torch.Tensor, quant_layout: tuple | None = None):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            packed.shape,
            strides=packed.stride(),
            storage_offset=packed.storage_offset(),
            dtype=packed.dtype,
            device=packed.device,
            requires_grad=False,
        )

    def __init__(self, packed: torch.Tensor, quant_layout: tuple | None = None):
        self.packed = packed
        self.quant_layout = quant_layout

    def __repr__(self) -> str:
        return f"NF4Weight(packed={tuple(self.packed.shape)}, {self.dtype})"

    # torch.compile: the layout is constant metadata, the bytes the only traced tensor.
    def __tensor_flatten__(self):
        return ["packed"], self.quant_layout

    @staticmethod
    def __tensor_unflatten__(inner_tensors, quant_layout, outer_size, outer_stride):
        return NF4Weight(inner_tensors["packed"], quant_layout)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        quant_layout = next(a.quant_layout for a in _flat(args, kwargs) if isinstance(a, NF4Weight))

        def unwrap(x):
            return x.packed if isinstance(x, NF4Weight) else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is aten.copy_.default:
            return args[0]  # in place into the destination's bytes
        if func not in _BYTE_PRESERVING_OPS:
            return out

        def wrap(x):
            return NF4Weight(x, quant_layout) if isinstance(x, torch.Tensor) else x

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
        # dispatch. `attach_4bit_views` gives the 4-bit layers their views of it on first use.
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


# -- the layout of a module's 4-bit state ----------------------------------------------------------------------

def _replace(qs: QuantState, **changes) -> QuantState:
    # A new QuantState rather than copy.copy: QuantState.__getattr__ recurses on a half-built copy.
    return QuantState(**{**{k: getattr(qs, k) for k in _QUANT_STATE_FIELDS}, **changes})


def _statistics(qs: QuantState) -> list[torch.Tensor]:
    """The quant state's tensors that grow with the weight: absmax, and with double quantization the nested absmax
    (a float32 per 256 blocks) and the offset. The code tables are fixed-size constants."""
    return [qs.absmax, qs.state2.absmax, qs.offset] if qs.nested else [qs.absmax]


def _aligned(at: int, to: int) -> int:
    return at + -at % to


class _Layout:
    """Where one 4-bit weight's packed bytes and statistics sit in its module's `packed_4bit` bytes (the weights first,
    each from a multiple of ALIGN; then the statistics, each from a multiple of 4 so that a float32 statistic is a
    view), and the rest of its quant state (code tables, shape, dtype, blocksize), replicated on every rank."""

    def __init__(self, weight: torch.Tensor, qs: QuantState, weight_at: int = 0, statistics_at: int = 0):
        self.segments = [(weight_at, weight.dtype, tuple(weight.shape))]  # (byte offset, dtype, shape) of each
        self.weight_nbytes = _aligned(weight.numel() * weight.element_size(), ALIGN)
        at = statistics_at
        for t in _statistics(qs):
            at = _aligned(at, 4)
            self.segments.append((at, t.dtype, tuple(t.shape)))
            at += t.numel() * t.element_size()
        self.statistics_nbytes = _aligned(at, 4) - statistics_at
        state2 = _replace(qs.state2, absmax=None) if qs.nested else None
        self.template = _replace(qs, absmax=None, offset=None, state2=state2)

    @property
    def nbytes(self) -> int:
        return self.weight_nbytes + self.statistics_nbytes

    def write(self, weight: torch.Tensor, qs: QuantState, out: torch.Tensor) -> None:
        """Copy the packed `weight` and `qs`'s statistics into the uint8 vector `out` at their offsets."""
        for (at, _, _), t in zip(self.segments, [weight, *_statistics(qs)]):
            b = t.detach().contiguous().view(-1).view(torch.uint8)
            out[at:at + b.numel()] = b

    def weight(self, data: torch.Tensor) -> torch.Tensor:
        """The packed weight as a view of `data` (the gathered bytes), of the dtype and shape it was quantized to, with
        a quant state whose statistics are views of `data` too: nothing is copied."""
        data = data.view(-1).view(torch.uint8)
        (weight, *views) = [data[at:at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                            for at, dtype, shape in self.segments]
        if not self.template.nested:
            weight.quant_state = _replace(self.template, absmax=views[0])
            return weight
        absmax, absmax2, offset = views
        state2 = _replace(self.template.state2, absmax=absmax2)
        weight.quant_state = _replace(self.template, absmax=absmax, offset=offset, state2=state2)
        return weight


def to_nf4_weights(owner: nn.Module, linears: list[bnb.nn.Linear4bit]) -> None:
    """Move the packed bytes and statistics of quantized `linears` (submodules of `owner`) into one frozen parameter
    of `owner`, `packed_4bit`, an `NF4Weight`, in place. FSDP2 shards it in `owner`'s unit; the linears keep no weight
    and no quant state until the first all-gather (attach_4bit_views)."""
    if not linears or hasattr(owner, PACKED_4BIT):
        return
    for m in linears:
        if getattr(m.weight, "quant_state", None) is None:
            raise ValueError(f"{m} holds no quantized weight (no quant_state); quantize before sharding")
    names = {m: name for name, m in owner.named_modules()}
    weights = sum(_aligned(m.weight.data.nbytes, ALIGN) for m in linears)  # the statistics start after them
    layout, weight_at, statistics_at = [], 0, weights
    for m in linears:
        layout.append((names[m], _Layout(m.weight.data, m.weight.quant_state, weight_at, statistics_at)))
        weight_at += layout[-1][1].weight_nbytes
        statistics_at += layout[-1][1].statistics_nbytes
    data = torch.zeros(statistics_at, dtype=torch.uint8, device=linears[0].weight.device)
    for m, (_, where) in zip(linears, layout):
        where.write(m.weight.data, m.weight.quant_state, data)
        del m._parameters["weight"]
        m.weight = None  # a plain attribute from here on: a view of the gathered bytes once gathered
        m.quant_state = None
        keep_portable_cpu_kernels(m)
    packed = NF4Weight(_storage_view(data), tuple(layout))
    owner.register_parameter(PACKED_4BIT, nn.Parameter(packed, requires_grad=False))


def _storage_view(packed: torch.Tensor) -> torch.Tensor:
    # FSDP2 before torch 2.13 creates every sharded parameter with requires_grad=True, which integer tensors refuse.
    # Byte pairs reinterpreted as bfloat16 (a view, not a cast) are a float parameter to FSDP2, and are still
    # gathered as raw bytes (fsdp_pre_all_gather), so no value is ever converted. The length is a multiple of 4.
    return packed.view(-1).view(torch.bfloat16).view(-1, 1)


def keep_portable_cpu_kernels(module: bnb.nn.Linear4bit) -> None:
    """Keep bitsandbytes' CPU path on the portable kernels: its AVX512-BF16 path repacks the weight in place during
    the first no-grad eval forward, after which training silently computes wrong LoRA gradients."""
    module.support_avx512bf16_for_cpu = False


def attach_4bit_views(unit: nn.Module, owner: nn.Module) -> None:
    """Give the 4-bit layers of `owner` (managed by the FSDP2 unit `unit`, `owner` already prepared by
    `to_nf4_weights`) their weights and quant states, in a forward pre-hook of `unit` that runs right after FSDP2
    gathers them: views of `owner`'s gathered `packed_4bit`.

    FSDP2 keeps the gathered parameter for the whole run and gathers into the same storage, so this sets each
    attribute once (again only if FSDP2 ever made a new gathered parameter). The views are what bitsandbytes'
    `Linear4bit.forward` reads, so it never rebuilds a `Params4bit` (its fallback for sharded weights), and a compiled
    layer sees the same weight on every call (with a new one on its first call, 1- and 2-process compiled runs
    stopped matching). The hook is kept out of torch.compile; on the unit, not on each linear, it costs one graph
    break before the unit's body rather than one per linear.

    Between gathers FSDP2 frees that storage, and bitsandbytes' `Linear4bit` state dict would read its quant state's
    offset there: each layer's views are hidden while a state dict is taken (state-dict pre- and post-hooks). The
    layer's 4-bit state in a state dict is `owner`'s `packed_4bit`, its shards.
    """
    layout = getattr(owner, PACKED_4BIT).to_local().quant_layout  # constant metadata of the sharded parameter
    linears = [(owner.get_submodule(name), where) for name, where in layout]
    viewed, views = [None], {}  # the gathered parameter, and each linear's view of it

    @torch.compiler.disable
    def hook(module, args):
        gathered = getattr(owner, PACKED_4BIT)
        if gathered is viewed[0]:
            return
        for m, where in linears:
            views[m] = where.weight(gathered)
            _show(m, views[m])
        viewed[0] = gathered

    def restore(module, state_dict, prefix, local_metadata):
        _show(module, views.get(module))

    for m, _ in linears:
        m.register_state_dict_pre_hook(lambda module, prefix, keep_vars: _show(module, None))
        m.register_state_dict_post_hook(restore)
    unit.register_forward_pre_hook(hook)


def _show(module: nn.Module, weight: torch.Tensor | None) -> None:
    """Set a 4-bit layer's weight to a view of gathered bytes (None: none) and its quant state to the view's."""
    module.weight = weight  # a plain attribute: to_nf4_weights removed the parameter
    module.quant_state = getattr(weight, "quant_state", None)


def packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The bytes held by this rank of a 4-bit weight or a `packed_4bit` parameter, as a flat uint8 vector (plain,
    NF4Weight and DTensor)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    local = local.packed if isinstance(local, NF4Weight) else local
    return local.detach().contiguous().view(torch.uint8).view(-1)


def held_bytes(module: nn.Module) -> int:
    """Bytes of 4-bit state this rank holds for one module, sharded or not: the packed bytes of a `Linear4bit` that
    keeps its own weight (bitsandbytes' `Params4bit`) and its statistics, counted as `to_nf4_weights` lays them out,
    so that shards add up to exactly that; the shard of a `packed_4bit` parameter. A weight that views gathered
    bytes is not held. The code tables, a constant few hundred bytes a weight, are not counted."""
    held = 0
    if isinstance(module, bnb.nn.Linear4bit) and (weight := module._parameters.get("weight")) is not None:
        qs = getattr(weight, "quant_state", None)
        qs = qs if qs is not None else getattr(module, "quant_state", None)
        held += _Layout(weight.data, qs).nbytes
    if (packed := module._parameters.get(PACKED_4BIT)) is not None:
        held += packed_bytes(packed).numel()
    return held

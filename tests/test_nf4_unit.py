"""NF4Weight in one process: what FSDP2 sees of a module's packed 4-bit weights."""

import bitsandbytes as bnb
import torch
from torch import nn

from qfsdp.nf4 import NF4Weight, held_bytes, packed_bytes, to_nf4_weights


def _linear4bit(out_features=32, in_features=64, seed=0):
    lin = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    g = torch.Generator().manual_seed(seed)
    lin.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, generator=g), requires_grad=False,
                                   quant_type="nf4")
    lin.weight._quantize("cpu")  # quantize in place, as .to(device) does
    return lin


def test_a_modules_4bit_state_is_one_float_parameter_for_fsdp2():
    """The packed bytes and statistics of a module's 4-bit layers become one parameter (fewer parameters for FSDP2
    to gather), a float one: torch 2.11's FSDP2 makes every sharded parameter require grad at creation, which
    integer ones refuse. Once gathered, each layer computes with views of it, bit for bit as before."""
    owner = nn.Sequential(_linear4bit(32, 64, seed=0), _linear4bit(48, 32, seed=1))
    states = [lin.weight.quant_state for lin in owner]
    packed = [packed_bytes(lin.weight).clone() for lin in owner]
    dequantized = [bnb.functional.dequantize_4bit(lin.weight.data, qs) for lin, qs in zip(owner, states)]
    held = sum(held_bytes(lin) for lin in owner)
    x = torch.randn(3, 64)
    y_before = owner(x)
    to_nf4_weights(owner, list(owner))
    data = owner.packed_4bit
    assert isinstance(data.data, NF4Weight) and data.dtype.is_floating_point and not data.requires_grad
    assert all(lin.weight is None and lin.quant_state is None for lin in owner)  # nothing whole beside it
    # absmax byte per 64-weight block, the nested absmax and offset (float32 each): packed, then statistics
    assert held_bytes(owner) == held == sum(p.numel() for p in packed) + (32 + 4 + 4) + (24 + 4 + 4)
    assert [name for name, _ in data.quant_layout] == ["0", "1"]
    for lin, (_, where), qs, before, deq in zip(owner, data.quant_layout, states, packed, dequantized):
        lin.weight = where.weight(data.packed)  # as attach_4bit_views does once gathered
        lin.quant_state = lin.weight.quant_state
        assert where.segments[0][0] % 128 == 0 and all(at % 4 == 0 for at, _, _ in where.segments)
        assert lin.weight.dtype == torch.uint8 and lin.weight.shape == (before.numel(), 1)
        assert torch.equal(lin.weight.view(-1), before)  # the same bytes
        views = [lin.weight, lin.weight.quant_state.absmax, lin.weight.quant_state.offset,
                 lin.weight.quant_state.state2.absmax]
        assert all(t.untyped_storage().data_ptr() == data.packed.untyped_storage().data_ptr() for t in views)
        for a, b in [(lin.weight.quant_state.absmax, qs.absmax), (lin.weight.quant_state.offset, qs.offset),
                     (lin.weight.quant_state.state2.absmax, qs.state2.absmax)]:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert torch.equal(bnb.functional.dequantize_4bit(lin.weight, lin.weight.quant_state), deq)
    assert torch.equal(owner(x), y_before)


def test_fsdp2_reads_the_pre_all_gather_signature_by_lookup():
    """FSDP2 calls `inspect.signature(tensor.fsdp_pre_all_gather)` at every gather of every 4-bit weight: the bound
    form carries its signature (nf4._SignedMethod), FSDP2's five-argument convention, and is answered faster than a
    bound method whose function has its signature precomputed, the previous way (measured 2.0 vs 6.1 us; the best
    of 5 repeats of each, so a loaded machine slows both alike)."""
    import functools
    import inspect
    import timeit
    import types

    lin = _linear4bit()
    to_nf4_weights(lin, [lin])
    weight = lin.packed_4bit.data
    signed = inspect.signature(weight.fsdp_pre_all_gather)
    assert list(signed.parameters) == ["mesh", "outer_size", "outer_stride", "module", "mp_policy"]

    @functools.wraps(NF4Weight.fsdp_pre_all_gather)
    def previous(*args, **kwargs):
        return NF4Weight.fsdp_pre_all_gather(*args, **kwargs)

    previous.__signature__ = inspect.signature(NF4Weight.fsdp_pre_all_gather)
    bound = types.MethodType(previous, weight)
    assert inspect.signature(bound) == signed
    t_signed = min(timeit.repeat(lambda: inspect.signature(weight.fsdp_pre_all_gather), number=2000, repeat=5))
    t_previous = min(timeit.repeat(lambda: inspect.signature(bound), number=2000, repeat=5))
    assert t_signed < 0.6 * t_previous, (t_signed, t_previous)

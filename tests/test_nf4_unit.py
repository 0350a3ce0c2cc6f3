"""NF4Weight in one process: what FSDP2 sees of a packed 4-bit weight."""

import bitsandbytes as bnb
import torch

from qfsdp.nf4 import NF4Weight, dequantize, held_bytes, packed_bytes, to_nf4_weights


def _linear4bit():
    lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    lin.weight._quantize("cpu")  # quantize in place, as .to(device) does
    return lin


def test_packed_bytes_are_a_float_parameter_for_fsdp2():
    """torch 2.11's FSDP2 makes every sharded parameter require grad at creation: integer ones fail there. The
    quantization statistics become such a parameter too, which a quant state reads in place."""
    lin = _linear4bit()
    qs = lin.weight.quant_state
    before_bytes, held = packed_bytes(lin.weight).clone(), held_bytes(lin)
    before = bnb.functional.dequantize_4bit(lin.weight.data, qs)
    x = torch.randn(3, 64)
    y_before = lin(x)
    to_nf4_weights(lin, [lin])
    assert isinstance(lin.weight.data, NF4Weight) and lin.weight.dtype.is_floating_point
    assert torch.equal(packed_bytes(lin.weight), before_bytes)  # a view of the same bytes, not a cast
    statistics = lin.quant_statistics
    assert isinstance(statistics.data, NF4Weight) and statistics.dtype.is_floating_point and lin.quant_state is None
    assert held_bytes(lin) == held == before_bytes.numel() + 32 + 4 + 4  # absmax byte per block, absmax2, offset
    ((name, layout),) = statistics.quant_layout
    lin.weight.quant_state = layout.quant_state(statistics.packed)  # as attach_quant_states does once gathered
    assert name == "" and lin.weight.quant_state.absmax.data_ptr() == statistics.packed.data_ptr()
    for a, b in [(lin.weight.quant_state.absmax, qs.absmax), (lin.weight.quant_state.offset, qs.offset),
                 (lin.weight.quant_state.state2.absmax, qs.state2.absmax)]:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(dequantize(lin.weight), before)
    assert torch.equal(lin(x), y_before)


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
    weight = lin.weight.data
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

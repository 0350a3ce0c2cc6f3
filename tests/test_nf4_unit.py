"""NF4Weight in one process: what FSDP2 sees of a packed 4-bit weight."""

import bitsandbytes as bnb
import torch

from qfsdp.nf4 import NF4Weight, dequantize, packed_bytes, to_nf4_weight


def _linear4bit():
    lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    lin.weight._quantize("cpu")  # quantize in place, as .to(device) does
    return lin


def test_packed_bytes_are_a_float_parameter_for_fsdp2():
    """torch 2.11's FSDP2 makes every sharded parameter require grad at creation: integer ones fail there."""
    lin = _linear4bit()
    before_bytes = packed_bytes(lin.weight).clone()
    before = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    x = torch.randn(3, 64)
    y_before = lin(x)
    to_nf4_weight(lin)
    assert isinstance(lin.weight.data, NF4Weight) and lin.weight.dtype.is_floating_point
    assert torch.equal(packed_bytes(lin.weight), before_bytes)  # a view of the same bytes, not a cast
    assert torch.equal(dequantize(lin.weight.data), before)
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
    to_nf4_weight(lin)
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

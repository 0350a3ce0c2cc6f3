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

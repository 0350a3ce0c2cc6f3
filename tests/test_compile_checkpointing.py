"""compile=true keeps activation checkpointing's memory savings (shard.compile_layer)."""

import json

import pytest

from conftest import SCRIPTS, torchrun


@pytest.mark.slow
def test_compiled_layers_save_no_more_than_eager_ones(tmp_path):
    out = tmp_path / "saved.json"
    torchrun(1, str(SCRIPTS / "saved_activations.py"), str(out), timeout=600)
    saved = json.loads(out.read_text())
    # Compiling whole layers (checkpoint traced into the graph) saved 64 tensors here instead of 12: bitsandbytes'
    # matmul outputs, which on an 8B model are ~300 MB per layer. Compiled children inside the eager checkpoint
    # save exactly what eager does.
    assert saved["compiled_graphs"] > 0
    assert saved["compiled"] == saved["eager"], saved


def test_deterministic_compiles_only_the_parts_with_linear_layers():
    """deterministic=true leaves a layer's norms eager (their compiled reduction order differs from eager's on GPUs)
    and compiles its attention and MLP, whole layers or checkpointed ones alike."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from qfsdp.shard import compile_layer

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    for checkpointed in (True, False):
        layer = LlamaDecoderLayer(config, layer_idx=0)
        compile_layer(layer, checkpointed, deterministic=True)
        compiled = {name for name, m in layer.named_children() if m._compiled_call_impl is not None}
        assert compiled == {"self_attn", "mlp"}, compiled
        assert layer._compiled_call_impl is None
    # kernels=liger: the norms are fused kernels already and stay eager, in whole layers too
    for checkpointed in (True, False):
        layer = LlamaDecoderLayer(config, layer_idx=0)
        compile_layer(layer, checkpointed, fused_norms=True)
        assert {name for name, m in layer.named_children() if m._compiled_call_impl is not None} == {"self_attn", "mlp"}
    layer = LlamaDecoderLayer(config, layer_idx=0)
    compile_layer(layer, True)
    assert {name for name, m in layer.named_children() if m._compiled_call_impl is not None} == {
        "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}

"""A second architecture family: OPT (learned positional embeddings, head tied to the input embedding, biases),
fully fine-tuned (lora=none quant=none) at 1 and 2 processes, and with 4-bit weights + LoRA (runs in conftest)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_STEPS, adapter_weights, metrics, summary
from qfsdp.config import ModelConfig, compose_config
from qfsdp.model import decoder_layers, load_config
from qfsdp.validate import Machine, validate


@pytest.mark.slow
def test_full_finetune_one_vs_two_processes(shared_runs):
    one, two = shared_runs["opt_full_ws1"], shared_runs["opt_full_ws2"]
    l1, l2 = [r["loss"] for r in metrics(one)], [r["loss"] for r in metrics(two)]
    assert len(l1) == len(l2) == SHARED_STEPS
    for step, (a, b) in enumerate(zip(l1, l2), 1):
        assert abs(a - b) <= 1e-5, f"step {step}: {a} vs {b}"
    assert summary(two)["output"] == "model" and summary(two)["quantized_bytes_per_rank"] == [0, 0]
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    common = w1.keys() & w2.keys()
    assert {"model.decoder.embed_positions.weight", "model.decoder.layers.1.fc2.weight"} <= common
    for key in common:  # trained weights equal to float32 rounding (Adam), as in test_parity
        scale = w1[key].abs().max().item()
        # + 1e-6: key biases get no gradient (softmax ignores a shift shared by a query's scores); they hold only
        # float noise of about 4e-7, Adam's steps of 2e-4 elsewhere
        assert (w1[key] - w2[key]).abs().max().item() <= 1e-5 * scale + 1e-6, key


@pytest.mark.slow
def test_4bit_lora_on_two_processes(shared_runs):
    run = shared_runs["opt_qlora_ws2"]
    s = summary(run)
    assert s["steps"] == SHARED_STEPS and all(math.isfinite(x) for x in s["losses"])
    one, two = s["quantized_bytes_per_rank"]
    assert one > 0 and abs(one - two) <= 0.01 * one  # every linear in the layers is 4-bit, half on each rank
    adapter = adapter_weights(run)
    for layer in (0, 1):
        for module in ("self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"):
            assert f"base_model.model.model.decoder.layers.{layer}.{module}.lora_B.weight" in adapter
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_opt_1_3b_resolves_offline():
    """model=opt_1_3b with random_init: the bundled architecture, 24 decoder layers found to shard, the tied head
    left to the root, dropout off; valid for 4-bit + LoRA and for full fine-tuning."""
    from transformers import AutoModelForCausalLM

    from qfsdp.shard import _embeddings

    cfg = compose_config(["model=opt_1_3b", "model.random_init=true"])
    assert cfg.model.path == "facebook/opt-1.3b" and cfg.model.dropout == 0.0
    config = load_config(ModelConfig(**cfg.model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert len(decoder_layers(model)) == 24 and _embeddings(model) == (None, None)
    assert sum(p.numel() for p in model.parameters()) == 1_315_758_080
    assert validate(cfg, Machine(gpus=2)) == 2
    assert validate(compose_config(["model=opt_1_3b", "model.random_init=true", "lora=none", "quant=none"]),
                    Machine(gpus=2)) == 2

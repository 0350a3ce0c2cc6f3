"""Other architectures, pre-quantized checkpoints, full-precision bases, full fine-tuning and every dataset kind."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import adapter_weights, launch, metrics, save_prequantized_tiny, summary
from qfsdp.config import ModelConfig, compose_config
from qfsdp.model import load_config
from qfsdp.validate import Machine, validate


@pytest.mark.slow
def test_second_architecture_qwen2_one_vs_two(tmp_path):
    runs = {}
    for ws in (1, 2):
        runs[ws] = tmp_path / f"ws{ws}"
        launch("model=tiny_qwen2", f"world_size={ws}", "trainer.max_steps=4", f"hydra.run.dir={runs[ws]}")
    l1, l2 = [r["loss"] for r in metrics(runs[1])], [r["loss"] for r in metrics(runs[2])]
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-5
    assert any("q_proj" in k for k in adapter_weights(runs[2]))
    two = summary(runs[2])["quantized_bytes_per_rank"]
    assert abs(two[0] - summary(runs[1])["quantized_bytes_per_rank"][0] / 2) <= 0.01 * two[0] * 2


@pytest.mark.slow
def test_prequantized_checkpoint_loads_and_trains(tmp_path):
    """A checkpoint saved already in bitsandbytes 4-bit (like unsloth/...-bnb-4bit) loads without re-quantizing."""
    ckpt = save_prequantized_tiny(tmp_path / "tiny-bnb-4bit")
    assert "quantization_config" in json.loads((ckpt / "config.json").read_text())

    fresh, pre = tmp_path / "fresh", tmp_path / "pre"
    launch("world_size=2", "trainer.max_steps=3", f"hydra.run.dir={fresh}")
    launch(f"model.path={ckpt}", "world_size=2", "trainer.max_steps=3", f"hydra.run.dir={pre}")
    assert summary(pre)["quantized_bytes_per_rank"] == summary(fresh)["quantized_bytes_per_rank"]
    assert [r["loss"] for r in metrics(pre)] == [r["loss"] for r in metrics(fresh)]


@pytest.mark.slow
def test_lora_on_unquantized_base(tmp_path):
    launch("quant=none", "world_size=2", "trainer.max_steps=3", f"hydra.run.dir={tmp_path}")
    s = summary(tmp_path)
    assert s["quantized_bytes_per_rank"] == [0, 0] and s["output"] == "adapter"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_full_finetune_saves_whole_model(tmp_path, world_size):
    from transformers import AutoModelForCausalLM

    launch("quant=none", "lora=none", f"world_size={world_size}", "trainer.max_steps=3", "trainer.learning_rate=1e-3",
           f"hydra.run.dir={tmp_path}")
    from qfsdp.tiny import tiny_model_path

    assert summary(tmp_path)["output"] == "model"
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny")).state_dict()
    assert trained.keys() == initial.keys()
    moved = [k for k in initial if not torch.equal(trained[k], initial[k])]
    assert len(moved) == len(initial)  # every parameter was trained (and gathered whole from every rank)


@pytest.mark.slow
def test_synthetic_dataset(tmp_path):
    launch("dataset=synthetic", "dataset.seq_length=64", "world_size=2", "trainer.max_steps=3",
           f"hydra.run.dir={tmp_path}")
    rows = metrics(tmp_path)
    # 8 sequences of 64 tokens per optimizer step, no padding
    assert [r["tokens"] for r in rows] == [512, 1024, 1536]


def test_jsonl_dataset_with_own_text_field(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"body": f"<human>: say {i}\n<bot>: {i}"}) + "\n" for i in range(40)))
    launch("dataset=jsonl", f"dataset.path={data}", "dataset.text_field=body", "trainer.max_steps=2",
           f"hydra.run.dir={tmp_path / 'run'}")
    assert len(metrics(tmp_path / "run")) == 2


def test_real_architectures_resolve_offline():
    """llama3_1_8b / 70b with random_init use the bundled configs: no hub, and validation (LoRA targets on a
    weightless copy) passes for the real shapes."""
    for name, layers in [("llama3_1_8b", 32), ("llama3_1_70b", 80)]:
        cfg = compose_config([f"model={name}", "model.random_init=true"])
        assert load_config(ModelConfig(**cfg.model)).num_hidden_layers == layers
        assert validate(cfg, Machine(gpus=4)) == 4


def test_kernels_liger_applies_ligers_llama_patch_without_its_loss(monkeypatch):
    """kernels=liger calls Liger's public Llama patch on the model instance, with its fused loss off (TRL's fused head
    replaces the forward it would patch); kernels=none does not import Liger. Liger needs a GPU, so a stand-in
    records the call here; the bench rows qfsdp-1-liger* run the real one."""
    import sys
    import types

    from qfsdp.config import Kernels
    from qfsdp.model import apply_kernels

    calls = []
    stand_in = types.ModuleType("liger_kernel.transformers")
    stand_in.apply_liger_kernel_to_llama = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", stand_in)
    model = torch.nn.Linear(2, 2)
    apply_kernels(model, Kernels.none)
    assert calls == []
    apply_kernels(model, compose_config(["kernels=liger"]).kernels)
    assert calls == [dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
                          model=model)]

"""`python -m qfsdp.export`: the adapter merged into the base computes what training computed (the 4-bit base +
the PEFT adapter, in float32 on the CPU: logits within 1e-4), for Llama, Qwen2 (trained biases), OPT (tied head,
learned positions, a bf16 run), a checkpoint saved in 4-bit and a random-weight base; a full fine-tuning run's
model; checkpoints; the adapter alone; every refusal as one line with exit code 2. Runs come from conftest."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import adapter_weights, run_cmd, save_prequantized_tiny
from qfsdp.config import ModelConfig, QuantConfig
from qfsdp.export import export, main

pytestmark = pytest.mark.slow  # it exports training runs, some of 2 processes (conftest.SHARED_RUNS)


def _ids() -> torch.Tensor:
    return torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def reference_logits(run_dir: Path, with_adapter: bool = True) -> torch.Tensor:
    """What training computed, in float32 on the CPU: the base loaded and quantized as qfsdp trains it (frozen
    weights cast to the compute dtype, 4-bit layers quantized as they reach the device), with the PEFT adapter."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from qfsdp.model import load_model
    from qfsdp.nf4 import keep_portable_cpu_kernels
    from qfsdp.shard import cast_frozen

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dtype = getattr(torch, cfg.precision.dtype)
    base = load_model(ModelConfig(**cfg.model), QuantConfig(**cfg.quant), dtype).requires_grad_(False)
    cast_frozen(base, dtype)
    base.to("cpu")
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            keep_portable_cpu_kernels(m)
            m.compute_dtype = m.weight.quant_state.dtype = torch.float32
    for p in base.parameters():
        if p.is_floating_point() and not getattr(p, "bnb_quantized", False):
            p.data = p.data.float()
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval() if with_adapter else base.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def exported_logits(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_merged_like_training(run_dir: Path, out: Path) -> float:
    ref = reference_logits(run_dir)
    err = (exported_logits(out) - ref).abs().max().item()
    assert err <= 1e-4, f"max |exported - (4-bit base + adapter)| = {err}"
    # the adapter moved the logits far beyond the tolerance: a merge that dropped it would fail above
    assert (reference_logits(run_dir, with_adapter=False) - ref).abs().max() > 1e-2
    return err


def test_cli_llama_merged_in_shards(shared_runs, tmp_path):
    run, out = shared_runs["llama_qlora_fp32"], tmp_path / "merged"
    result = run_cmd([sys.executable, "-m", "qfsdp.export", str(run), str(out), "--max-shard-size", "200KB"])
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    assert "merged 14 adapter tensor(s)" in result.stdout
    # the process' own memory is reported apart from the mapped checkpoint pages, and is part of the peak RSS
    peak, own = re.search(r"peak RSS ([\d.]+) GiB \(([\d.]+) GiB its own", result.stdout).groups()
    assert 0 < float(own) <= float(peak)
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file()
    print(f"llama: max |logits - reference| = {_assert_merged_like_training(run, out):.2e}")


def test_qwen2_merged_with_trained_biases(shared_runs, tmp_path):
    run = shared_runs["qwen2_qlora_bias_fp32"]
    export(run, tmp_path / "merged")
    trained = adapter_weights(run)["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"]
    assert torch.equal(_weights(tmp_path / "merged")["model.layers.0.self_attn.q_proj.bias"], trained)
    print(f"qwen2: max |logits - reference| = {_assert_merged_like_training(run, tmp_path / 'merged'):.2e}")


def test_opt_bf16_run_merged(shared_runs, tmp_path):
    """A bf16 run exports in bf16; in float32 it is the bf16 base (4-bit quantized from bf16 weights) + adapter."""
    run = shared_runs["opt_qlora_ws2"]
    export(run, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    weights = _weights(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert "model.decoder.embed_positions.weight" in weights and "lm_head.weight" not in weights  # tied
    export(run, tmp_path / "fp32", dtype="float32")
    print(f"opt: max |logits - reference| = {_assert_merged_like_training(run, tmp_path / 'fp32'):.2e}")


def test_full_finetune_model_cast(shared_runs, tmp_path):
    run = shared_runs["opt_full_ws2"]
    export(run, tmp_path / "fp32")
    assert torch.equal(exported_logits(tmp_path / "fp32"), exported_logits(run / "model"))
    export(run, tmp_path / "bf16", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in _weights(tmp_path / "bf16").values())


@pytest.mark.parametrize("base", ["saved_in_4bit", "random_init"])
def test_other_bases(shared_runs, tmp_path, base):
    """The Llama run's adapter on a checkpoint saved in 4-bit (dequantized as saved) and on a random-weight base
    (read from qfsdp's cache): run directories that differ from the trained one only in model.*."""
    from qfsdp.model import prepare_checkpoint

    run = tmp_path / "run"
    shutil.copytree(shared_runs["llama_qlora_fp32"], run, ignore=shutil.ignore_patterns("trainer"))
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    if base == "saved_in_4bit":
        cfg.model.path = str(save_prequantized_tiny(tmp_path / "tiny-bnb-4bit"))
    else:
        cfg.model.random_init = cfg.model.random_checkpoint = True
        prepare_checkpoint(ModelConfig(**cfg.model), torch.float32)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    export(run, tmp_path / "merged")
    _assert_merged_like_training(run, tmp_path / "merged")


def test_checkpoint_and_adapter_only(shared_runs, tmp_path):
    """A run that did not finish, with a checkpoint in the checkpoint code's layout (checkpoints/step-N/adapter/),
    exports from that checkpoint; --adapter-only copies the adapter with a README."""
    run = tmp_path / "run"
    shutil.copytree(shared_runs["llama_qlora_fp32"], run, ignore=shutil.ignore_patterns("trainer", "summary.json"))
    shutil.copytree(run / "adapter", run / "checkpoints" / "step-2" / "adapter")
    with pytest.raises(SystemExit) as stop:
        main([str(run), str(tmp_path / "end")])
    assert stop.value.code == 2
    export(run, tmp_path / "step2", checkpoint="step-2")
    export(shared_runs["llama_qlora_fp32"], tmp_path / "end")
    step2, end = _weights(tmp_path / "step2"), _weights(tmp_path / "end")
    assert step2.keys() == end.keys() and all(torch.equal(t, end[k]) for k, t in step2.items())

    export(run, tmp_path / "adapter", checkpoint="step-2", adapter_only=True)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == \
        {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    readme = (tmp_path / "adapter" / "README.md").read_text()
    row2 = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert "- steps: 2 (checkpoint step-2)" in readme and f"final loss: {row2['loss']:.4f}" in readme
    assert "r=16, lora_alpha=32" in readme and "q_proj" in readme and "`tiny`" in readme


@pytest.mark.parametrize("case", ["not_a_run", "unfinished", "no_such_checkpoint", "out_not_empty",
                                  "adapter_of_full_finetune", "random_base_never_saved"])
def test_refusals_are_one_line(shared_runs, tmp_path, capsys, case):
    llama = shared_runs["llama_qlora_fp32"]
    out = tmp_path / "out"
    args = {
        "not_a_run": [str(tmp_path), str(out)],
        "unfinished": [str(tmp_path / "unfinished"), str(out)],
        "no_such_checkpoint": [str(llama), str(out), "--checkpoint", "step-7"],
        "out_not_empty": [str(llama), str(out)],
        "adapter_of_full_finetune": [str(shared_runs["opt_full_ws1"]), str(out), "--adapter-only"],
        "random_base_never_saved": [str(tmp_path / "random"), str(out)],
    }[case]
    if case == "unfinished":
        shutil.copytree(llama / ".hydra", tmp_path / "unfinished" / ".hydra")
    if case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "random_base_never_saved":  # model.random_init without model.random_checkpoint: drawn, never saved
        shutil.copytree(llama, tmp_path / "random", ignore=shutil.ignore_patterns("trainer"))
        cfg = OmegaConf.load(tmp_path / "random" / ".hydra" / "config.yaml")
        cfg.model.random_init = True
        OmegaConf.save(cfg, tmp_path / "random" / ".hydra" / "config.yaml")
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    if case == "random_base_never_saved":
        assert "model.random_checkpoint=true" in err, err
    assert stop.value.code == 2 and err.startswith("qfsdp.export: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists() or {p.name for p in out.iterdir()} == {"keep.txt"}


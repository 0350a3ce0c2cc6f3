"""Composition: every option of every group composes against its typed schema; typos and wrong types fail at
compose time naming the key; trainer keys are real SFTConfig fields."""

from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import ROOT, launch
from qfsdp.config import TrainerConfig, compose_config

GROUPS = ["model", "quant", "lora", "fsdp2", "precision", "dataset"]



def _compose(*overrides):
    return compose_config(overrides)


def _options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    cfg = _compose(f"{group}={option}")
    # every key of the YAML is a key of the schema (struct mode would have raised), and nothing is left missing
    assert OmegaConf.missing_keys(cfg) <= {"dataset.path"}
    assert cfg[group] is not None


def test_defaults():
    cfg = _compose()
    assert cfg.model.path == "tiny" and cfg.quant.enabled and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.fsdp2.enabled and cfg.fsdp2.reshard_after_forward and cfg.fsdp2.activation_checkpointing
    assert cfg.precision.dtype == "bfloat16" and cfg.compile is None and cfg.dataset.name == "sample"
    assert cfg.kernels.value == "none"


def test_compile_is_on_by_default_for_gpu_runs_without_offload():
    from qfsdp.config import compile_enabled

    assert compile_enabled(_compose(), "cuda", (9, 0)) and not compile_enabled(_compose(), "cpu")
    assert compile_enabled(_compose(), "cuda", (7, 5)) and not compile_enabled(_compose(), "cuda", (6, 0))  # no Triton
    assert not compile_enabled(_compose("fsdp2=offload"), "cuda", (9, 0))  # with offload: not measured on GPUs
    assert compile_enabled(_compose("compile=true"), "cpu")
    assert not compile_enabled(_compose("compile=false"), "cuda", (9, 0))
    assert compile_enabled(_compose("compile=true", "fsdp2=offload"), "cuda")
    assert not compile_enabled(_compose("quant=none", "lora=none"), "cuda", (9, 0))  # full fine-tuning: not measured
    assert not compile_enabled(_compose("quant=none"), "cuda", (9, 0))
    # the GPU recipes that were measured eager stay eager
    assert _compose("experiment=kaggle_2xt4").compile is False


def test_switches_compose_as_written():
    cfg = _compose("compile=true", "fsdp2=offload", "world_size=2", "fsdp2.activation_checkpointing=false")
    assert cfg.compile is True and cfg.world_size == 2
    assert cfg.fsdp2.offload and not cfg.fsdp2.activation_checkpointing
    assert _compose("kernels=liger").kernels.value == "liger"
    with pytest.raises(ConfigCompositionException) as e:  # a typed choice: a kernel library qfsdp does not apply
        _compose("kernels=unsloth")
    assert "kernels" in str(e.value.__cause__ or e.value) and "liger" in str(e.value.__cause__ or e.value)


def test_misspelled_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        _compose("trainer.max_step=5")
    assert "max_step" in str(e.value.__cause__ or e.value)


def test_wrong_type_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        _compose("trainer.max_steps=many")
    text = str(e.value.__cause__ or e.value)
    assert "max_steps" in text and "many" in text


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException) as e:
        _compose("fsdp2=turbo")
    assert "fsdp2/turbo" in str(e.value)


def test_trainer_schema_is_the_installed_sft_config():
    """Every SFTConfig field of the installed TRL is a trainer key, and nothing else but global_batch_size; each
    takes SFTConfig's own default (or qfsdp's), so the schema follows TRL without a list kept by hand."""
    from trl import SFTConfig

    from qfsdp.config import OWNED_TRAINER_FIELDS, TRAINER_DEFAULTS

    sft = {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}
    ours = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert ours == sft.keys() | {"global_batch_size"}, ours ^ (sft.keys() | {"global_batch_size"})
    assert set(OWNED_TRAINER_FIELDS) <= sft.keys() and set(TRAINER_DEFAULTS) <= sft.keys()
    trainer = _compose().trainer
    for name, f in sft.items():
        if name in OWNED_TRAINER_FIELDS:
            assert trainer[name] is None
        elif name not in TRAINER_DEFAULTS and f.default is not dataclasses.MISSING:
            default = getattr(f.default, "value", f.default)  # transformers' string enums
            assert trainer[name] == default, name


def test_any_sft_config_field_reaches_the_trainer(tmp_path):
    from qfsdp.train import sft_config

    cfg = _compose("trainer.neftune_noise_alpha=5", "trainer.eval_strategy=steps", "trainer.eval_steps=2",
                   "trainer.padding_free=true", "trainer.completion_only_loss=false", "trainer.lr_scheduler_kwargs="
                   "{min_lr: 1.0e-05}", "trainer.lr_scheduler_type=cosine_with_min_lr")
    args = sft_config(cfg, tmp_path, world_size=1, use_cpu=True)
    assert args.neftune_noise_alpha == 5.0 and args.eval_strategy == "steps" and args.eval_steps == 2
    assert args.padding_free is True and args.completion_only_loss is False
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5} and args.lr_scheduler_type == "cosine_with_min_lr"
    # qfsdp's own settings stay as qfsdp sets them
    assert args.gradient_accumulation_steps == 4 and args.save_strategy == "no" and args.bf16 is False


@pytest.mark.parametrize("override,instead", [
    ("trainer.bf16=true", "precision=bf16|fp16|fp32"),
    ("trainer.gradient_accumulation_steps=4", "trainer.global_batch_size"),
    ("trainer.gradient_checkpointing=false", "fsdp2.activation_checkpointing"),
    ("trainer.output_dir=/tmp/x", "hydra.run.dir="),
    ("trainer.torch_compile=true", "compile=true"),
])
def test_fields_qfsdp_sets_are_refused_with_the_key_to_use(override, instead):
    from qfsdp.validate import ConfigError, Machine, validate

    with pytest.raises(ConfigError) as e:
        validate(_compose(override), Machine(gpus=0))
    key = override.split("=")[0]
    assert f"{key} is set by qfsdp" in str(e.value) and instead in str(e.value)


def test_wrong_type_of_a_generated_field_fails():
    with pytest.raises(ConfigCompositionException) as e:
        _compose("trainer.neftune_noise_alpha=loud")
    assert "neftune_noise_alpha" in str(e.value.__cause__ or e.value)


def test_yaml_knobs_are_commented():
    """Each YAML says what it is for, in a comment on its first line."""
    for group in GROUPS:
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            assert path.read_text().startswith("#"), path


def test_cfg_job_prints_config_without_running(tmp_path):
    result = launch("--cfg", "job", "fsdp2=offload", f"hydra.run.dir={tmp_path / 'never'}")
    printed = OmegaConf.create(result.stdout)
    assert printed.fsdp2.offload is True and printed.model.path == "tiny"
    assert not (tmp_path / "never").exists()


def test_cli_misspelled_key_message():
    result = launch("trainer.learnin_rate=1", check=False)
    assert result.returncode != 0
    assert "learnin_rate" in result.stderr and "TrainerConfig" in result.stderr

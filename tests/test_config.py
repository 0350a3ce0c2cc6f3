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
    assert cfg.precision.dtype == "bfloat16" and cfg.compile is False and cfg.dataset.name == "sample"


def test_switches_compose_as_written():
    cfg = _compose("compile=true", "fsdp2=offload", "world_size=2", "fsdp2.activation_checkpointing=false")
    assert cfg.compile is True and cfg.world_size == 2
    assert cfg.fsdp2.offload and not cfg.fsdp2.activation_checkpointing


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


def test_trainer_keys_are_sft_config_fields():
    from trl import SFTConfig

    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    ours = {f.name for f in dataclasses.fields(TrainerConfig)} - {"global_batch_size"}
    assert ours <= sft_fields, ours - sft_fields


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

"""Every bad input fails before any weights load, with one line naming the problem and the fix, and leaves no
directory that looks like a finished run."""

from __future__ import annotations

import sys
import time

import pytest

from conftest import launch, run_cmd
from qfsdp.config import compose_config
from qfsdp.validate import ConfigError, Machine, validate

CPU = Machine(gpus=0)


def _cfg(*overrides):
    return compose_config(overrides)


def _error(*overrides, machine=CPU, torchrun_world_size=None) -> str:
    with pytest.raises(ConfigError) as e:
        validate(_cfg(*overrides), machine, torchrun_world_size)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_good_config_passes():
    assert validate(_cfg(), CPU) == 1
    assert validate(_cfg("world_size=2"), CPU) == 2
    assert validate(_cfg(), Machine(gpus=4)) == 4  # null = every visible GPU


def test_world_size_larger_than_visible_gpus():
    msg = _error("world_size=4", machine=Machine(gpus=2))
    assert "world_size=4" in msg and "2 GPU(s)" in msg and "world_size=2" in msg


def test_world_size_disagrees_with_torchrun():
    msg = _error("world_size=4", torchrun_world_size=2)
    assert "torchrun started 2" in msg


def test_bf16_on_gpu_without_bf16_suggests_fp16():
    msg = _error("precision=bf16", machine=Machine(gpus=2, bf16_supported=False))
    assert "bf16" in msg and "precision=fp16" in msg


def test_global_batch_not_divisible():
    msg = _error("world_size=2", "trainer.global_batch_size=6", "trainer.per_device_train_batch_size=2")
    assert "global_batch_size=6" in msg and "2 * 2 = 4" in msg


def test_dropout_out_of_range():
    msg = _error("model=tiny_opt", "model.dropout=1.5")
    assert "model.dropout=1.5" in msg and "[0, 1)" in msg


def test_model_path_missing(tmp_path):
    msg = _error(f"model.path={tmp_path / 'nowhere'}")
    assert "nowhere" in msg and "does not exist" in msg


def test_model_dir_without_config(tmp_path):
    msg = _error(f"model.path={tmp_path}")
    assert "config.json" in msg


@pytest.mark.parametrize("content,expected", [
    (None, "does not exist"),
    ("", "is empty"),
    ('{"prompt": "hi"}\n{"prompt": "there"}\n', "no non-empty text in field 'text'"),
    ('{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
])
def test_dataset_file_problems(tmp_path, content, expected):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    msg = _error("dataset=jsonl", f"dataset.path={path}")
    assert expected in msg and str(path) in msg


def test_dataset_text_field_hint(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    msg = _error("dataset=jsonl", f"dataset.path={path}")
    assert "fields seen: ['prompt']" in msg and "dataset.text_field" in msg


def test_lora_target_matches_nothing():
    msg = _error("lora.target_modules=[qkv_fused]")
    assert "qkv_fused" in msg and "q_proj" in msg  # names what does exist


def test_fsdp_off_with_two_processes():
    assert "world_size=1" in _error("fsdp2=off", "world_size=2")


def test_full_finetune_needs_unquantized_base():
    assert "quant=none" in _error("lora=none")


def test_gpu_memory_limit_must_be_positive():
    assert "gpu_memory_limit_gib=0" in _error("gpu_memory_limit_gib=0")


def test_layers_per_unit_must_be_positive():
    assert validate(_cfg("fsdp2.layers_per_unit=2", "world_size=2"), CPU) == 2
    msg = _error("fsdp2.layers_per_unit=0", "world_size=2")
    assert "fsdp2.layers_per_unit=0" in msg and "at least 1" in msg


def test_hsdp_replicas_must_divide_world_size():
    assert validate(_cfg("fsdp2=hsdp", "world_size=4"), CPU) == 4
    msg = _error("fsdp2=hsdp", "world_size=3", "trainer.global_batch_size=6")
    assert "fsdp2.replicate=2" in msg and "world_size=3" in msg and "fsdp2.replicate=1 or 3" in msg
    assert "at least 1" in _error("fsdp2.replicate=0", "world_size=2")
    msg = _error("fsdp2=hsdp", "fsdp2.replicate=4", machine=Machine(gpus=2))  # world_size null = 2 GPUs
    assert "world_size=2" in msg and "fsdp2.replicate=1 or 2" in msg


def test_cli_hsdp_bad_world_size_fails_before_load(tmp_path):
    started = time.monotonic()
    run_dir = tmp_path / "run"
    result = launch("fsdp2=hsdp", "world_size=3", "trainer.global_batch_size=6", f"hydra.run.dir={run_dir}",
                    check=False)
    _assert_fast_clean_failure(result, run_dir, "fsdp2.replicate=2", "world_size=3", started=started)


def _assert_fast_clean_failure(result, run_dir, *needles, started):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("qfsdp: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]
    assert "Loading weights" not in result.stderr  # failed before any weights were loaded
    assert not run_dir.exists() or not (run_dir / "summary.json").exists()
    assert time.monotonic() - started < 60


def test_cli_bad_dataset_fails_fast(tmp_path):
    started = time.monotonic()
    run_dir = tmp_path / "run"
    result = launch("dataset=jsonl", f"dataset.path={tmp_path / 'missing.jsonl'}", f"hydra.run.dir={run_dir}",
                    check=False)
    _assert_fast_clean_failure(result, run_dir, "missing.jsonl", "does not exist", started=started)
    assert not run_dir.exists()  # nothing left behind


def test_cli_unknown_group_option(tmp_path):
    result = launch("fsdp2=turbo", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0
    assert "fsdp2/turbo" in result.stderr and "Available options" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_wrong_type(tmp_path):
    result = launch("world_size=two", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0 and "world_size" in result.stderr and "two" in result.stderr


def test_sweep_inside_torchrun_is_refused(tmp_path):
    started = time.monotonic()
    result = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                      "launch.py", "-m", "world_size=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert result.returncode != 0
    assert "a sweep (-m) cannot run inside torchrun" in result.stderr
    assert time.monotonic() - started < 60

"""`experiment=kaggle_2xt4`: the free Kaggle 2 x T4 recipe (fp16, sdpa, 15 GiB per GPU; `kaggle_2xt4_offload` adds CPU
offload), on the tiny model here; the 8B-shape GPU emulation is a benchmark row (docs/BENCHMARKS.md). The recipe's
1 vs 2 process runs are the notebook's (tests/test_notebook.py)."""

from __future__ import annotations

import json

import pytest

from conftest import SCRIPTS, save_prequantized_tiny, torchrun
from qfsdp.config import compose_config


def test_experiment_is_the_kaggle_recipe():
    cfg = compose_config(["experiment=kaggle_2xt4"])
    assert cfg.model.path == "unsloth/Meta-Llama-3.1-8B" and cfg.model.attn_implementation == "sdpa"
    assert cfg.precision.dtype == "float16" and cfg.precision.loss_scaling
    assert not cfg.fsdp2.offload and cfg.world_size == 2 and cfg.gpu_memory_limit_gib == 15
    t = cfg.trainer
    assert (t.max_steps, t.per_device_train_batch_size, t.global_batch_size, t.max_length) == (60, 4, 8, 2048)
    assert cfg.dataset.name == "sample"
    # the offload variant: the same recipe, weights in CPU memory, micro batch 2
    off = compose_config(["experiment=kaggle_2xt4_offload"])
    assert off.fsdp2.offload and off.trainer.per_device_train_batch_size == 2
    assert (off.precision.dtype, off.world_size, off.gpu_memory_limit_gib, off.trainer.learning_rate,
            off.model.attn_implementation) == ("float16", 2, 15, 2e-4, "sdpa")
    # the user's own overrides still win over the experiment's
    assert compose_config(["experiment=kaggle_2xt4", "model=tiny", "world_size=1"]).model.path == "tiny"


@pytest.mark.slow
def test_nothing_computes_in_bfloat16(tmp_path):
    def bf16_ops(*overrides):
        out = tmp_path / f"ops{len(list(tmp_path.iterdir()))}.json"
        torchrun(2, str(SCRIPTS / "no_bf16.py"), str(out), "model=tiny", *overrides)
        return json.loads(out.read_text())["bf16_compute_ops"]

    assert bf16_ops("experiment=kaggle_2xt4") == []
    # a checkpoint saved in 4-bit with bf16 compute (like the hub's -bnb-4bit ones) computes in fp16 too
    ckpt = save_prequantized_tiny(tmp_path / "tiny-bnb-4bit")
    assert bf16_ops("experiment=kaggle_2xt4", f"model.path={ckpt}") == []
    # the recorder has teeth: the default bf16 recipe computes in bfloat16 everywhere
    assert len(bf16_ops()) > 5

"""Every config group's bad settings, and the trainer's, fail before loading with one line naming the setting.

BAD_SETTINGS is also the source of docs/checks.md (`python tests/test_settings_table.py` rewrites it; a test keeps the
two in step). Most cases run in-process through the launcher's own checks (compose_config + validate); a few run
`python launch.py` to show what the console gets.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import launch
from qfsdp.config import compose_config
from qfsdp.validate import ConfigError, Machine, validate

DOC = Path(__file__).resolve().parents[1] / "docs" / "checks.md"

# (setting as the user writes it, extra overrides it needs, text the message must contain)
BAD_SETTINGS: list[tuple[str, tuple[str, ...], str]] = [
    # top level
    ("world_size=0", (), "world_size=0 must be at least 1"),
    ("seed=-1", (), "seed=-1 must be in [0, 2**32)"),
    ("gpu_memory_limit_gib=0", (), "gpu_memory_limit_gib=0"),
    ("gpu_memory_limit_gib=4", ("model=llama3_1_8b", "model.random_init=true"),
     "needs 5.94 GiB per GPU before activations"),
    ("resume=/no/such/checkpoint", (), "resume=/no/such/checkpoint does not exist"),
    ("kernels=liger", (), "kernels=liger runs Triton kernels on a GPU and none is visible; use kernels=none"),
    # model
    ("model.path=./no/such/model", (), "model.path=./no/such/model does not exist"),
    ("model.path=", (), "model.path is empty"),
    ("model.dropout=1.5", ("model=tiny_opt",), "model.dropout=1.5 must be in [0, 1)"),
    ("model.attn_implementation=fast", (), "model.attn_implementation=fast is not one of"),
    ("model.attn_implementation=flex_attention", (),
     "has no CPU kernel for its backward (FlexAttention) and no GPU is visible; use model.attn_implementation=sdpa"),
    ("model.attn_implementation=flash_attention_2", (), "runs flash-attn's CUDA kernels and no GPU is visible"),
    ("model.architecture=gpt5", (), "model.architecture=gpt5 is not one of"),
    ("model.tokenizer=/no/such/tokenizer", (), "model.tokenizer=/no/such/tokenizer does not exist"),
    # quant
    ("quant.quant_type=fp8", (), "quant.quant_type=fp8 is not one of nf4, fp4"),
    ("quant.storage=int3", (), "quant.storage=int3 is not one of"),
    ("lora=none", (), "add quant=none"),
    # lora
    ("lora.r=0", (), "lora.r=0 must be at least 1"),
    ("lora.lora_alpha=0", (), "lora.lora_alpha=0 must be positive"),
    ("lora.lora_dropout=1.5", (), "lora.lora_dropout=1.5 must be in [0, 1)"),
    ("lora.bias=some", (), "lora.bias=some is not one of none, all, lora_only"),
    ("lora.target_modules=[]", (), "lora.target_modules is empty"),
    ("lora.target_modules=[qkv_fused]", (), "matches no module"),
    # fsdp2
    ("fsdp2.layers_per_unit=0", (), "fsdp2.layers_per_unit=0 must be at least 1"),
    ("fsdp2.replicate=0", ("world_size=2",), "fsdp2.replicate=0 must be at least 1"),
    ("fsdp2.replicate=2", ("world_size=3", "trainer.global_batch_size=6"), "fsdp2.replicate=1 or 3"),
    ("fsdp2=off", ("world_size=2",), "use world_size=1"),
    ("fsdp2.checkpointed_layers=3", (), "must be from 0 to the model's 2 decoder layers"),
    ("fsdp2.checkpointed_layers=1", ("fsdp2.activation_checkpointing=false",),
     "needs fsdp2.activation_checkpointing=true"),
    ("fsdp2.checkpointed_layers=most", (), "must be auto, all or a number of decoder layers"),
    # precision
    ("precision.dtype=float8", (), "precision.dtype=float8 is not one of"),
    ("precision.loss_scaling=true", (), "use precision=fp16"),
    # dataset
    ("dataset=jsonl", (), "dataset=jsonl needs dataset.path"),
    ("dataset=local", (), "dataset=local needs dataset.path"),
    ("dataset=hub", (), "dataset=hub needs dataset.path"),
    ("dataset.name=mine", (), "dataset.name=mine needs dataset.path"),
    ("dataset.path=/no/such/data.jsonl", ("dataset=jsonl",), "does not exist"),
    ("dataset.text_field=", (), "dataset.text_field is empty"),
    ("dataset.split=", (), "dataset.split is empty"),
    ("dataset.max_samples=0", (), "dataset.max_samples=0 must be at least 1"),
    ("dataset.eval_samples=-1", (), "dataset.eval_samples=-1 must be between 0"),
    ("dataset.format=messages", (), "has no 'messages'"),
    ("dataset.seq_length=1", ("dataset=synthetic",), "dataset.seq_length >= 2"),
    ("dataset.length_sigma=-1", ("dataset=synthetic", "dataset.lengths=lognormal"), "dataset.length_sigma >= 0"),
    # trainer: qfsdp's own ranges
    ("trainer.global_batch_size=0", (), "trainer.global_batch_size=0 must be at least 1"),
    ("trainer.global_batch_size=6", ("world_size=2",), "trainer.global_batch_size=6 is not a multiple"),
    ("trainer.per_device_train_batch_size=0", (), "trainer.per_device_train_batch_size=0 must be at least 1"),
    ("trainer.max_steps=0", (), "trainer.max_steps=0 must be at least 1"),
    ("trainer.max_length=0", (), "trainer.max_length=0 must be at least 2"),
    ("trainer.learning_rate=0", (), "trainer.learning_rate=0.0 must be positive"),
    ("trainer.learning_rate=-1e-4", (), "must be positive"),
    ("trainer.warmup_steps=-1", (), "trainer.warmup_steps=-1.0 must be at least 0"),
    ("trainer.weight_decay=-0.1", (), "trainer.weight_decay=-0.1 must be at least 0"),
    ("trainer.max_grad_norm=-1", (), "trainer.max_grad_norm=-1.0 must be at least 0"),
    ("trainer.adam_beta1=1.5", (), "trainer.adam_beta1=1.5 must be in [0, 1)"),
    ("trainer.adam_beta2=-0.1", (), "trainer.adam_beta2=-0.1 must be in [0, 1)"),
    ("trainer.adam_epsilon=0", (), "trainer.adam_epsilon=0.0 must be positive"),
    ("trainer.logging_steps=0", (), "trainer.logging_steps=0.0 must be positive"),
    ("trainer.eval_steps=0", (), "trainer.eval_steps=0.0 must be positive"),
    ("trainer.num_train_epochs=0", (), "trainer.num_train_epochs=0.0 must be positive"),
    ("trainer.dataloader_num_workers=-1", (), "trainer.dataloader_num_workers=-1 must be at least 0"),
    ("trainer.dataset_num_proc=0", (), "trainer.dataset_num_proc=0 must be at least 1"),
    ("trainer.neftune_noise_alpha=-1", (), "trainer.neftune_noise_alpha=-1.0 must be at least 0"),
    ("trainer.report_to=slack", (), "trainer.report_to=slack is not a known integration"),
    ("trainer.packing_strategy=tight", ("trainer.packing=true",), "trainer.packing_strategy=tight is not one of"),
    ("trainer.save_strategy=epoch", (), "trainer.save_strategy=epoch is not supported"),
    ("trainer.save_steps=0", ("trainer.save_strategy=steps",), "trainer.save_steps=0"),
    ("trainer.save_total_limit=0", (), "trainer.save_total_limit=0 must be at least 1"),
    ("trainer.eval_strategy=steps", (), "dataset.eval_samples=N"),
    ("trainer.completion_only_loss=true", (), "needs prompt-completion data"),
    ("trainer.output_dir=out", (), "use hydra.run.dir=DIR"),
    ("trainer.use_liger_kernel=true", (), "use kernels=liger instead"),
    ("trainer.activation_offloading=true", (), "no GPU is visible; use trainer.activation_offloading=false"),
    # trainer: TRL's and transformers' own checks, from building the SFTConfig
    ("trainer.optim=adamw_fast", (), "trainer.optim=adamw_fast was refused"),
    ("trainer.lr_scheduler_type=wavy", (), "trainer.lr_scheduler_type=wavy was refused"),
    ("trainer.eval_strategy=often", ("dataset.eval_samples=8",), "trainer.eval_strategy=often was refused"),
    ("trainer.dataloader_prefetch_factor=2", (), "trainer.dataloader_prefetch_factor=2 was refused"),
]

CPU = Machine(gpus=0)


def _launcher_checks(cfg, run_dir: Path) -> None:
    """What the launcher runs before starting any process (qfsdp/launcher.py run_job)."""
    from qfsdp import checkpoint

    validate(cfg, CPU)
    checkpoint.resolve_resume(cfg, run_dir)


def _key(setting: str) -> str:
    return setting.split("=", 1)[0]


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch):
    """Loading any model's weights fails the test: these checks must never get that far."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded during validation")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("setting,extra,needle", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_setting_fails_before_loading(setting, extra, needle, tmp_path):
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        _launcher_checks(compose_config([*extra, setting]), tmp_path)
    message = str(e.value)
    assert "\n" not in message and needle in message, message
    assert _key(setting).split(".")[0] in message or "=" in message  # names a setting
    assert not dist.is_initialized()  # no process group was created
    assert time.monotonic() - started < 15


def test_table_covers_every_group():
    groups = {_key(s).split(".")[0] for s, _, _ in BAD_SETTINGS}
    assert {"model", "quant", "lora", "fsdp2", "precision", "dataset", "trainer", "world_size", "seed", "resume"} <= groups
    assert len(BAD_SETTINGS) >= 40


def test_good_config_still_passes():
    from accelerate.state import PartialState

    before = dict(PartialState._shared_state)
    assert validate(compose_config(["trainer.dataloader_num_workers=1", "trainer.dataloader_prefetch_factor=2"]),
                    CPU) == 1
    assert not dist.is_initialized()
    assert PartialState._shared_state == before  # the SFTConfig built to check the settings set up no device state


# ---- fit before load: the arithmetic of validate._check_fits ----

def test_fit_counts_what_loading_holds():
    """memory_need's counts for the tiny model against the model as loaded (random weights, quantized on CPU): the
    packed 4-bit bytes exactly, the quantization statistics within 1% (and so what summary.json's
    quantized_bytes_per_rank reports: both), the LoRA weights exactly."""
    import bitsandbytes as bnb
    import torch

    from qfsdp.config import FSDP2Config, LoraConfig, ModelConfig, QuantConfig
    from qfsdp.model import attach_lora, load_model
    from qfsdp.nf4 import packed_bytes
    from qfsdp.shard import parallelize, quantized_bytes
    from qfsdp.validate import memory_need

    cfg = compose_config(["model.random_init=true", "precision=fp32"])
    need = memory_need(cfg, 1)
    model = attach_lora(load_model(ModelConfig(**cfg.model), QuantConfig(**cfg.quant), torch.float32),
                        LoraConfig(**cfg.lora), seed=0)
    parallelize(model, None, torch.device("cpu"), FSDP2Config(**cfg.fsdp2), param_dtype=torch.float32)
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    stats = sum(t.numel() * t.element_size() for qs in states for t in (qs.absmax, qs.state2.absmax, qs.offset))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if not p.requires_grad and not isinstance(p, bnb.nn.Params4bit))
    assert need.packed_4bit == sum(packed_bytes(m.weight).numel() for m in model.modules()
                                   if isinstance(m, bnb.nn.Linear4bit))
    assert abs(need.quant_stats - stats) <= 0.01 * stats
    assert abs(need.packed_4bit + need.quant_stats - quantized_bytes(model)) <= 0.01 * stats
    assert need.trained == 16 * trained and need.unquantized == frozen


def test_fit_sharding_or_offload_passes():
    """The refused 8B case of BAD_SETTINGS fits on the 2 GPUs its message names (3.0 GiB each), or with offload."""
    base = ["model=llama3_1_8b", "model.random_init=true", "gpu_memory_limit_gib=4"]
    assert validate(compose_config([*base, "world_size=2"]), CPU) == 2
    assert validate(compose_config([*base, "fsdp2=offload"]), CPU) == 1
    with pytest.raises(ConfigError, match="but each GPU allows 4 GiB; use fsdp2=offload, or at least 2 GPUs"):
        validate(compose_config(base[:2]), Machine(gpus=1, gpu_memory_gib=4.0))  # the GPU's own memory


def render_doc() -> str:
    lines = [
        "# What is checked before loading",
        "",
        "Every setting below fails in seconds, before any process starts or any weight loads, with one line naming "
        "the setting and the fix (`qfsdp: error: ...`, exit code 2). Hydra itself refuses unknown keys, options and "
        "wrong types. Generated from `tests/test_settings_table.py` (`python tests/test_settings_table.py`).",
        "",
        "| bad setting | the message says |",
        "|---|---|",
    ]
    for setting, extra, needle in BAD_SETTINGS:
        with_ = f" (with `{' '.join(extra)}`)" if extra else ""
        needle = needle.replace("|", "\\|")  # a table cell
        lines.append(f"| `{setting}`{with_} | {needle} |")
    return "\n".join(lines) + "\n"


def test_doc_lists_every_case():
    assert DOC.read_text() == render_doc(), "docs/checks.md is stale: run python tests/test_settings_table.py"


# ---- kernels=liger on a GPU host (described, not detected): the package and the model type ----

GPU = Machine(gpus=1)


def test_liger_without_the_package_names_the_install(monkeypatch, tmp_path):
    from qfsdp import settings

    monkeypatch.setattr(settings, "liger_import_error", lambda: "ModuleNotFoundError: No module named 'liger_kernel'")
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["kernels=liger"]), GPU)
    message = str(e.value)
    assert "\n" not in message and "pip install liger-kernel" in message and "kernels=none" in message, message


@pytest.mark.parametrize("overrides, keeps, fix", [
    (("compile=true", "fsdp2.checkpointed_layers=20"), "fsdp2.checkpointed_layers=20", "fsdp2.checkpointed_layers=all"),
    (("fsdp2.activation_checkpointing=false",),  # compile is the GPU default
     "fsdp2.activation_checkpointing=false", "fsdp2.activation_checkpointing=true"),
    (("compile=true",), None, None),  # every layer recomputes: only the layers' inputs are offloaded
    (("compile=true", "fsdp2.checkpointed_layers=auto"), None, None),  # auto then recomputes every layer
    (("compile=false", "fsdp2.checkpointed_layers=20"), None, None),
    (("fsdp2=offload", "fsdp2.checkpointed_layers=20"), None, None),  # compile's default is off with offload
])
def test_activation_offloading_under_compile_needs_every_layer_recomputing(overrides, keeps, fix):
    """On a GPU (1 x H100, 2026-12-08, tree of 421721b) TRL 1.16's offloading failed in the backward of compiled
    layers that keep their activations: a saved key came back contiguous where the compiled code asserts its strides."""
    cfg = compose_config(["model=llama3_1_8b", "model.random_init=true", "fsdp2.checkpointed_layers=all",
                          "trainer.activation_offloading=true", *overrides])
    if keeps is None:
        assert validate(cfg, Machine(gpus=1)) == 1
    else:
        with pytest.raises(ConfigError) as e:
            validate(cfg, Machine(gpus=1))
        assert f"with compile and {keeps} fails in the backward" in str(e.value)
        assert f"use {fix} (only the layers' inputs are then offloaded) or compile=false" in str(e.value)


def test_liger_on_a_model_other_than_llama_is_refused(monkeypatch):
    from qfsdp import settings

    monkeypatch.setattr(settings, "liger_import_error", lambda: None)
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["model=tiny_opt", "kernels=liger"]), GPU)
    assert "Llama models only" in str(e.value) and "opt" in str(e.value), str(e.value)
    # a Llama model with the package importable passes every check
    assert validate(compose_config(["kernels=liger"]), GPU) == 1


def test_liger_import_error_reports_the_missing_package():
    """Without liger-kernel (this development machine; GPU hosts carry it) the reason names the module; where Liger's
    Llama patch imports, there is no reason."""
    from qfsdp.settings import liger_import_error

    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert "liger_kernel" in liger_import_error()
        return
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
    except Exception:  # installed, but Triton or transformers refuse it: a reason, with the error's type
        assert "Error" in liger_import_error()
    else:
        assert liger_import_error() is None


# ---- as a user sees it: one line, exit code 2, no traceback, nothing left behind ----

@pytest.mark.parametrize("setting,needle", [
    ("dataset=jsonl", "dataset=jsonl needs dataset.path"),
    ("trainer.max_length=0", "trainer.max_length=0 must be at least 2"),
    ("lora.r=0", "lora.r=0 must be at least 1"),
])
def test_cli_one_line_no_traceback(tmp_path, setting, needle):
    started = time.monotonic()
    run_dir = tmp_path / "run"
    result = launch(setting, f"hydra.run.dir={run_dir}", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("qfsdp: error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (run_dir / "summary.json").exists()
    assert time.monotonic() - started < 60  # the process's imports included; the checks themselves take seconds


if __name__ == "__main__":
    DOC.write_text(render_doc())
    print(f"wrote {DOC}", file=sys.stderr)

"""Per-setting checks that run before anything is loaded (called from validate.py).

Hydra's schemas check types; these check values: ranges, choices, and companions a choice needs. The trainer's values
are also checked by building the real `SFTConfig` (TRL's and transformers' own checks), its errors reworded to name
the `trainer.<field>` they are about. Each failure is one line: the setting as written, what is wrong, the fix.
"""

from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from qfsdp.validate import ConfigError

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
QUANT_TYPES = ("nf4", "fp4")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
LORA_BIAS = ("none", "all", "lora_only")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
# Liger's patch for these model types is the one qfsdp applies (model.apply_kernels)
LIGER_MODEL_TYPES = ("llama",)


def _positive(v) -> bool:
    return v > 0


def _at_least(n) -> Callable[[Any], bool]:
    return lambda v: v >= n


def _fraction(v) -> bool:
    return 0 <= v < 1


# (setting, test, what it must be, example fix). Null values are skipped: for every optional field here null means
# "the library's default" or "off".
RANGES: list[tuple[str, Callable[[Any], bool], str, str]] = [
    ("seed", lambda v: 0 <= v < 2**32, "must be in [0, 2**32) (numpy's seed range)", "seed=42"),
    ("lora.r", _at_least(1), "must be at least 1 (the LoRA rank)", "lora.r=16"),
    ("lora.lora_alpha", _positive, "must be positive (updates are scaled by lora_alpha / r)", "lora.lora_alpha=32"),
    ("lora.lora_dropout", _fraction, "must be in [0, 1)", "lora.lora_dropout=0.05"),
    ("dataset.max_samples", _at_least(1), "must be at least 1, or null for every example", "dataset.max_samples=null"),
    ("trainer.learning_rate", _positive, "must be positive", "trainer.learning_rate=2e-4"),
    ("trainer.max_length", _at_least(2), "must be at least 2 tokens (one to predict from, one to predict), or null "
                                         "for no truncation", "trainer.max_length=1024"),
    ("trainer.warmup_steps", _at_least(0), "must be at least 0 (steps, or a fraction of max_steps below 1)",
     "trainer.warmup_steps=0"),
    ("trainer.weight_decay", _at_least(0), "must be at least 0", "trainer.weight_decay=0.0"),
    ("trainer.max_grad_norm", _at_least(0), "must be at least 0 (0 = no clipping)", "trainer.max_grad_norm=1.0"),
    ("trainer.adam_beta1", _fraction, "must be in [0, 1)", "trainer.adam_beta1=0.9"),
    ("trainer.adam_beta2", _fraction, "must be in [0, 1)", "trainer.adam_beta2=0.999"),
    ("trainer.adam_epsilon", _positive, "must be positive", "trainer.adam_epsilon=1e-8"),
    ("trainer.logging_steps", _positive, "must be positive (steps, or a fraction of max_steps below 1)",
     "trainer.logging_steps=1"),
    ("trainer.eval_steps", _positive, "must be positive, or null to follow logging_steps", "trainer.eval_steps=50"),
    ("trainer.dataloader_num_workers", _at_least(0), "must be at least 0 (0 = load in the training process)",
     "trainer.dataloader_num_workers=0"),
    ("trainer.dataset_num_proc", _at_least(1), "must be at least 1, or null for one process",
     "trainer.dataset_num_proc=null"),
    ("trainer.neftune_noise_alpha", _at_least(0), "must be at least 0, or null for no NEFTune noise",
     "trainer.neftune_noise_alpha=5"),
    ("trainer.num_train_epochs", _positive, "must be positive", "trainer.num_train_epochs=1"),
]


def check_settings(cfg: DictConfig) -> None:
    """Each setting on its own (ranges, choices) and the companions a choice needs, before the checks that read
    files or build models: those would otherwise report a bad value as a problem with something else (a LoRA rank of
    0 as "target modules match no module")."""
    _check_companions(cfg)
    _check_choices(cfg)
    for setting, test, must, example in RANGES:
        if setting.startswith("lora.") and not cfg.lora.enabled:
            continue
        value = OmegaConf.select(cfg, setting)
        if value is not None and not test(value):
            raise ConfigError(f"{setting}={value} {must}; e.g. {example}")


def _check_companions(cfg: DictConfig) -> None:
    if not cfg.model.path:  # "" would be read as the current directory
        raise ConfigError("model.path is empty; give a hub id, a model directory, or model=tiny")
    ds = cfg.dataset
    from qfsdp.data import BUNDLED

    # every dataset but the bundled samples and synthetic reads its rows from dataset.path
    needs_path = ds.name not in BUNDLED and ds.name != "synthetic"
    if needs_path and (OmegaConf.is_missing(ds, "path") or not ds.path):
        what = "a hub dataset id" if ds.name == "hub" else "a local file or directory"
        if ds.name not in ("jsonl", "local", "hub"):
            what += ", or dataset=sample|sample_chat|synthetic"
        setting = f"dataset={ds.name}" if ds.name in ("jsonl", "local", "hub") else f"dataset.name={ds.name}"
        raise ConfigError(f"{setting} needs dataset.path (none given); add dataset.path=... ({what})")
    if ds.name not in ("synthetic",) and not ds.text_field:
        raise ConfigError("dataset.text_field is empty; name the field holding the text, e.g. dataset.text_field=text")
    if ds.name not in ("synthetic",) and not ds.split:
        raise ConfigError("dataset.split is empty; name the split to train on, e.g. dataset.split=train")


def _one_of(setting: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{setting}={value} is not one of {', '.join(allowed)}; use e.g. {setting}={allowed[0]}")


def _check_choices(cfg: DictConfig) -> None:
    m = cfg.model
    if "/" not in m.attn_implementation:  # "org/kernel": a hub attention kernel, which transformers resolves
        _one_of("model.attn_implementation", m.attn_implementation, ATTENTION)
    if m.architecture is not None:
        _one_of("model.architecture", m.architecture, sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json")))
    if m.tokenizer not in (None, "tiny") and m.tokenizer.startswith(("/", "./", "../", "~")):
        if not Path(m.tokenizer).expanduser().exists():
            raise ConfigError(f"model.tokenizer={m.tokenizer} does not exist; give a tokenizer directory, a hub id, "
                              f"or null for the model's own")
    if cfg.quant.enabled:
        _one_of("quant.quant_type", cfg.quant.quant_type, QUANT_TYPES)
        _one_of("quant.storage", cfg.quant.storage, QUANT_STORAGE)
    if cfg.lora.enabled:
        _one_of("lora.bias", cfg.lora.bias, LORA_BIAS)
        targets = cfg.lora.target_modules
        if targets is None or (isinstance(targets, (ListConfig, list, str)) and len(targets) == 0):
            raise ConfigError("lora.target_modules is empty; use lora.target_modules=all-linear or a list such as "
                              "[q_proj,v_proj]")
    t = cfg.trainer
    if t.packing:
        _one_of("trainer.packing_strategy", t.packing_strategy, PACKING_STRATEGIES)
    _check_report_to(t.report_to)


def _check_report_to(report_to: Any) -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    allowed = ["none", "all", *INTEGRATION_TO_CALLBACK]
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    for name in names:
        if name is not None and name not in allowed:
            raise ConfigError(f"trainer.report_to={name} is not a known integration; use one of "
                              f"{', '.join(allowed)}, e.g. trainer.report_to=tensorboard")


# ---- activation offloading ----

def check_activation_offloading(cfg: DictConfig, gpus: int) -> None:
    """trainer.activation_offloading (TRL's): saved activations go to pinned host memory on a side CUDA stream. TRL
    builds it for the machine's accelerator, which a CPU process has none of: it would fail after loading. TRL
    (1.16) hands non-contiguous saved tensors back contiguous, which a compiled layer's backward refuses (its
    strides are asserted), so under compile every layer must recompute: then only the layers' inputs are saved."""
    if not cfg.trainer.get("activation_offloading"):
        return
    if gpus == 0:
        raise ConfigError("trainer.activation_offloading=true copies activations from a GPU to host memory and no GPU "
                          "is visible; use trainer.activation_offloading=false on CPU")
    from qfsdp.config import compile_enabled

    # Before any GPU is queried: compile's default as on every GPU it supports (an older one would run eager, and
    # the message offers compile=false).
    if not compile_enabled(cfg, "cuda", capability=(7, 0)):
        return
    fsdp2 = cfg.fsdp2
    if not fsdp2.activation_checkpointing:
        keeps, fix = "fsdp2.activation_checkpointing=false", "fsdp2.activation_checkpointing=true"
    elif fsdp2.checkpointed_layers not in ("auto", "all", None):
        keeps, fix = f"fsdp2.checkpointed_layers={fsdp2.checkpointed_layers}", "fsdp2.checkpointed_layers=all"
    else:
        return
    raise ConfigError(f"trainer.activation_offloading=true with compile and {keeps} fails in the backward: TRL hands "
                      f"the compiled layers' saved tensors back in other strides; use {fix} (only the layers' inputs "
                      f"are then offloaded) or compile=false")


# ---- attention ----

# Attention implementations that train only on a GPU, and why.
GPU_ONLY_ATTENTION = {
    "flash_attention_2": "runs flash-attn's CUDA kernels",
    "flash_attention_3": "runs flash-attn 3's CUDA kernels",
    "flex_attention": "has no CPU kernel for its backward (FlexAttention)",
}


def check_attention(cfg: DictConfig, gpus: int) -> None:
    """model.attn_implementation: one that trains only on a GPU is refused without one, before loading (on CPU,
    FlexAttention fails at the first backward)."""
    why = GPU_ONLY_ATTENTION.get(cfg.model.attn_implementation)
    if why is not None and gpus == 0:
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation} {why} and no GPU is visible; "
                          f"use model.attn_implementation=sdpa on CPU")


# ---- fused kernels ----

def check_kernels(cfg: DictConfig, gpus: int) -> None:
    """kernels=liger: Triton kernels need a GPU and the liger-kernel package, and qfsdp applies Liger's Llama patch
    only. Checked here so that a missing package is not found after minutes of loading weights."""
    kernels = getattr(cfg.kernels, "value", cfg.kernels)
    if kernels != "liger":
        return
    if gpus == 0:
        raise ConfigError("kernels=liger runs Triton kernels on a GPU and none is visible; use kernels=none on CPU")
    problem = liger_import_error()
    if problem is not None:
        raise ConfigError(f"kernels=liger needs the liger-kernel package, which does not import here ({problem}); "
                          f"pip install liger-kernel==0.8.5, or use kernels=none")
    model_type = _model_type(cfg)
    if model_type is not None and model_type not in LIGER_MODEL_TYPES:
        raise ConfigError(f"kernels=liger applies to Llama models only, but model.path={cfg.model.path} is a "
                          f"{model_type} model; use kernels=none")


def liger_import_error() -> str | None:
    """Why Liger's Llama patch does not import (None when it does). The import is the one model.apply_kernels makes:
    it loads Triton and checks the transformers version, which a broken install fails only then."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
    except Exception as e:  # ImportError, or Triton failing to initialize
        return " ".join(f"{type(e).__name__}: {e}".split())[:200]
    return None


def _model_type(cfg: DictConfig) -> str | None:
    from qfsdp.model import load_config

    try:
        return load_config(cfg.model).model_type
    except OSError:
        return None  # no config reachable yet (hub id offline): loading reports it


# ---- the trainer's own checks ----

def check_trainer_config(cfg: DictConfig, world_size: int) -> None:
    """Build the run's real SFTConfig (CPU, a throwaway output directory it never writes to): TRL's and
    transformers' __post_init__ checks fail here instead of after the model has loaded."""
    from qfsdp.train import sft_config

    with tempfile.TemporaryDirectory(prefix="qfsdp-validate-") as tmp, _no_device_setup():
        try:
            sft_config(cfg, Path(tmp), world_size, use_cpu=True)
        except (ValueError, TypeError) as e:
            raise ConfigError(trainer_error(cfg.trainer, e)) from None


@contextmanager
def _no_device_setup():
    """TrainingArguments.__post_init__ sets up devices: accelerate's process-wide PartialState (cpu, from use_cpu),
    and under torchrun a process group. The worker's own SFTConfig must be the first to do that, so here the device
    setup is skipped (it checks nothing about the settings)."""
    import torch
    from transformers import TrainingArguments

    original = TrainingArguments.__dict__["_setup_devices"]
    TrainingArguments._setup_devices = property(lambda self: torch.device("cpu"))
    try:
        yield
    finally:
        TrainingArguments._setup_devices = original


def trainer_error(trainer: DictConfig, error: Exception) -> str:
    """One line naming the trainer.<field> a library error is about: the first field named in its message, else the
    first field whose (non-default) value it quotes."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 1000 else text[:997] + "..."  # whole lists of choices fit
    field = _field_named(trainer, text) or _field_quoted(trainer, text)
    if field is None:
        return f"the trainer settings were refused by TRL/transformers: {text}; fix the trainer.* setting it names"
    return f"trainer.{field}={trainer[field]} was refused: {text}; change trainer.{field}"


def _field_named(trainer: DictConfig, text: str) -> str | None:
    hits = [(m.start(), name) for name in trainer
            if (m := re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text))]
    return min(hits)[1] if hits else None


def _field_quoted(trainer: DictConfig, text: str) -> str | None:
    from qfsdp.config import TrainerConfig

    defaults = TrainerConfig()
    for name in trainer:
        value = trainer[name]
        if value != getattr(defaults, name, None) and isinstance(value, str) and len(value) >= 3 and re.search(rf"(?<![\w]){re.escape(value)}(?![\w])", text):
            return name
    return None

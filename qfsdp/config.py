"""Typed configuration: one dataclass per concern, registered in Hydra's ConfigStore.

The YAML files under `conf/` extend these schemas (each names its schema in its defaults list), so a misspelled key
or a value of the wrong type fails when Hydra composes the config, naming the key, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class ModelConfig:
    # "tiny" builds a small random Llama locally (cached); anything else is a hub id or a local directory.
    path: str = "tiny"
    # Build the architecture from its config with random weights: no weight download (benchmarks, offline hosts).
    random_init: bool = False
    # With random_init: write the random weights to a checkpoint in qfsdp's cache first and load it like a real one
    # (the bench does, so its stock-recipe rows load the same weights). false: each layer is drawn on its device from
    # `seed`, quantized and sharded before the next; nothing is written (any model size).
    random_checkpoint: bool = False
    # Architecture config bundled with qfsdp (qfsdp/architectures/<name>.json): with random_init it replaces the
    # path's own config, so random-weight runs need no hub access.
    architecture: Optional[str] = None
    # Tokenizer: null = the model path's own; "tiny" = the locally built one (fine for random-weight models).
    tokenizer: Optional[str] = None
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    # Set every dropout probability of the model's config (OPT ships 0.1); null keeps the checkpoint's. With dropout
    # on, runs at 1 and N processes draw different masks, so their losses differ.
    dropout: Optional[float] = None


@dataclass
class QuantConfig:
    enabled: bool = True
    quant_type: str = "nf4"
    # Quantize the block scales too: ~0.4 bit/parameter less for a little compute.
    double_quant: bool = True
    # Storage dtype of the packed 4-bit bytes. uint8 is gathered byte-exact by FSDP2; bfloat16 matches checkpoints
    # saved by the accelerate recipe.
    storage: str = "uint8"


@dataclass
class LoraConfig:
    enabled: bool = True
    # Adapter rank: higher = more capacity and memory.
    r: int = 16
    # Scale = lora_alpha / r.
    lora_alpha: int = 32
    # Dropout on the adapter input; > 0 regularizes small datasets.
    lora_dropout: float = 0.0
    # PEFT's own names; "all-linear" = every attention and MLP projection (not the output head).
    target_modules: Any = "all-linear"
    bias: str = "none"


@dataclass
class FSDP2Config:
    enabled: bool = True
    # Free each unit's gathered weights after its forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True
    # Each unit's forward starts the next unit's all-gather: it overlaps compute even when the host is barely ahead
    # of the device; two units' gathered weights at a time.
    forward_prefetch: bool = True
    # Consecutive decoder layers per FSDP2 unit: fewer units, less host work per step; each unit is held whole while
    # it runs, so more memory. At or above the layer count: one unit, never resharded.
    layers_per_unit: int = 1
    # Frozen weights' shards in CPU memory: least device memory, slower steps. LoRA weights, their gradients and
    # optimizer state stay on the device (full fine-tuning offloads everything).
    offload: bool = False
    # Recompute each decoder layer's activations in backward (much less memory, ~1/3 more compute).
    activation_checkpointing: bool = True
    # With checkpointing: how many decoder layers recompute, from the first: "auto" = as many as this GPU's memory
    # (or gpu_memory_limit_gib) needs, the rest keep their activations and skip the recompute (qfsdp/activations.py;
    # every layer on CPU, with LoRA dropout, with fsdp2=off); "all"; or a number (~0.9 GiB a layer for 8B at micro
    # batch 4 x 2048 tokens, compiled).
    checkpointed_layers: Any = "auto"
    # HSDP replica groups: 1 = shard across all processes; R > 1 = shard within groups of world_size / R processes,
    # replicate across them (R = nodes: only the gradient all-reduce crosses nodes).
    replicate: int = 1


@dataclass
class PrecisionConfig:
    # Compute dtype: parameters are gathered in it; gradients are reduced in float32; LoRA weights stay float32.
    dtype: str = "bfloat16"
    # fp16 only: scale the loss so small gradients survive float16.
    loss_scaling: bool = False


class DatasetFormat(Enum):
    """TRL's dataset formats: `auto` finds it from the rows' fields as TRL does."""

    auto = "auto"
    text = "text"  # language modeling: one text per row (dataset.text_field)
    messages = "messages"  # conversational: a list of {role, content}, rendered with the tokenizer's chat template
    prompt_completion = "prompt_completion"  # `prompt` and `completion`, both text or both lists of messages


class SyntheticLengths(Enum):
    fixed = "fixed"  # every sequence dataset.seq_length tokens
    # log-normal around dataset.median_length (spread dataset.length_sigma), cut at dataset.seq_length: the long tail
    # of instruction data, so padding and packing cost what they cost on real data
    lognormal = "lognormal"


class Kernels(Enum):
    none = "none"  # the model's own PyTorch modules
    # Liger Kernel's Triton RMSNorm, SwiGLU and RoPE on Llama models (GPU only). Not its fused linear cross-entropy:
    # TRL's SFTTrainer already runs the head and loss in chunks (its fused LM head) and refuses Liger's.
    liger = "liger"


@dataclass
class DatasetConfig:
    name: str = "sample"
    # A local file (.jsonl, .json, .parquet), a directory saved with `datasets`, or a hub id; unused for the bundled
    # samples and synthetic.
    path: Optional[str] = None
    data_files: Optional[str] = None
    split: str = "train"
    format: DatasetFormat = DatasetFormat.auto
    text_field: str = "text"
    # Keep at most this many examples (null = all).
    max_samples: Optional[int] = None
    # Hold out this many examples (drawn with the seed) as the evaluation set, for trainer.eval_strategy=steps|epoch.
    eval_samples: int = 0
    # Or hold out this share of the examples (0 < f < 1, drawn with the seed, so the same on every rank).
    eval_fraction: Optional[float] = None
    # Or evaluate on another split of a dataset that has splits (validation, test[:200]); not for a single file.
    eval_split: Optional[str] = None
    # synthetic only: number of sequences and their length in tokens (the longest, with lengths=lognormal).
    num_samples: int = 256
    seq_length: int = 128
    lengths: SyntheticLengths = SyntheticLengths.fixed
    median_length: int = 256
    length_sigma: float = 1.0


# qfsdp's own choices for SFTConfig fields; every other field keeps TRL's default.
TRAINER_DEFAULTS: dict[str, Any] = dict(
    per_device_train_batch_size=2,
    max_steps=30,
    num_train_epochs=1.0,
    learning_rate=2e-4,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    # transformers' own default on torch >= 2.8 (so the stock recipe's too): one fused op per parameter group
    # instead of a dozen foreach ops.
    optim="adamw_torch_fused",
    logging_steps=1,
    # Off, unlike transformers' default: with it on, a NaN or inf loss is logged as the average of earlier losses
    # (a diverged fp16 run would look healthy), and checking each micro-step's loss makes the CPU wait for the GPU.
    logging_nan_inf_filter=False,
    max_length=256,
    packing=False,
    dataloader_num_workers=0,
    # "none", "tensorboard", "wandb" or a list of them, written into the run directory (see progress.py).
    report_to="none",
    disable_tqdm=False,
    # Mid-run checkpoints (docs/checkpoints.md): off unless asked; "steps" saves every save_steps optimizer steps.
    save_strategy="no",
)

# SFTConfig fields that qfsdp sets itself (train.sft_config), each with what to do instead. They stay in the schema
# (null) so that setting one fails before loading with this advice (validate.py) rather than as an unknown key.
_PRECISION = "use precision=bf16|fp16|fp32 instead"
_CHECKPOINTING = "use fsdp2.activation_checkpointing=true|false instead"
_COMPILE = "use compile=true instead (qfsdp compiles each decoder layer)"
_SHARDING = "qfsdp shards the model with FSDP2 itself: use fsdp2=default|offload|no_reshard|hsdp|off and world_size=N"
OWNED_TRAINER_FIELDS: dict[str, str] = {
    "output_dir": "use hydra.run.dir=DIR instead (the trainer writes into DIR/trainer)",
    "gradient_accumulation_steps": "use trainer.global_batch_size=N instead (accumulation follows from it, the micro "
                                   "batch and world_size)",
    "seed": "use seed=N instead",
    "data_seed": "use seed=N instead",
    "bf16": _PRECISION,
    "fp16": _PRECISION,
    "activation_checkpointing": _CHECKPOINTING,
    "activation_checkpointing_kwargs": _CHECKPOINTING,
    "gradient_checkpointing": _CHECKPOINTING,
    "gradient_checkpointing_kwargs": _CHECKPOINTING,
    "torch_compile": _COMPILE,
    "torch_compile_backend": _COMPILE,
    "torch_compile_mode": _COMPILE,
    "full_determinism": "use deterministic=true instead",
    "use_cpu": "the device follows the machine: GPUs when visible (CUDA_VISIBLE_DEVICES= for CPU processes)",
    "save_only_model": "qfsdp saves optimizer, scheduler and RNG states itself (docs/checkpoints.md)",
    "logging_strategy": "use trainer.logging_steps=N instead",
    "dataset_text_field": "use dataset.text_field=FIELD instead",
    "fsdp": _SHARDING,
    "fsdp_config": _SHARDING,
    "deepspeed": _SHARDING,
    "parallelism_config": _SHARDING,
    "local_rank": "torchrun sets each rank: use world_size=N",
    "model_init_kwargs": "qfsdp loads the model itself: use model.<key>=...",
    "trust_remote_code": "use model.trust_remote_code=true instead",
    # Trainer would apply Liger to the LoRA-wrapped model, after qfsdp's own choice of kernels
    "use_liger_kernel": "use kernels=liger instead (applied before LoRA and sharding)",
    "liger_kernel_config": "use kernels=liger instead (applied before LoRA and sharding)",
}


def _omegaconf_type(tp: Any) -> Any:
    """The closest type OmegaConf can check for an SFTConfig field's annotation (Any where it has none)."""
    if tp in (bool, int, float, str):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        # transformers' `SchedulerType | str` and the like: an enum of strings, or any string
        if len(rest) == 2 and str in rest and any(isinstance(a, type) and issubclass(a, Enum) for a in rest):
            rest = [str]
        if len(rest) != 1:
            return Any
        inner = _omegaconf_type(rest[0])
        return Optional[inner] if len(rest) < len(args) and inner is not Any else inner
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        return list[str]
    return Any


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _trainer_schema() -> type:
    """`TrainerConfig`: every field of the installed TRL's `SFTConfig`, under its own name and type, with qfsdp's
    defaults; `global_batch_size` first; the fields qfsdp sets itself as null placeholders (OWNED_TRAINER_FIELDS)."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    specs: list[tuple] = [("global_batch_size", int, field(default=8))]
    for f in dataclasses.fields(SFTConfig):
        if not f.init:
            continue
        if f.name in OWNED_TRAINER_FIELDS:
            specs.append((f.name, Any, field(default=None)))
            continue
        if f.name in TRAINER_DEFAULTS:
            default = TRAINER_DEFAULTS[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _plain(f.default)
        if isinstance(default, (list, dict)):
            specs.append((f.name, _omegaconf_type(hints[f.name]), field(default_factory=lambda d=default: d.copy())))
        else:
            specs.append((f.name, _omegaconf_type(hints[f.name]), field(default=default)))
    schema = dataclasses.make_dataclass("TrainerConfig", specs)
    schema.__module__ = __name__
    schema.__doc__ = ("`SFTConfig` fields under their own names (generated from the installed TRL), plus "
                      "`global_batch_size` (sequences per optimizer step).")
    return schema


TrainerConfig = _trainer_schema()


def owned_trainer_field_error(trainer: DictConfig) -> str | None:
    """The advice for the first SFTConfig field qfsdp sets itself that the config sets too (None if none is)."""
    for name, instead in OWNED_TRAINER_FIELDS.items():
        if trainer.get(name) is not None:
            return f"trainer.{name} is set by qfsdp itself; {instead}"
    return None


@dataclass
class Config:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    lora: LoraConfig = MISSING
    fsdp2: FSDP2Config = MISSING
    precision: PrecisionConfig = MISSING
    dataset: DatasetConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # torch.compile each decoder layer (its parts under activation checkpointing; shard.compile_layer): slower start,
    # faster steps. null: on for QLoRA on GPUs without CPU offload, where it was measured faster at the same memory
    # (docs/BENCHMARKS.md); off on CPU, with offload and for full fine-tuning. `compile_enabled` resolves it.
    compile: Optional[bool] = None
    # Fused GPU kernels for the model's norms, MLP activation and rotary embedding (Kernels above); applied before
    # LoRA is attached and the model is sharded.
    kernels: Kernels = Kernels.none
    seed: int = 42
    # Processes (GPUs, or CPU processes when there is no GPU). null = every visible GPU, or 1 without GPUs.
    world_size: Optional[int] = None
    # Deterministic GPU kernels, strict (an op without one stops the run): the same run twice gives the same losses,
    # so configurations compare below run-to-run noise. Slower. With compile=true, Inductor keeps eager's rounding
    # and the norms stay eager (shard.compile_layer); docs/design.md.
    deterministic: bool = False
    # Cap every GPU's memory for this run, in GiB (e.g. 15 to behave like a 16 GB Tesla T4); null = no cap.
    # Ignored on CPU.
    gpu_memory_limit_gib: Optional[float] = None
    # Profile optimizer steps 4-5 with torch.profiler on rank 0 -> profile.txt in the run directory (on GPUs also
    # trace.json.gz, and a table of GPU idle time by CPU cause).
    profile: bool = False
    # Continue a run from a checkpoint: "auto" = the newest complete one in this run directory (a fresh start when
    # there is none), or a checkpoint's path (docs/checkpoints.md). null = a fresh run.
    resume: Optional[str] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="qfsdp_config", node=Config)
    for group, schema in [
        ("model", ModelConfig),
        ("quant", QuantConfig),
        ("lora", LoraConfig),
        ("fsdp2", FSDP2Config),
        ("precision", PrecisionConfig),
        ("dataset", DatasetConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=schema)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The job config `python launch.py OVERRIDES` would compose (for tools, scripts and tests)."""
    from hydra import compose, initialize_config_dir

    from qfsdp.rundir import register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def compile_enabled(cfg, device_type: str, capability: tuple[int, int] | None = None) -> bool:
    """`compile` as set, or its default: on for QLoRA (4-bit base, LoRA) on GPUs without CPU offload, the setting
    it was measured faster in; off elsewhere until measured there, and on GPUs Triton does not support (compute
    capability below 7.0). `capability`: the GPU's, queried when None."""
    if cfg.compile is not None:
        return bool(cfg.compile)
    if device_type != "cuda" or cfg.fsdp2.offload or not (cfg.quant.enabled and cfg.lora.enabled):
        return False
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability()
    return tuple(capability) >= (7, 0)

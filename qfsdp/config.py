"""Typed configuration: one dataclass per concern, registered in Hydra's ConfigStore.

The YAML files under `conf/` extend these schemas (each names its schema in its defaults list), so a misspelled key
or a value of the wrong type fails when Hydra composes the config, naming the key, before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # Architecture config bundled with qfsdp (qfsdp/architectures/<name>.json): with random_init it replaces the
    # path's own config, so random-weight runs need no hub access.
    architecture: Optional[str] = None
    # Tokenizer: null = the model path's own; "tiny" = the locally built one (fine for random-weight models).
    tokenizer: Optional[str] = None
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


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
    # HSDP replica groups: 1 = shard across all processes; R > 1 = shard within groups of world_size / R processes,
    # replicate across them (R = nodes: only the gradient all-reduce crosses nodes).
    replicate: int = 1


@dataclass
class PrecisionConfig:
    # Compute dtype: parameters are gathered in it; gradients are reduced in float32; LoRA weights stay float32.
    dtype: str = "bfloat16"
    # fp16 only: scale the loss so small gradients survive float16.
    loss_scaling: bool = False


@dataclass
class DatasetConfig:
    name: str = "sample"
    # Hub id, local file or directory (jsonl/oig_chip2); unused for sample and synthetic.
    path: Optional[str] = None
    data_files: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    # Keep at most this many examples (null = all).
    max_samples: Optional[int] = None
    # synthetic only: number of sequences and their length in tokens.
    num_samples: int = 256
    seq_length: int = 128


@dataclass
class TrainerConfig:
    """`SFTConfig` fields under their own names, plus `global_batch_size` (sequences per optimizer step)."""

    global_batch_size: int = 8
    per_device_train_batch_size: int = 2
    max_steps: int = 30
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # transformers' own default on torch >= 2.8 (so the stock recipe's too): one fused op per parameter group
    # instead of a dozen foreach ops.
    optim: str = "adamw_torch_fused"
    logging_steps: int = 1
    # Off, unlike transformers' default: with it on, a NaN or inf loss is logged as the average of earlier losses
    # (a diverged fp16 run would look healthy), and checking each micro-step's loss makes the CPU wait for the GPU.
    logging_nan_inf_filter: bool = False
    max_length: Optional[int] = 256
    packing: bool = False
    dataloader_num_workers: int = 0
    # "none", "tensorboard", "wandb" or a list of them, written into the run directory (see progress.py). Any:
    # OmegaConf has no str-or-list type, and `trainer.report_to=tensorboard` must compose; transformers checks names.
    report_to: Any = "none"
    disable_tqdm: bool = False


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
    # faster steps.
    compile: bool = False
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

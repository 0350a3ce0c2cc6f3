"""Checks that run before any weights are loaded, each failing with one line naming the problem and the fix.

Hydra and the typed schemas already reject unknown options, misspelled keys and wrong types at compose time; these
are the checks that need the machine (GPUs) or the file system.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from qfsdp.config import owned_trainer_field_error
from qfsdp.tiny import TINY_ARCHITECTURES

DTYPES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ConfigError(ValueError):
    """A bad input, reported as one line before any work starts."""


@dataclass(frozen=True)
class Machine:
    """What the checks need to know about this machine (passed in, so tests can describe a GPU host)."""

    gpus: int
    bf16_supported: bool = True
    gpu_memory_gib: float | None = None  # each GPU's memory; None: unknown (no GPU)

    @classmethod
    def detect(cls) -> "Machine":
        import torch

        # device_count() and the device's properties create no CUDA context; bf16 support is checked again on the
        # GPU in the worker.
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) / 2**30 if gpus else None
        return cls(gpus=gpus, gpu_memory_gib=memory)


def resolve_world_size(cfg: DictConfig, machine: Machine, torchrun_world_size: int | None, slurm=None) -> int:
    if slurm is not None:  # a qfsdp.slurm.SlurmJob: the allocation fixes the world size
        return slurm.check_world_size(cfg.world_size)
    if torchrun_world_size is not None:
        if cfg.world_size is not None and cfg.world_size != torchrun_world_size:
            raise ConfigError(
                f"world_size={cfg.world_size} but torchrun started {torchrun_world_size} processes; "
                f"drop world_size= or make it match --nproc_per_node x --nnodes"
            )
        return torchrun_world_size
    if cfg.world_size is None:
        return max(machine.gpus, 1)
    if cfg.world_size < 1:
        raise ConfigError(f"world_size={cfg.world_size} must be at least 1")
    if machine.gpus and cfg.world_size > machine.gpus:
        raise ConfigError(
            f"world_size={cfg.world_size} but only {machine.gpus} GPU(s) are visible; "
            f"use world_size={machine.gpus} or fewer (or set CUDA_VISIBLE_DEVICES)"
        )
    return cfg.world_size


def validate(cfg: DictConfig, machine: Machine, torchrun_world_size: int | None = None, slurm=None) -> int:
    """Run every pre-load check; return the world size the job will use (`slurm`: the qfsdp.slurm.SlurmJob this
    driver runs in, if any)."""
    world_size = resolve_world_size(cfg, machine, torchrun_world_size, slurm)
    _check_settings(cfg)
    _check_kernels(cfg, machine)
    _check_attention(cfg, machine)
    _check_activation_offloading(cfg, machine)
    _check_precision(cfg, machine)
    _check_parallelism(cfg, world_size)
    _check_batch(cfg, world_size)
    if (owned := owned_trainer_field_error(cfg.trainer)) is not None:
        raise ConfigError(owned)
    _check_trainer_config(cfg, world_size)
    _check_model_path(cfg)
    if cfg.model.dropout is not None and not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1), or null for the model's own")
    _check_dataset(cfg)
    lora_trained = _check_lora_targets(cfg)
    _check_saving(cfg)
    if cfg.gpu_memory_limit_gib is not None and cfg.gpu_memory_limit_gib <= 0:
        raise ConfigError(f"gpu_memory_limit_gib={cfg.gpu_memory_limit_gib} must be positive GiB, or null for no cap")
    _check_fits(cfg, machine, world_size, lora_trained)
    return world_size


def _check_settings(cfg: DictConfig) -> None:
    """Each value's range and choices first (qfsdp/settings.py): later checks would blame another setting."""
    from qfsdp.settings import check_settings

    check_settings(cfg)


def _check_kernels(cfg: DictConfig, machine: Machine) -> None:
    from qfsdp.settings import check_kernels

    check_kernels(cfg, machine.gpus)


def _check_attention(cfg: DictConfig, machine: Machine) -> None:
    from qfsdp.settings import check_attention

    check_attention(cfg, machine.gpus)


def _check_activation_offloading(cfg: DictConfig, machine: Machine) -> None:
    from qfsdp.settings import check_activation_offloading

    check_activation_offloading(cfg, machine.gpus)


def _check_trainer_config(cfg: DictConfig, world_size: int) -> None:
    """The real SFTConfig, built here so that TRL's and transformers' own checks run before loading."""
    from qfsdp.settings import check_trainer_config

    check_trainer_config(cfg, world_size)


def check_precision_on_device(dtype: str) -> None:
    """On the GPU itself (worker side): bf16 needs hardware support."""
    import torch

    if dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(_bf16_message(torch.cuda.get_device_name()))


def _bf16_message(gpu: str) -> str:
    return f"precision=bf16 but this GPU ({gpu}) has no bfloat16 support; use precision=fp16"


def _check_precision(cfg: DictConfig, machine: Machine) -> None:
    if cfg.precision.dtype not in DTYPES:
        raise ConfigError(f"precision.dtype={cfg.precision.dtype} is not one of {', '.join(DTYPES)}")
    if cfg.precision.dtype == "bfloat16" and machine.gpus and not machine.bf16_supported:
        raise ConfigError(_bf16_message("visible GPU"))
    if cfg.precision.loss_scaling and cfg.precision.dtype != "float16":
        raise ConfigError("precision.loss_scaling=true only applies to float16; use precision=fp16")


def _check_parallelism(cfg: DictConfig, world_size: int) -> None:
    if not cfg.fsdp2.enabled and world_size > 1:
        raise ConfigError(f"fsdp2=off runs one unsharded process but world_size={world_size}; "
                          f"use world_size=1, or fsdp2=default to shard")
    if cfg.fsdp2.layers_per_unit < 1:
        raise ConfigError(f"fsdp2.layers_per_unit={cfg.fsdp2.layers_per_unit} must be at least 1 (decoder layers per "
                          f"FSDP2 unit; 1 = one unit per layer)")
    replicate = cfg.fsdp2.replicate
    if replicate < 1:
        raise ConfigError(f"fsdp2.replicate={replicate} must be at least 1 (1 = plain FSDP, no replica groups)")
    if replicate > 1 and (not cfg.fsdp2.enabled or world_size % replicate):
        divisors = [r for r in range(1, world_size + 1) if world_size % r == 0]
        raise ConfigError(
            f"fsdp2.replicate={replicate} needs world_size to be a multiple of it (HSDP shards within groups of "
            f"world_size / replicate processes) but world_size={world_size}; use fsdp2.replicate="
            f"{' or '.join(map(str, divisors))}, or a world_size that is a multiple of {replicate}")
    _check_checkpointed_layers(cfg)
    if cfg.quant.enabled and not cfg.lora.enabled:
        raise ConfigError("lora=none (full fine-tuning) cannot train 4-bit weights; add quant=none")


def _check_checkpointed_layers(cfg: DictConfig) -> None:
    count = cfg.fsdp2.checkpointed_layers
    if count in ("auto", "all", None):  # null: all, as before "auto" existed
        return
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError(f"fsdp2.checkpointed_layers={count} must be auto, all or a number of decoder layers")
    if not cfg.fsdp2.activation_checkpointing:
        raise ConfigError(f"fsdp2.checkpointed_layers={count} needs fsdp2.activation_checkpointing=true "
                          f"(or leave it auto)")
    from qfsdp.model import load_config

    try:
        layers = getattr(load_config(cfg.model).get_text_config(), "num_hidden_layers", None)
    except OSError:  # a hub id offline: loading reports it
        layers = None
    if count < 0 or (layers is not None and count > layers):
        raise ConfigError(f"fsdp2.checkpointed_layers={count} must be from 0 to the model's {layers or 'number of'} "
                          f"decoder layers (or auto, or all)")


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step, so that the global batch is the same whatever the world size."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"trainer.global_batch_size={global_batch} is not a multiple of per_device_train_batch_size * world_size "
            f"= {micro_batch} * {world_size} = {per_step}; pick a global batch divisible by {per_step}"
        )
    return global_batch // per_step


def _check_batch(cfg: DictConfig, world_size: int) -> None:
    t = cfg.trainer
    for key in ("global_batch_size", "per_device_train_batch_size", "max_steps"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key}={t[key]} must be at least 1")
    try:
        gradient_accumulation_steps(t.global_batch_size, t.per_device_train_batch_size, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_saving(cfg: DictConfig) -> None:
    from qfsdp.checkpoint import check_save_settings

    check_save_settings(cfg)


def _is_local_path(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.sep in path and not _HUB_ID.match(path)


def _check_model_path(cfg: DictConfig) -> None:
    path = cfg.model.path
    if path in TINY_ARCHITECTURES:
        return
    if Path(path).expanduser().exists():
        if not (Path(path).expanduser() / "config.json").is_file():
            raise ConfigError(f"model.path={path} has no config.json; point it at a Hugging Face model directory")
        return
    if _is_local_path(path) or not _HUB_ID.match(path):
        raise ConfigError(
            f"model.path={path} does not exist; give an existing model directory or a hub id such as "
            f"unsloth/Meta-Llama-3.1-8B"
        )


def _check_dataset(cfg: DictConfig) -> None:
    """Every row of local data in one of TRL's formats, and what the trainer settings need of it (qfsdp/data.py)."""
    from qfsdp.data import DatasetError, check_before_load
    from qfsdp.model import load_tokenizer

    try:
        check_before_load(cfg, lambda: load_tokenizer(cfg.model))
    except DatasetError as e:
        raise ConfigError(str(e)) from None


def _meta_model(cfg: DictConfig):
    """A weightless (meta-device) copy of the model, or None when its config is not reachable yet (a hub id offline:
    loading reports it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qfsdp.model import load_config

    try:
        config = load_config(cfg.model)
    except OSError:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def _check_lora_targets(cfg: DictConfig) -> int | None:
    """Attach the LoRA config to a weightless (meta-device) copy of the model: PEFT itself says if nothing matches.
    Returns the number of trained (LoRA) parameters, for `memory_need` (attaching takes seconds at 70B)."""
    if not cfg.lora.enabled:
        return None
    import torch
    from peft import get_peft_model

    from qfsdp.model import peft_lora_config

    if (model := _meta_model(cfg)) is None:
        return None
    try:
        peft_model = get_peft_model(model, peft_lora_config(cfg.lora))
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"lora.target_modules={list(cfg.lora.target_modules) if not isinstance(cfg.lora.target_modules, str) else cfg.lora.target_modules} "
            f"matches no module of {type(model).__name__} ({str(e).splitlines()[0][:120]}); "
            f"its linear modules are: {', '.join(linear)}"
        ) from None
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class MemoryNeed:
    """What every GPU holds for the whole run, in bytes, before activations (counted from the model's config)."""

    packed_4bit: int  # packed 4-bit bytes, all ranks together
    unquantized: int  # frozen weights left unquantized (embeddings, head, norms) in the compute dtype
    quant_stats: int  # 4-bit quantization statistics, all ranks together (sharded like the packed bytes)
    trained: int  # trained weights, their gradients and AdamW state (float32: 16 bytes each), all ranks together
    shard_size: int  # processes that share one copy

    @property
    def sharded_weights(self) -> int:
        return self.packed_4bit + self.quant_stats + self.unquantized

    @property
    def per_gpu(self) -> float:
        return (self.sharded_weights + self.trained) / self.shard_size


def memory_need(cfg: DictConfig, world_size: int, lora_trained: int | None = None) -> MemoryNeed | None:
    """The arithmetic of `_check_fits`, from a meta-device copy of the model (no weights loaded). `lora_trained`:
    the LoRA parameter count if known (`_check_lora_targets`), else counted here."""
    import torch

    from qfsdp.model import bnb_config, checkpoint_dtype, linears_to_quantize, peft_lora_config

    model = _meta_model(cfg)
    if model is None:
        return None
    compute = getattr(torch, cfg.precision.dtype)
    quantized, stats = 0, 0
    if cfg.quant.enabled:
        from qfsdp.config import QuantConfig

        quant = bnb_config(QuantConfig(**cfg.quant), compute)
        for name in linears_to_quantize(model, quant):
            n = model.get_submodule(name).weight.numel()
            quantized += n
            # bitsandbytes' statistics per 64-weight block: a float32 absmax, or with double quantization one byte
            # plus, per 256 blocks, a float32 (and one float32 offset per weight)
            blocks = -(-n // 64)
            stats += blocks + 4 * -(-blocks // 256) + 4 if cfg.quant.double_quant else 4 * blocks
    total = sum(p.numel() for p in model.parameters())
    if cfg.lora.enabled and lora_trained is not None:
        trained, frozen_full = lora_trained, total - quantized
    elif cfg.lora.enabled:
        from peft import get_peft_model

        trained = sum(p.numel() for p in get_peft_model(model, peft_lora_config(cfg.lora)).parameters()
                      if p.requires_grad)
        frozen_full = total - quantized
    else:
        trained, frozen_full = total, 0
    itemsize = checkpoint_dtype(compute, not cfg.lora.enabled).itemsize
    return MemoryNeed(packed_4bit=quantized // 2, unquantized=frozen_full * itemsize, quant_stats=stats,
                      trained=trained * 16, shard_size=world_size // cfg.fsdp2.replicate if cfg.fsdp2.enabled else 1)


def _check_fits(cfg: DictConfig, machine: Machine, world_size: int, lora_trained: int | None = None) -> None:
    """Refuse a run whose weights, trained weights and optimizer state alone exceed each GPU's memory (or its
    `gpu_memory_limit_gib` cap) without offload: it would fail only after minutes of loading. Activations are not
    counted, so a run refused here cannot fit whatever its batch."""
    if cfg.fsdp2.offload:
        return
    limits = [v for v in (machine.gpu_memory_gib, cfg.gpu_memory_limit_gib) if v is not None]
    if not limits:
        return
    budget = min(limits) * 2**30
    need = memory_need(cfg, world_size, lora_trained)
    if need is None or need.per_gpu <= budget:
        return
    def gib(n: float) -> str:
        return f"{n / 2**30:.3g}"

    capped = cfg.gpu_memory_limit_gib is not None and min(limits) == cfg.gpu_memory_limit_gib
    what = f"gpu_memory_limit_gib={cfg.gpu_memory_limit_gib:g}" if capped else "each GPU"
    fixes = "fsdp2=offload"
    if cfg.fsdp2.enabled:
        gpus = -(-(need.sharded_weights + need.trained) // int(budget)) * cfg.fsdp2.replicate
        fixes += f", or at least {gpus} GPUs (world_size={gpus})"
    raise ConfigError(
        f"{cfg.model.path} needs {gib(need.per_gpu)} GiB per GPU before activations (frozen weights, 4-bit "
        f"statistics included, {gib(need.sharded_weights)} GiB / {need.shard_size} process(es) "
        f"+ trained weights, gradients and AdamW state {gib(need.trained)} GiB / {need.shard_size}) but {what} "
        f"allows {gib(budget)} GiB; use {fixes}")

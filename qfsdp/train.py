"""One training run on every rank: load, attach LoRA, shard, train with TRL's SFTTrainer, save.

Model setup, in order:
1. load the base model into CPU memory (linear layers as bitsandbytes 4-bit layers, not yet quantized), with fused
   kernels if asked (`kernels`);
2. attach LoRA with the same seed on every rank, and check the init is identical;
3. build the SFTTrainer (it tokenizes the data), then keep LoRA weights float32;
4. parallelize (shard.py): activation checkpointing (on as many layers as `fsdp2.checkpointed_layers` says, `auto`
   deciding from the GPU's memory and the tokenized rows before any layer reaches the GPU: activations.py), then
   unit by unit onto the device, quantized and sharded;
5. train; rank 0 writes metrics, the adapter, summary.json and loss.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers.distributed.configuration_utils import DistributedConfig
from trl import SFTConfig, SFTTrainer

from qfsdp import artifacts, checkpoint
from qfsdp.activations import GIB, CheckpointPlan, resolve_checkpointed_layers
from qfsdp.config import OWNED_TRAINER_FIELDS, compile_enabled
from qfsdp.data import check_loaded, is_synthetic, load_datasets, load_source, longest_row
from qfsdp.distributed import Dist, all_gather_object, check_trainable_same_on_all_ranks, data_parallel_mesh
from qfsdp.hostmem import LoadHostMemory, load_line
from qfsdp.metrics import MetricsCallback, memory_stats, reset_peak_memory
from qfsdp.model import (apply_kernels, attach_lora, base_model, load_config, load_model, load_tokenizer,
                         make_trainable_fp32)
from qfsdp.pauses import CollectAtStepEnd, no_collection_pauses
from qfsdp.profiling import ProfileCallback
from qfsdp.progress import append_to_run_log, attach
from qfsdp.shard import parallelize, quantized_bytes
from qfsdp.validate import gradient_accumulation_steps


def sft_config(cfg: DictConfig, run_dir: Path, world_size: int, use_cpu: bool) -> SFTConfig:
    fields = OmegaConf.to_container(cfg.trainer, resolve=True)
    global_batch = fields.pop("global_batch_size")
    for name in OWNED_TRAINER_FIELDS:
        fields.pop(name, None)  # null placeholders: validate.py refuses any other value
    return SFTConfig(
        output_dir=str(run_dir / "trainer"),
        gradient_accumulation_steps=gradient_accumulation_steps(global_batch, fields["per_device_train_batch_size"],
                                                                world_size),
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Precision is FSDP2's mixed-precision policy (see shard.py), not autocast: gathered weights are cast once
        # per layer. fp16 adds the loss scaler.
        bf16=False,
        fp16=bool(cfg.precision.loss_scaling),
        # Activation checkpointing is applied in shard.py, before sharding. (None: TRL's default would turn the
        # deprecated alias on.)
        activation_checkpointing=False,
        gradient_checkpointing=None,
        # Trainer would save the optimizer of a model sharded before it saw it as rank 0's shards alone, and refuses
        # to unless told to save the model only; checkpoint.CheckpointingTrainer saves optimizer, scheduler, scaler
        # and RNG states itself.
        save_only_model=True,
        logging_strategy="steps",
        use_cpu=use_cpu,
        # qfsdp.data renames the configured text field to "text"
        dataset_text_field="text",
        **fields,
    )


def run_training(cfg: DictConfig, run_dir: Path, d: Dist) -> tuple[dict, torch.nn.Module]:
    """Train on this rank; return the run summary and the trained (still sharded) model."""
    start = time.perf_counter()
    resume_from, previous_rows = resume_point(cfg, run_dir, d)
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.precision.dtype)
    full_finetune = not cfg.lora.enabled

    tokenizer = load_tokenizer(cfg.model)
    # The data first: bad rows (hub data is first seen here) stop the run before any weights load.
    raw = None if is_synthetic(cfg.dataset) else load_source(cfg.dataset)
    if raw is not None:
        check_loaded(raw, cfg, tokenizer)
    dataset, eval_dataset = load_datasets(cfg.dataset, load_config(cfg.model).vocab_size, cfg.seed, raw=raw)
    fsdp2 = OmegaConf.to_object(cfg.fsdp2)
    host_memory = LoadHostMemory()
    model = load_model(cfg.model, cfg.quant, dtype, full_finetune=full_finetune, seed=cfg.seed)
    apply_kernels(model, cfg.kernels)
    if cfg.lora.enabled:
        model = attach_lora(model, cfg.lora, cfg.seed)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if d.world_size > 1:
        check_trainable_same_on_all_ranks(model)

    args = sft_config(cfg, run_dir, d.world_size, use_cpu=d.device.type == "cpu")
    mesh = None
    if cfg.fsdp2.enabled:
        mesh = data_parallel_mesh(d.device.type, d.world_size, cfg.fsdp2.replicate)
        hand_sharded_model_to_trainer(model, d.world_size, replicate=cfg.fsdp2.replicate)
    callback = MetricsCallback(run_dir if d.is_main else None, d, time_origin=start, previous_rows=previous_rows)
    callbacks = [callback, CollectAtStepEnd(), *profile_callbacks(cfg, run_dir, d)]
    trainer_class = type("QfsdpTrainer", (checkpoint.CheckpointingTrainer, SFTTrainer), {})
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                            processing_class=tokenizer, callbacks=callbacks)
    trainer.setup_checkpointing(run_dir, cfg, d.is_main, on_save=callback.record_checkpoint)
    attach(trainer, callback, run_dir)  # progress bar with loss/tokens/s/memory; TensorBoard, wandb dirs
    make_trainable_fp32(model)
    # Planned on the rows as the trainer tokenized them, while no layer is on the GPU yet (parallelize moves them);
    # the plan's one-layer probe is not part of loading.
    longest = longest_row(trainer.train_dataset, trainer.args.pad_to_multiple_of)
    fsdp2.checkpointed_layers, plan = checkpointed_layers(cfg, d, run_dir, longest)
    reset_peak_memory(d.device)
    compiled = compile_enabled(cfg, d.device.type)
    parallelize(model, mesh, d.device, fsdp2, param_dtype=dtype, compile=compiled,
                deterministic=cfg.deterministic, fused_norms=getattr(cfg.kernels, "value", cfg.kernels) == "liger")
    # Loading ends once the model is on the device, quantized and sharded (see shard.py).
    load_memory = memory_stats(d.device)
    load_host_memory = all_gather_object(host_memory.stop())
    if d.is_main:
        append_to_run_log(run_dir, load_line(load_host_memory, load_host_memory[0]["host"]))
    qbytes = all_gather_object(quantized_bytes(model))
    reset_peak_memory(d.device)
    with no_collection_pauses():
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    output = artifacts.save_trained_weights(model, run_dir, d, adapter=cfg.lora.enabled)
    summary = artifacts.build_summary(
        callback, d, quantized_bytes_per_rank=qbytes, load_memory=load_memory, load_host_memory=load_host_memory,
        wall_time_s=time.perf_counter() - start, output=output,
    )
    # null: every layer (or checkpointing off, fsdp2.activation_checkpointing)
    summary["checkpointed_layers"] = fsdp2.checkpointed_layers
    if plan is not None:  # auto's prediction for rank 0 at the count every rank took, against peak_memory_gib
        summary["predicted_peak_gib"] = round(plan.peak_with(fsdp2.checkpointed_layers) / GIB, 2)
    if d.is_main:
        artifacts.plot_loss(run_dir, callback.rows, callback.eval_rows)
        artifacts.write_summary(run_dir, summary)
    return summary, model


def checkpointed_layers(cfg: DictConfig, d: Dist, run_dir: Path,
                        longest: int | None = None) -> tuple[int | None, CheckpointPlan | None]:
    """How many decoder layers recompute (None: all), and this rank's plan where `auto` made one; with `auto` on
    GPUs, the most any rank's plan needs (the GPU with the least room decides; a rank without a plan counts as all),
    so every rank runs the same layers the same way. Every rank planning takes part in the gather, whatever its plan
    came to."""
    count, plan = resolve_checkpointed_layers(cfg, d.device, d.world_size, longest)
    planning = (cfg.fsdp2.activation_checkpointing and cfg.fsdp2.checkpointed_layers == "auto"
                and d.device.type == "cuda")
    if not planning:
        return count, plan
    torch.cuda.empty_cache()  # the probe's layer
    counts = all_gather_object(count)
    count = None if None in counts else max(counts)
    if d.is_main and plan is not None and count != plan.checkpointed:  # the plan itself is logged already
        append_to_run_log(run_dir, f"another rank's plan needs {'all' if count is None else count} decoder layers to "
                                   f"recompute: every rank does")
    return count, plan


def resume_point(cfg: DictConfig, run_dir: Path, d: Dist) -> tuple[Path | None, list[dict]]:
    """The checkpoint to continue (None: a fresh start) and its metrics rows, the same on every rank. With `resume`
    set, rank 0 cuts metrics.jsonl back to those rows: steps after the checkpoint are trained again."""
    from qfsdp.distributed import check_same_on_all_ranks

    path = checkpoint.resolve_resume(cfg, run_dir)
    if d.world_size > 1:
        check_same_on_all_ranks("the checkpoint to resume from", str(path))
    rows = checkpoint.checkpoint_rows(path) if path else []
    if cfg.resume is not None and d.is_main:
        checkpoint.restart_metrics(run_dir, rows)
    return path, rows


def profile_callbacks(cfg: DictConfig, run_dir: Path, d: Dist) -> list:
    return [ProfileCallback(run_dir if d.is_main else None)] if cfg.profile else []


def hand_sharded_model_to_trainer(model: torch.nn.Module, world_size: int, replicate: int = 1) -> None:
    """Tell transformers' Trainer that this model shards itself with FSDP2, so it must not wrap it in DDP.

    Trainer (transformers >= 5.23) has a code path for models sharded with FSDP2 before it sees them (its own
    `from_pretrained(distributed_config=...)`): it skips Accelerate's DDP/FSDP wrapping, defers FSDP2 gradient
    reduction during accumulation, and gathers collectively on save. It keys that path on two attributes of the
    model; setting them is the one private hook qfsdp relies on (pinned by tests/test_trainer_hook.py).

    With HSDP (`replicate` > 1) the sizes must describe the mesh: Trainer then defers only the all-reduce across
    replicas during gradient accumulation (`set_requires_all_reduce(False)`), not the reduce-scatter within one.
    """
    base = base_model(model)
    base.config.distributed_config = DistributedConfig(fsdp_size=world_size // replicate, dp_replicate_size=replicate)
    base._is_distributed_loading_by_transformers = True

"""The stock recipe, as the baseline qfsdp is measured against: transformers `from_pretrained` with
`BitsAndBytesConfig` (NF4, double quant, bf16 compute), PEFT LoRA on every projection, TRL `SFTTrainer` with
gradient checkpointing (off with `fsdp2.activation_checkpointing=false`, as for qfsdp). One process per GPU; under
torchrun Trainer wraps it in DDP (every GPU holds the whole 4-bit model). It writes metrics.jsonl and summary.json in
qfsdp's format (tokens/s of real, non-padding tokens) so the two compare row by row.

    torchrun --nproc_per_node N -m qfsdp.bench.stock RUN_DIR [qfsdp overrides for model, dataset, lora, trainer]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main() -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from qfsdp import artifacts
    from qfsdp.config import compose_config
    from qfsdp.distributed import all_gather_object, init_distributed, shutdown_and_exit
    from qfsdp.hostmem import LoadHostMemory
    from qfsdp.metrics import MetricsCallback, memory_stats, reset_peak_memory
    from qfsdp.model import load_tokenizer, stock_checkpoint
    from qfsdp.shard import quantized_bytes
    from qfsdp.train import profile_callbacks
    from qfsdp.validate import gradient_accumulation_steps

    run_dir = Path(sys.argv[1])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(sys.argv[2:])

    start = time.perf_counter()
    path = stock_checkpoint(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    d = init_distributed()
    reset_peak_memory(d.device)
    host_memory = LoadHostMemory()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16,
        device_map={"": d.device},
        attn_implementation=cfg.model.attn_implementation,
    )
    load_memory = memory_stats(d.device)
    load_host_memory = all_gather_object(host_memory.stop())
    t = cfg.trainer
    args = SFTConfig(
        output_dir=str(run_dir / "trainer"),
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps(
            t.global_batch_size, t.per_device_train_batch_size, d.world_size),
        max_steps=t.max_steps, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        logging_steps=1, save_strategy="no", report_to=["none"], seed=cfg.seed, data_seed=cfg.seed,
        max_length=t.max_length, bf16=d.device.type == "cuda", use_cpu=d.device.type == "cpu",
        gradient_checkpointing=cfg.fsdp2.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding", dataset_text_field="text", disable_tqdm=True,
    )
    peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    callback = MetricsCallback(run_dir if d.is_main else None, d, time_origin=start)
    trainer = SFTTrainer(model=model, args=args, train_dataset=training_data(cfg, model.config.vocab_size),
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[callback, *profile_callbacks(cfg, run_dir, d)])
    reset_peak_memory(d.device)
    trainer.train()
    qbytes = all_gather_object(quantized_bytes(model))
    summary = artifacts.build_summary(callback, d, quantized_bytes_per_rank=qbytes, load_memory=load_memory,
                                      load_host_memory=load_host_memory,
                                      wall_time_s=time.perf_counter() - start, output="none")
    if d.is_main:
        artifacts.write_summary(run_dir, summary)
    shutdown_and_exit(0)


def training_data(cfg, vocab_size: int):
    """The rows qfsdp trains on for the same config and seed (synthetic lengths included), so tokens/s compare."""
    from qfsdp.data import load_train_dataset

    return load_train_dataset(cfg.dataset, vocab_size, cfg.seed)


if __name__ == "__main__":
    main()

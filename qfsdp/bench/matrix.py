"""The benchmark matrix: named rows (a qfsdp configuration through the same `launch.py` users run, or the stock
recipe, `qfsdp.bench.stock`), the presets they share, and running one row into its own run directory.

Per row: steady-state tokens/s (first `WARMUP` steps excluded), peak memory per rank while loading and while
training, quantized bytes per rank, per-step loss, wall time. `qfsdp.bench.results` turns rows into the report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qfsdp.config import compose_config
from qfsdp.metrics import steady_tokens_per_second
from qfsdp.rundir import first_error

ROOT = Path(__file__).resolve().parents[2]
WARMUP = 3

PRESETS = {
    # Llama-3.1-8B shape, random weights, synthetic 2048-token sequences, global batch 16, 20 steps. Micro batch 4:
    # at 2, eager steps wait on kernel launches and their speed varied by machine (docs/BENCHMARKS.md, History).
    # The random weights go through a checkpoint (model.random_checkpoint): the stock rows load the same weights.
    "llama8b": ["model=llama3_1_8b", "model.random_init=true", "model.random_checkpoint=true", "dataset=synthetic", "dataset.seq_length=2048",
                "dataset.num_samples=512", "trainer.max_length=2048", "trainer.global_batch_size=16",
                "trainer.per_device_train_batch_size=4", "trainer.max_steps=20", "lora.r=16",
                "compile=false", "fsdp2.checkpointed_layers=all"],
    # rows are eager unless named -compile (compile's GPU default is on), and every layer recomputes unless a row
    # says otherwise (the GPU default, auto, keeps as many layers' activations as fit: the -auto rows)
    # The same matrix on the tiny model, for CPU tests.
    "tiny": ["dataset=synthetic", "dataset.seq_length=64", "trainer.global_batch_size=8",
             "trainer.per_device_train_batch_size=2", "trainer.max_steps=5"],
}


@dataclass(frozen=True)
class Row:
    runner: str  # "qfsdp": launch.py, as users run it; "stock": qfsdp.bench.stock (the baseline) under torchrun
    world_size: int
    overrides: tuple[str, ...] = ()
    preset: bool = True  # False: the overrides are the whole recipe (an experiment), the preset is not applied


# "-det" rows run with deterministic=true: GPU kernels are not deterministic run to run (the same config twice
# differs by ~1e-3 in loss after a few steps on H200), so comparisons that must hold below that (1 vs N GPUs,
# offload, compile) are made between deterministic rows.
DET = ("deterministic=true",)
# Lengths like instruction data (log-normal, median 256 tokens, a tail cut at the preset's 2048), for what padding and
# packing cost. 2048 sequences (mean ~400 tokens): packed into 2048-token rows, 20 steps of 16 take ~1,650 of them,
# so the packed row does not see data twice.
LOGNORMAL = ("dataset.lengths=lognormal", "dataset.median_length=256", "dataset.num_samples=2048")
LIGER = ("kernels=liger",)
OFFACT = ("trainer.activation_offloading=true",)
# The Kaggle 2 x T4 recipes: random 8B weights drawn on the GPU (no checkpoint to build), deterministic for parity.
KAGGLE = ("experiment=kaggle_2xt4", "model.random_init=true", *DET)
KAGGLE_OFFLOAD = ("experiment=kaggle_2xt4_offload", "model.random_init=true", *DET)
ROWS = {
    "qfsdp-1": Row("qfsdp", 1),
    "qfsdp-2": Row("qfsdp", 2),
    "qfsdp-4": Row("qfsdp", 4),
    "qfsdp-1-offload": Row("qfsdp", 1, ("fsdp2=offload",)),
    "qfsdp-2-offload": Row("qfsdp", 2, ("fsdp2=offload",)),
    "qfsdp-1-compile": Row("qfsdp", 1, ("compile=true",)),
    "qfsdp-2-compile": Row("qfsdp", 2, ("compile=true",)),
    "qfsdp-1-fp16": Row("qfsdp", 1, ("precision=fp16",)),
    "qfsdp-2-fp16": Row("qfsdp", 2, ("precision=fp16",)),
    "qfsdp-1-noac": Row("qfsdp", 1, ("fsdp2.activation_checkpointing=false",)),
    "qfsdp-2-noac": Row("qfsdp", 2, ("fsdp2.activation_checkpointing=false",)),
    "qfsdp-1-noac-compile": Row("qfsdp", 1, ("fsdp2.activation_checkpointing=false", "compile=true")),
    # Checkpointing on the first N of the 8B's 32 layers, the last 32 - N keep their activations: points between
    # qfsdp-1-compile (all 32 recompute) and qfsdp-1-noac-compile (none) on the throughput-memory frontier.
    "qfsdp-1-compile-ckpt24": Row("qfsdp", 1, ("fsdp2.checkpointed_layers=24", "compile=true")),
    "qfsdp-1-compile-ckpt16": Row("qfsdp", 1, ("fsdp2.checkpointed_layers=16", "compile=true")),
    # What a user who writes nothing gets on a GPU (compile, checkpointed_layers=auto), and the same on a 24 GiB card.
    "qfsdp-1-compile-auto": Row("qfsdp", 1, ("fsdp2.checkpointed_layers=auto", "compile=true")),
    "qfsdp-1-compile-auto24": Row("qfsdp", 1, ("fsdp2.checkpointed_layers=auto", "compile=true",
                                               "gpu_memory_limit_gib=24")),
    # TRL's activation offloading: what autograd saves goes to pinned host memory on a side stream and comes back
    # in the backward; with every layer recomputing, that is the layers' inputs (under compile it must be so).
    "qfsdp-1-compile-offact": Row("qfsdp", 1, ("compile=true", *OFFACT)),
    "qfsdp-1-offact-det": Row("qfsdp", 1, (*OFFACT, *DET)),
    "qfsdp-1-liger": Row("qfsdp", 1, LIGER),
    "qfsdp-1-liger-compile": Row("qfsdp", 1, (*LIGER, "compile=true")),
    "qfsdp-1-lognormal": Row("qfsdp", 1, LOGNORMAL),
    "qfsdp-1-pack": Row("qfsdp", 1, (*LOGNORMAL, "trainer.packing=true")),
    # Packing with FlexAttention: transformers masks a packed row by its position ids, which sdpa gets as a dense
    # mask over the whole row and FlexAttention as a block mask whose empty blocks it skips (GPU only).
    "qfsdp-1-pack-flex": Row("qfsdp", 1, (*LOGNORMAL, "trainer.packing=true",
                                          "model.attn_implementation=flex_attention")),
    "qfsdp-1-det": Row("qfsdp", 1, DET),
    "qfsdp-2-det": Row("qfsdp", 2, DET),
    "qfsdp-4-det": Row("qfsdp", 4, DET),
    "qfsdp-2-offload-det": Row("qfsdp", 2, ("fsdp2=offload", *DET)),
    "qfsdp-2-compile-det": Row("qfsdp", 2, ("compile=true", *DET)),
    "qfsdp-1-liger-det": Row("qfsdp", 1, (*LIGER, *DET)),
    "qfsdp-1-liger-compile-det": Row("qfsdp", 1, (*LIGER, "compile=true", *DET)),
    # The GPU defaults (compile, checkpointed_layers=auto) beside qfsdp-1-det: the equal-loss promise of the default.
    "qfsdp-1-compile-auto-det": Row("qfsdp", 1, ("fsdp2.checkpointed_layers=auto", "compile=true", *DET)),
    "kaggle-1": Row("qfsdp", 1, KAGGLE, preset=False),
    "kaggle-2": Row("qfsdp", 2, KAGGLE, preset=False),
    # kaggle-N-mb2 parts the two changes from the offload recipe: no offload at its micro batch 2
    "kaggle-1-mb2": Row("qfsdp", 1, (*KAGGLE, "trainer.per_device_train_batch_size=2"), preset=False),
    # The recipe with every layer recomputing, beside its default (checkpointed_layers=auto under the 15 GiB cap).
    "kaggle-1-ckptall": Row("qfsdp", 1, (*KAGGLE, "fsdp2.checkpointed_layers=all"), preset=False),
    "kaggle-2-mb2": Row("qfsdp", 2, (*KAGGLE, "trainer.per_device_train_batch_size=2"), preset=False),
    "kaggle-offload-1": Row("qfsdp", 1, KAGGLE_OFFLOAD, preset=False),
    "kaggle-offload-2": Row("qfsdp", 2, KAGGLE_OFFLOAD, preset=False),
    "stock-1": Row("stock", 1),
    # Without gradient checkpointing at micro batch 4 (accumulation 4): micro batch 8 took 97 GiB on an H200, more
    # than an 80 GB H100 has. Set here, not left to the preset, so the row keeps fitting if the preset changes.
    "stock-1-noac": Row("stock", 1, ("fsdp2.activation_checkpointing=false", "trainer.per_device_train_batch_size=4")),
    "stock-1-lognormal": Row("stock", 1, LOGNORMAL),
    "stock-2-ddp": Row("stock", 2),
}


def _env() -> dict:
    # NVLink multicast stays off on shared multi-GPU hosts (../shared/gpu/README.md), in every child process too.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def run_row(name: str, preset: list[str], rows_dir: Path, log, timeout: int, extra: tuple[str, ...] = ()) -> dict:
    row_spec = ROWS[name]
    runner, world_size = row_spec.runner, row_spec.world_size
    args = row_config(name, preset, extra)
    overrides = [*row_spec.overrides, *_extra_for(row_spec, extra)]
    run_dir = rows_dir / name
    if runner == "qfsdp":
        cmd = [sys.executable, str(ROOT / "launch.py"), f"world_size={world_size}", *args, f"hydra.run.dir={run_dir}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "qfsdp.bench.stock", str(run_dir), *args]
    log.write(f"\n=== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    # Its own process group, so a timeout stops torchrun's workers too: left running, they would hold the lane's
    # GPUs under the next row.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout)
        error = None if returncode == 0 else f"exit code {returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        error = f"timed out after {timeout}s"
    row = {"name": name, "runner": runner, "world_size": world_size, "overrides": overrides,
           "command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - start, **batch_shape(args, world_size)}
    summary_path = run_dir / "summary.json"
    if error is None and summary_path.exists():
        row.update(status="ok", summary=json.loads(summary_path.read_text()))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        row["losses"] = [r["loss"] for r in rows]
        row["step_tokens_per_second"] = [r["tokens_per_second"] for r in rows]
        # metrics.jsonl counts real (non-padding) tokens, for qfsdp and the stock recipe alike (metrics.TokenCounter)
        row["tokens_per_second"] = steady_tokens_per_second(rows, WARMUP)
        row["real_tokens"] = rows[-1]["tokens"] if rows else 0
        row["padding_tokens"] = rows[-1].get("padding_tokens", 0) if rows else 0
    else:
        row.update(status="failed", error=first_error(run_dir) or error)
    return row


def row_config(name: str, preset: list[str], extra: tuple[str, ...] = ()):
    """The row's overrides: the preset's (unless the row is a whole recipe), the row's own, then `extra`."""
    spec = ROWS[name]
    return [*(preset if spec.preset else []), *spec.overrides, *_extra_for(spec, extra)]


def batch_shape(args: list[str], world_size: int) -> dict:
    """Micro batch and gradient accumulation of a row (rows may set their own micro batch; the global batch is the
    preset's)."""
    t = compose_config(args).trainer
    return {"micro_batch": t.per_device_train_batch_size,
            "gradient_accumulation": t.global_batch_size // (t.per_device_train_batch_size * world_size)}


def _extra_for(spec: Row, extra: tuple[str, ...]) -> tuple[str, ...]:
    """`run --set` overrides apply to qfsdp rows only: the stock recipe is the fixed baseline."""
    return extra if spec.runner == "qfsdp" else ()


def prepare(names: list[str], preset: list[str], extra: tuple[str, ...] = ()) -> None:
    """Build every checkpoint and tokenizer the rows need, once, before rows run (possibly several at a time)."""
    import torch

    from qfsdp.model import load_tokenizer, prepare_checkpoint, stock_checkpoint

    for name in names:
        cfg = compose_config(row_config(name, preset, extra))
        prepare_checkpoint(cfg.model, getattr(torch, cfg.precision.dtype), full_finetune=not cfg.lora.enabled)
        if ROWS[name].runner == "stock":
            stock_checkpoint(cfg.model)
        load_tokenizer(cfg.model)


def matmul_ceiling() -> dict:
    """bf16 matmul rate on this device (the MFU denominator), in a child process so no CUDA context lingers."""
    code = (
        "import json, torch, time\n"
        "if not torch.cuda.is_available(): print(json.dumps(None)); raise SystemExit\n"
        "n = 8192; a = torch.randn(n, n, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)\n"
        "for _ in range(3): a @ b\n"
        "torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)\n"
        "s.record()\n"
        "for _ in range(20): a @ b\n"
        "e.record(); torch.cuda.synchronize()\n"
        "print(json.dumps({'tflops': 2 * n**3 * 20 / (s.elapsed_time(e) / 1e3) / 1e12,\n"
        "                  'device': torch.cuda.get_device_name()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None

"""What a finished run leaves in its directory: the trained adapter, summary.json and loss.png."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qfsdp.distributed import Dist, all_gather_object
from qfsdp.hostmem import node_totals
from qfsdp.metrics import memory_stats, peak_gib
from qfsdp.rundir import SUMMARY


def full_state_dict(model: nn.Module, trainable_only: bool, keep: bool) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of the model's weights (or only the trainable, LoRA ones), under the model's own names.

    Collective: every rank calls it (gathering a DTensor is). Ranks with `keep=False` drop each copy at once, so only
    the writing rank holds the gathered model. With `trainable_only` the 4-bit base weights are never gathered.
    """
    out = {}
    items = ((n, p) for n, p in model.named_parameters() if p.requires_grad) if trainable_only \
        else model.state_dict().items()
    for name, t in items:
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
    return out


def save_trained_weights(model: nn.Module, run_dir: Path, d: Dist, adapter: bool) -> str:
    """Save the LoRA adapter (PEFT format, `adapter/`) or, for full fine-tuning, the whole model (`model/`)."""
    if adapter or d.world_size == 1:
        state = full_state_dict(model, trainable_only=adapter, keep=d.is_main)
        if d.is_main:
            model.save_pretrained(run_dir / ("adapter" if adapter else "model"), state_dict=state)
    else:
        # transformers gathers a model sharded over several processes itself (a collective: every rank calls it) and
        # rank 0 writes. With one process it does not gather, and failed on FSDP2's DTensors: gathered above instead.
        model.save_pretrained(run_dir / "model")
    if dist.is_initialized():
        dist.barrier()
    return "adapter" if adapter else "model"


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__}


def build_summary(callback, d: Dist, *, quantized_bytes_per_rank: list[int], load_memory: dict,
                  wall_time_s: float, output: str, load_host_memory: list[dict] | None = None) -> dict:
    """`load_host_memory`: every rank's `hostmem.LoadHostMemory` figures, gathered (None: not measured)."""
    mem = memory_stats(d.device)
    mems = all_gather_object(mem)
    loads = all_gather_object(load_memory)
    rows = callback.rows
    return {
        "status": "ok",
        "world_size": d.world_size,
        "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
        "steps": rows[-1]["step"] if rows else 0,
        "final_loss": rows[-1]["loss"] if rows else None,
        "losses": [r["loss"] for r in rows],
        "tokens_per_second": callback.steady_tokens_per_second(),
        # real (non-padding) tokens trained on, and the padding the batches carried besides
        "tokens": rows[-1]["tokens"] if rows else 0,
        "padding_tokens": rows[-1].get("padding_tokens", 0) if rows else 0,
        "eval_loss": last_eval_loss(callback.eval_rows, rows),
        "peak_memory_gib": [peak_gib(m) for m in mems],
        "memory": mems,
        "load_memory": loads,
        **({"load_host_memory": load_host_memory, "load_host_memory_per_node": node_totals(load_host_memory)}
           if load_host_memory is not None else {}),
        "quantized_bytes_per_rank": quantized_bytes_per_rank,
        "wall_time_s": wall_time_s,
        "output": output,
        "versions": versions(),
    }


def last_eval_loss(eval_rows: list[dict], rows: list[dict]) -> float | None:
    """The last evaluation's loss: this process' own, else the last one a resumed run's earlier rows hold."""
    if eval_rows:
        return eval_rows[-1]["eval_loss"]
    evaluated = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return evaluated[-1] if evaluated else None


def write_summary(run_dir: Path, summary: dict) -> None:
    # Written last: its presence marks the run finished (see rundir.py).
    tmp = run_dir / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.rename(run_dir / SUMMARY)


def plot_loss(run_dir: Path, rows: list[dict], eval_rows: list[dict] = ()) -> None:
    """Training loss per step; with evaluation, eval loss at the steps evaluated (the rows' own, a resumed run's
    earlier ones included, and eval.jsonl's, e.g. step 0 with eval_on_start)."""
    from qfsdp.plots import line_plot

    series = [("train loss", [r["step"] for r in rows], [r["loss"] for r in rows])]
    evaluated = {r["step"]: r["eval_loss"] for r in [*rows, *eval_rows] if "eval_loss" in r}
    if evaluated:
        steps = sorted(evaluated)
        series.append(("eval loss", steps, [evaluated[s] for s in steps]))
    line_plot(run_dir / "loss.png", series, xlabel="optimizer step", ylabel="loss" if evaluated else "training loss",
              title=run_dir.name, marker=".")

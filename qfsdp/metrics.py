"""Per-step metrics: loss, learning rate, grad norm, tokens/s and peak memory of every rank -> metrics.jsonl."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from qfsdp.distributed import Dist, all_gather_object

GIB = 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_stats(device: torch.device) -> dict:
    """Peak memory of this process in GiB: GPU allocated/reserved on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
    # ru_maxrss is in KiB on Linux; the CPU "device" memory is the process' peak RSS.
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def peak_gib(stats: dict) -> float:
    return stats.get("peak_allocated_gib", stats.get("peak_rss_gib", 0.0))


class StepPhases:
    """Where an optimizer step's time goes on the device's timeline: each micro-step (forward and backward; the last
    one with the gradient reduction and clipping), the optimizer step, what follows it (learning-rate schedule,
    zeroing gradients), and the time between two steps (logging, the step-end garbage collection, fetching the next
    batches). Marks are CUDA events on the current stream (the GPU's own clock; read at logging time, after Trainer
    has already waited for the step's loss, so they add no host sync), on CPU the wall clock. With
    `logging_steps` > 1 the logged step's phases are reported (tokens/s covers all steps since the last log).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []  # this step's: begin, substep ends..., pre-optimizer, optimizer, end
        self.last_end = None  # the previous step's end

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        if len(self.marks) >= 4:
            self.last_end = self.marks[-1]
        self.marks = [self._now()]

    def mark(self) -> None:
        self.marks.append(self._now())

    def _ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return round(a.elapsed_time(b), 2)
        return round((b - a) * 1e3, 2)

    def take(self) -> dict:
        """The last complete step's phases in milliseconds (empty before one has completed)."""
        m = self.marks
        if len(m) < 4:
            return {}
        begin, micro_ends, opt_end, end = m[0], m[1:-2], m[-2], m[-1]
        bounds = [begin, *micro_ends]
        out = {"micro_steps_ms": [self._ms(a, b) for a, b in zip(bounds, bounds[1:])],
               "optimizer_ms": self._ms(micro_ends[-1], opt_end), "after_optimizer_ms": self._ms(opt_end, end)}
        if self.last_end is not None:
            out["between_steps_ms"] = self._ms(self.last_end, begin)
        return out


class TokenCounter:
    """Real and padding tokens of this rank's training forwards, summed on the device (no host sync per micro-step;
    read at logging time, after Trainer has already waited for the loss).

    Counted from the batch the model receives, as TRL's collator builds it: with an attention mask, its ones are the
    real tokens; padding-free and packed batches (one row, no mask) are padded only at the end, and only with
    `pad_to_multiple_of` (pad token at position 0, no label).
    """

    def __init__(self, pad_token_id: int | None):
        self.pad_token_id = pad_token_id
        self._real = self._padding = 0

    def attach(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        # training forwards only: TRL's extra no-grad forward for metrics (label smoothing) would count twice
        if not (module.training and torch.is_grad_enabled()) or not isinstance(ids, torch.Tensor):
            return
        mask = kwargs.get("attention_mask")
        if mask is not None:
            real = mask.sum()
        else:
            real = torch.tensor(ids.numel(), device=ids.device) - self._trailing_padding(ids, kwargs)
        self._real = self._real + real
        self._padding = self._padding + (ids.numel() - real)

    def _trailing_padding(self, ids: torch.Tensor, kwargs: dict) -> torch.Tensor | int:
        positions, labels = kwargs.get("position_ids"), kwargs.get("labels")
        if positions is None or labels is None or self.pad_token_id is None:
            return 0
        pad = (ids == self.pad_token_id) & (positions == 0) & (labels == -100)
        return pad.flip(-1).long().cumprod(-1).sum()

    def totals(self) -> tuple[int, int]:
        """(real, padding) tokens on this rank so far."""
        return int(self._real), int(self._padding)


def _name(value) -> str:
    return getattr(value, "value", value)  # transformers' IntervalStrategy, or a plain string


class MetricsCallback(TrainerCallback):
    """Appends one JSON object per logged optimizer step to `run_dir/metrics.jsonl` (rank 0 only).

    `on_log` runs on every rank the same number of times, so gathering each rank's memory there is safe.
    A step that ends with a checkpoint is written once the save is done, with its time and size (`record_checkpoint`).
    A step that is evaluated gets `eval_loss` in its row (every eval_* figure also goes to eval.jsonl).
    A resumed run starts from its checkpoint's rows (`previous_rows`); its elapsed time goes on from theirs.
    """

    def __init__(self, run_dir: Path | None, d: Dist, time_origin: float, previous_rows: list[dict] = ()):
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self.d = d
        self.rows: list[dict] = list(previous_rows)
        self.eval_rows: list[dict] = []
        self.first_new = len(self.rows)  # rows of this process start here
        self.time_origin = time_origin - (self.rows[-1]["elapsed_s"] if self.rows else 0.0)
        self._last = None  # (time, tokens) at the previous log
        self._held = None  # a row waiting for its step's checkpoint
        self._unwritten_save: dict = {}  # a save at a step without a row of its own: goes on the next row
        self.phases = StepPhases(d.device)
        self.tokens: TokenCounter | None = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._last = (time.perf_counter(), 0)
        if model is not None and self.tokens is None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            self.tokens = TokenCounter(getattr(tokenizer, "pad_token_id", None))
            self.tokens.attach(model)

    # Step phases (StepPhases): marks at the step's start, after each micro-step but the last, after the last one's
    # backward and clipping (on_pre_optimizer_step), after the optimizer step, and at the step's end.
    def on_step_begin(self, args, state, control, **kwargs):
        self.flush()  # a row held for an evaluation that did not come (an epoch eval_strategy, mid-epoch)
        self.phases.begin()

    def on_substep_end(self, args, state, control, **kwargs):
        self.phases.mark()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.phases.mark()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.phases.mark()

    def on_step_end(self, args, state, control, **kwargs):
        self.phases.mark()

    # `tokens` counts real (non-padding) tokens of all ranks, so tokens/s is what padding does not inflate;
    # `padding_tokens` is the rest of what the batches held.
    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        mem = memory_stats(self.d.device)
        counted = self.tokens.totals() if self.tokens is not None else (int(state.num_input_tokens_seen), 0)
        gathered = all_gather_object((mem, counted))
        mems = [m for m, _ in gathered]
        if "eval_loss" in logs:
            self._write_eval(state.global_step, logs)
            if self._held is not None and self._held["step"] == state.global_step:
                self._held["eval_loss"] = float(logs["eval_loss"])
                if not control.should_save:
                    self.flush()
            elif self.rows and self.rows[-1]["step"] == state.global_step:
                self.rows[-1]["eval_loss"] = float(logs["eval_loss"])  # already written (a save came first)
        if "loss" not in logs:
            return
        now = time.perf_counter()
        tokens, padding = (sum(c[i] for _, c in gathered) for i in (0, 1))
        last_time, last_tokens = self._last
        self._last = (now, tokens)
        row = {
            "step": state.global_step,
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs.get("grad_norm", float("nan"))),
            "tokens": tokens,
            "padding_tokens": padding,
            "tokens_per_second": (tokens - last_tokens) / max(now - last_time, 1e-9),
            "peak_memory_gib": [peak_gib(m) for m in mems],
            "elapsed_s": now - self.time_origin,
            **self.phases.take(),
            **self._unwritten_save,
        }
        self._unwritten_save = {}
        self.rows.append(row)
        # Held for this step's evaluation (its eval_loss joins the row; evaluation runs after the log, and with
        # eval_strategy=epoch only once the epoch ends) or its checkpoint.
        evaluates_at_epoch_end = _name(args.eval_strategy) == "epoch"
        if control.should_save or control.should_evaluate or evaluates_at_epoch_end:
            self._held = row
        else:
            self._write(row)

    def record_checkpoint(self, step: int, fields: dict) -> list[dict]:
        """The checkpoint of `step` is saved (rank 0): add its `fields` to that step's row and write it. Returns the
        rows so far (the checkpoint keeps them)."""
        if self._held is not None and self._held["step"] == step:
            self._held.update(fields)
        else:
            self._unwritten_save = fields
        self.flush()
        return list(self.rows)

    def flush(self) -> None:
        if self._held is not None:
            self._write(self._held)
            self._held = None

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()

    def _write(self, row: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _write_eval(self, step: int, logs: dict) -> None:
        """Evaluation (trainer.eval_strategy) -> eval.jsonl: the step, eval_loss and TRL's other eval_* figures."""
        row = {"step": step, **{k: float(v) for k, v in logs.items()
                                  if k.startswith("eval_") and isinstance(v, (int, float))}}
        self.eval_rows.append(row)
        if self.path is not None:
            with (self.path.parent / "eval.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def steady_tokens_per_second(self, warmup_steps: int = 1) -> float:
        """Over this process' own steps: a resumed run's earlier steps ran in another process."""
        return steady_tokens_per_second(self.rows[self.first_new:], warmup_steps)


def steady_tokens_per_second(rows: list[dict], warmup_steps: int = 1) -> float:
    """Tokens/s over the logged steps after the first `warmup_steps` (compile and allocator warm-up excluded).

    `rows` are metrics.jsonl lines. Exact when every step is logged (logging_steps=1, the default); a run shorter
    than the warm-up reports its last step's rate.
    """
    if len(rows) <= warmup_steps:
        return rows[-1]["tokens_per_second"] if rows else 0.0
    start, end = rows[warmup_steps - 1], rows[-1]
    return (end["tokens"] - start["tokens"]) / (end["elapsed_s"] - start["elapsed_s"])

"""Watching a run: rank 0 shows one progress bar with loss, tokens/s and peak memory, writes the same figures one
line per logged step into the run's one log file, and TensorBoard / wandb (`trainer.report_to=...`) write inside the
run directory. Other ranks print nothing (the launcher filters their output); their errors reach the console and a
sweep's summary through error-rank*.txt (see worker.record_error and report.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from transformers.trainer_callback import (
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
)

from qfsdp.metrics import MetricsCallback


def run_log_path(run_dir: Path) -> Path | None:
    """The run's one log file: the one Hydra opened for rank 0 at job start (`<job name>.log`, see rundir.py).

    None when Hydra writes no log (e.g. `hydra/job_logging=disabled`): qfsdp then writes none either, rather than a
    second file of its own.
    """
    logs = sorted(Path(run_dir).glob("*.log"))
    return logs[0] if logs else None


def append_to_run_log(run_dir: Path, message: str, level: str = "INFO", name: str = "qfsdp") -> None:
    """One line in the run's log file, in Hydra's format.

    Opened per line in append mode, as Hydra's own handler is: the driver and rank 0 (separate processes) both write
    there, and a sweep's driver goes through many run directories, so no handler is kept open.
    """
    path = run_log_path(run_dir)
    if path is None:
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    with path.open("a") as f:
        f.write(f"[{stamp}][{name}][{level}] - {message}\n")


class RunLogHandler(logging.Handler):
    """Log records into the run's log file only (append_to_run_log), not the console."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip()
            if record.name == "py.warnings":
                message = message.splitlines()[0]  # the warning, without the source line that raised it
            append_to_run_log(self.run_dir, message, record.levelname, record.name)
        except Exception:
            self.handleError(record)


def log_to_run_log_only(run_dir: Path | None) -> None:
    """Library warnings, which a user cannot act on, and qfsdp's own setup lines (e.g. what shard.py applied) go to
    the run's log file; `run_dir` None (ranks other than 0): nowhere. The console keeps the progress bar."""
    logging.captureWarnings(True)
    handler = RunLogHandler(run_dir) if run_dir is not None else logging.NullHandler()
    for name in ("py.warnings", "qfsdp"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    logging.getLogger("qfsdp").setLevel(logging.INFO)
    # transformers logs its notices through a console handler of its own (e.g. token ids aligned with the tokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)


def step_figures(row: dict, eval_loss: float | None = None) -> dict[str, str]:
    """The figures shown for one metrics.jsonl row: loss, tokens/s (all ranks together), peak memory of the
    fullest rank (GPU allocated, or process RSS on CPU), and the last evaluation's loss once there is one."""
    figures = {"loss": f"{row['loss']:.4f}", "tokens/s": f"{row['tokens_per_second']:,.0f}",
               "peak": f"{max(row['peak_memory_gib']):.2f}GiB"}
    if eval_loss is not None:
        figures["eval_loss"] = f"{eval_loss:.4f}"
    return figures


class ProgressBar(ProgressCallback):
    """transformers' training bar on rank 0, with the last step's figures as its postfix instead of the log dict
    ProgressCallback prints under it every step; with `trainer.disable_tqdm=true`, one printed line per step instead
    of a bar (for log-file consoles). Every logged step also goes to the run's log file.

    Reads the figures MetricsCallback computed for the same step (it must run first: attach() orders them).
    """

    def __init__(self, metrics: MetricsCallback, run_dir: Path | None):
        super().__init__()
        self.metrics = metrics
        self.run_dir = run_dir  # None on ranks other than 0

    def on_train_begin(self, args, state, control, **kwargs):
        if args.disable_tqdm:
            self.current_step = 0
        else:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        rows, evals = self.metrics.rows, self.metrics.eval_rows
        if not state.is_world_process_zero:
            return
        where = f"step {state.global_step}/{state.max_steps}"
        if "eval_loss" in logs:  # an evaluation (after its step's own line): the bar's postfix shows it from now on
            text = f"eval_loss={logs['eval_loss']:.4f}"
            if self.training_bar is not None and rows:
                self.training_bar.set_postfix_str(self._text(rows[-1], evals))
            elif self.training_bar is None:
                print(f"{where}: {text}", flush=True)
            if self.run_dir is not None:
                append_to_run_log(self.run_dir, f"{where}: {text}")
            return
        if not rows or rows[-1]["step"] != state.global_step or "loss" not in logs:
            return  # not a training step's log (e.g. the final train_runtime summary)
        text = self._text(rows[-1], evals)
        if self.training_bar is not None:
            self.training_bar.set_postfix_str(text)
        else:
            print(f"{where}: {text}", flush=True)
        if self.run_dir is not None:
            append_to_run_log(self.run_dir, f"{where}: {text}")

    @staticmethod
    def _text(row: dict, evals: list[dict]) -> str:
        figures = step_figures(row, evals[-1]["eval_loss"] if evals else None)
        return ", ".join(f"{k}={v}" for k, v in figures.items())

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


class FinishWandb(TrainerCallback):
    """Close the wandb run when training ends. wandb flushes its run at interpreter exit, which qfsdp's workers skip
    (distributed.shutdown_and_exit): without this, an offline run directory holds a header and no data."""

    def on_train_end(self, args, state, control, **kwargs):
        import wandb

        if state.is_world_process_zero and wandb.run is not None:
            wandb.finish()


def attach(trainer, metrics: MetricsCallback, run_dir: Path) -> None:
    """Set up what a running Trainer shows and where its loggers write (train.py calls it once the Trainer exists).

    - ProgressBar replaces transformers' ProgressCallback (or PrinterCallback), after MetricsCallback in the list;
    - TensorBoard writes to RUN_DIR/tensorboard (not RUN_DIR/trainer/runs/<date>_<host>), so `tensorboard --logdir`
      on a sweep lists each job by its directory; TENSORBOARD_LOGGING_DIR still wins;
    - wandb keeps its files (the whole run, in offline mode) in RUN_DIR/wandb rather than ./wandb, under project
      "qfsdp", and its run is closed at the end of training; WANDB_DIR and WANDB_PROJECT still win. Whether it
      syncs is wandb's own setting (WANDB_MODE).
    """
    from transformers.integrations import TensorBoardCallback, WandbCallback

    for cls in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cls)
    trainer.add_callback(ProgressBar(metrics, run_dir if metrics.d.is_main else None))
    for cb in list(trainer.callback_handler.callbacks):
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = str(Path(run_dir).resolve() / "tensorboard")
        if isinstance(cb, WandbCallback):
            trainer.add_callback(FinishWandb())  # after WandbCallback, which logs until its own on_train_end
    os.environ.setdefault("WANDB_DIR", str(Path(run_dir).resolve()))
    os.environ.setdefault("WANDB_PROJECT", "qfsdp")


def quiet_library_progress_bars() -> None:
    """Keep the training bar the only one: datasets' map bars (TRL tokenizes in 4 passes) and transformers' weight
    loading bar are switched off. Hub downloads keep theirs (huggingface_hub): minutes without feedback would be
    worse than a second bar."""
    import datasets
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    enable_progress_bars()  # transformers switched the hub's off too

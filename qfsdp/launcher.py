"""The Hydra job: validate, then train, either in this process (already under torchrun) or by starting
`torch.distributed.run` with the job's own process count (plain `python launch.py`, and every job of a sweep).

Driver and workers share one run directory; the workers read the config the driver composed from `.hydra/`.
Inside a Slurm job (hydra/launcher=slurm) a driver runs on every node and each starts that node's torchrun agent
(qfsdp/slurm.py); node 0's driver alone writes the directory's status and reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qfsdp import checkpoint
from qfsdp.distributed import env_rank, under_torchrun
from qfsdp.progress import log_to_run_log_only
from qfsdp.rundir import SUMMARY, finished_run_error, first_error, is_finished, write_status
from qfsdp.slurm import SlurmJob
from qfsdp.validate import ConfigError, Machine, validate


class JobFailed(RuntimeError):
    pass


def run_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    torchrun_world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun() else None
    if multirun and torchrun_world_size is not None:
        # Not one job's problem: the whole command is wrong, so stop the sweep here.
        print("qfsdp: error: a sweep (-m) cannot run inside torchrun; run `python launch.py -m ...` and qfsdp "
              "starts torchrun for each job with its own world_size", file=sys.stderr, flush=True)
        sys.exit(2)
    main_driver = env_rank() == 0  # in a Slurm job: node 0's driver; under torchrun: rank 0
    try:
        if is_finished(run_dir):
            raise ConfigError(finished_run_error(run_dir))
        if cfg.resume is None and checkpoint.is_interrupted_run(run_dir):
            raise ConfigError(checkpoint.interrupted_run_error(run_dir))
        log_to_run_log_only(run_dir if main_driver else None)  # library warnings: launch.log, not the console
        machine = Machine.detect()
        slurm = None if torchrun_world_size is not None else SlurmJob.from_env(visible_gpus=machine.gpus)
        world_size = validate(cfg, machine, torchrun_world_size, slurm)
        resume_from = checkpoint.resolve_resume(cfg, run_dir)
        if main_driver and cfg.resume is not None:
            _announce_resume(cfg, run_dir, resume_from)
        start = time.perf_counter()
        if torchrun_world_size is not None:
            _train_here(cfg, run_dir, start)
        _start_workers(run_dir, world_size, slurm)
        if main_driver:
            _report(run_dir, time.perf_counter() - start)
    except (ConfigError, JobFailed) as e:
        print(f"qfsdp: error: {e}", file=sys.stderr, flush=True)
        if multirun:
            if main_driver:
                write_status(run_dir, "failed", str(e))  # the sweep records it and goes on
            return
        if isinstance(e, ConfigError) and main_driver:
            _remove_if_empty(run_dir)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def _train_here(cfg: DictConfig, run_dir: Path, start: float) -> None:
    """Under torchrun: this process is one rank. Train, report from rank 0, and end the process."""
    from qfsdp.distributed import shutdown_and_exit
    from qfsdp.worker import execute, record_error

    try:
        execute(cfg, run_dir)
    except ConfigError:
        raise
    except Exception as e:
        record_error(run_dir, e)
        raise
    if env_rank() == 0:
        _report(run_dir, time.perf_counter() - start)
    shutdown_and_exit(0)


def torchrun_command(run_dir: Path, world_size: int, slurm: SlurmJob | None = None) -> list[str]:
    """This node's torchrun: all `world_size` processes here, or this node's share of a Slurm job's."""
    where = slurm.torchrun_args() if slurm else ["--standalone", f"--nproc_per_node={world_size}"]
    return [
        sys.executable, "-m", "torch.distributed.run", *where,
        # local rank 0 alone talks to the console; a failing rank's error is collected below
        "--local-ranks-filter=0", "-m", "qfsdp.worker", str(run_dir),
    ]


def _start_workers(run_dir: Path, world_size: int, slurm: SlurmJob | None = None) -> None:
    cmd = torchrun_command(run_dir, world_size, slurm)
    for stale in run_dir.glob("error-rank*.txt"):
        stale.unlink(missing_ok=True)  # every node's driver clears them, before any worker can start
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if slurm is None and world_size > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for 2+ processes anyway, without its banner
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        error = first_error(run_dir) or (
            f"workers exited with code {result.returncode} and no rank recorded an error: a process died without a "
            f"Python error (killed by a signal, out of memory, a crash in native code, or its node went away)")
        newest = checkpoint.newest_complete(run_dir)
        if newest is not None:
            error += f"; continue from {checkpoint.CHECKPOINTS}/{newest.name} with resume=auto (same run directory)"
        raise JobFailed(error)


def _announce_resume(cfg: DictConfig, run_dir: Path, resume_from: Path | None) -> None:
    from qfsdp.progress import append_to_run_log

    if resume_from is None:
        line = f"resume=auto: no complete checkpoint in {checkpoint.checkpoints_dir(run_dir)}, starting fresh"
    else:
        changed = checkpoint.changed_settings(cfg, resume_from)
        line = (f"resuming from {resume_from} (step {checkpoint.step_of(resume_from)} of {cfg.trainer.max_steps})"
                + (f"; changed: {', '.join(changed)}" if changed else ""))
    print(f"qfsdp: {line}", flush=True)
    append_to_run_log(run_dir, line)


def _report(run_dir: Path, seconds: float) -> None:
    summary = json.loads((run_dir / SUMMARY).read_text())
    print(
        f"qfsdp: finished {summary['steps']} steps on {summary['world_size']} process(es) in {seconds:.0f}s, "
        f"final loss {summary['final_loss']:.4f}, {summary['tokens_per_second']:.0f} tokens/s{_padding(summary)}.\n"
        f"qfsdp: results in {run_dir}/ (metrics.jsonl, summary.json, loss.png, {summary['output']}/)",
        flush=True,
    )


def _padding(summary: dict) -> str:
    """How much of the batches was padding (tokens/s counts real tokens only)."""
    real, padding = summary.get("tokens", 0), summary.get("padding_tokens", 0)
    return f" ({padding / (real + padding):.0%} of batch tokens were padding)" if padding else ""


def _remove_if_empty(run_dir: Path) -> None:
    """A run stopped by bad input leaves nothing behind (only what Hydra wrote at start is removed)."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", f"{HydraConfig.get().job.name}.log"}:
        shutil.rmtree(run_dir)

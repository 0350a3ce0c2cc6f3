"""Run-directory layout and the rules that keep it sane under torchrun and sweeps.

- All ranks of a torchrun job compose the config themselves, so the run directory must not depend on when each
  rank started: `${qfsdp_now:FORMAT}` is the start time of the torchrun agent (the ranks' common parent), and the
  current time otherwise. With several agents (multi-node torchrun) each has its own start time: rank 0's is
  shared with every rank through the rendezvous store, so all nodes name the same directory (which must be on a
  file system they share).
- The resolver caches its value in the config, and Hydra copies that cache into every job of a sweep: jobs that
  hydra-submitit-launcher runs on Slurm nodes, long after submission, still resolve the sweep directory the
  submitting process created.
- Only rank 0 writes `.hydra/` and the log file (`${qfsdp_output_subdir:}`, `${qfsdp_log_file:}`), so ranks
  never garble them.
- A directory holding `summary.json` holds a finished run: nothing is written there again (not even `.hydra/`).
  Nor into an unfinished run's directory unless the job continues it (`resume=...`, see checkpoint.py).
"""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from omegaconf import OmegaConf

from qfsdp.distributed import env_rank, under_torchrun

SUMMARY = "summary.json"
STATUS = "status.json"


def first_error(run_dir: Path) -> str | None:
    """The failing ranks' root cause: the first `error-rank*.txt` written (a rank that fails makes the others fail
    after it, with a peer's "connection closed"); ties broken by name. None when no rank recorded an error."""
    errors = sorted(run_dir.glob("error-rank*.txt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    return errors[0].read_text().strip() if errors else None


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / SUMMARY).exists()


def finished_run_error(run_dir: Path) -> str:
    return (f"{run_dir} holds a finished run (it has {SUMMARY}); qfsdp never overwrites one: "
            f"choose another directory with hydra.run.dir=... (or hydra.sweep.dir=... for a sweep)")


def _process_start_time(pid: int) -> float:
    """Wall-clock start time of a process, from /proc (Linux)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


_START = time.time()


@functools.cache
def _run_start() -> float:
    if not under_torchrun():
        return _START
    try:
        stamp = _process_start_time(os.getppid())
    except (OSError, ValueError, IndexError):
        stamp = _START
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:  # torchrun agents (nodes) in this job
        stamp = _rank0_value("run_start", repr(stamp))
    return float(stamp)


def _rank0_value(name: str, value: str) -> str:
    """Rank 0's `value`, on every rank, before any process group exists: through the TCP store the torchrun agents
    share with their workers (the store `init_process_group` joins later)."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise RuntimeError("multi-node torchrun without a shared rendezvous store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
                           "=1?): the nodes cannot agree on a run directory; give one with hydra.run.dir=...")
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(minutes=10))
    # Keyed by run and restart, so a restarted worker group agrees afresh.
    run, restart = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"qfsdp/{name}/{run}/{restart}"
    if env_rank() == 0:
        store.set(key, value)
    return store.get(key).decode()  # waits until rank 0 has set it


def _now(fmt: str) -> str:
    return datetime.fromtimestamp(_run_start()).strftime(fmt)


def _refused(_root_) -> bool:
    """A directory the job will refuse (launcher.run_job): a finished run, or an unfinished one without `resume`.
    Hydra must not write its config there either."""
    from qfsdp.checkpoint import is_interrupted_run

    run_dir = Path(_root_.hydra.runtime.output_dir)
    return is_finished(run_dir) or (getattr(_root_, "resume", None) is None and is_interrupted_run(run_dir))


def _output_subdir(*, _root_) -> str | None:
    if env_rank() != 0 or _refused(_root_):
        return None  # a refused directory: the job itself then stops with the reason
    return ".hydra"


def _log_file(*, _root_) -> str:
    if env_rank() != 0 or _refused(_root_):
        return os.devnull
    return str(Path(_root_.hydra.runtime.output_dir) / f"{_root_.hydra.job.name}.log")


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("qfsdp_now", _now, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("qfsdp_output_subdir", _output_subdir, replace=True)
    OmegaConf.register_new_resolver("qfsdp_log_file", _log_file, replace=True)


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """Record a job that did not finish (failed), so a sweep keeps the reason next to the job."""
    (Path(run_dir) / STATUS).write_text(json.dumps({"status": status, "error": error}) + "\n")

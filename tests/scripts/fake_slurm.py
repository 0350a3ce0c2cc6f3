"""A stand-in for the three Slurm commands submitit uses, running a job's "nodes" as local processes.

    fake_slurm.py install BIN_DIR STATE_DIR   write sbatch, srun and sacct wrappers into BIN_DIR

- `sbatch SCRIPT` answers "Submitted batch job ID" at once (submitit moves its pickle into place only after that),
  then runs SCRIPT in the background, in its own session (its pid in STATE_DIR/ID.pid, so a test can kill it),
  with the variables Slurm sets for the allocation: SLURM_JOB_ID, SLURM_JOB_NUM_NODES (#SBATCH --nodes) and
  SLURM_JOB_NODELIST = 127.0.0.[1-N] (loopback addresses: every "node" is reachable on this machine).
- `srun [--output F] [--error F] CMD...` runs CMD once per task (nodes x --ntasks-per-node), each with the
  per-task variables (SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS) and its output in F (%j, %t
  replaced), and exits with the first non-zero exit code.
- `sacct` knows no job (header only): submitit then waits for the jobs' result files.

Only what submitit's generated batch script uses is understood; this checks qfsdp's side of Slurm (the job function
on every node, torchrun across the allocation), not Slurm itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

JOB_ID = "4242"


def install(bin_dir: Path, state_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for command in ("sbatch", "srun", "sacct"):
        path = bin_dir / command
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {command} '
                        f'"{state_dir}" "$@"\n')
        path.chmod(0o755)


def sbatch(state_dir: Path, script: str) -> None:
    text = Path(script).read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.MULTILINE).group(1))
    per_node = int((re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.MULTILINE) or [None, "1"])[1])
    env = {**os.environ, "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_JOB_NODELIST": f"127.0.0.[1-{nodes}]" if nodes > 1 else "127.0.0.1",
           "FAKE_SLURM_TASKS_PER_NODE": str(per_node)}
    log = open(state_dir / f"{JOB_ID}.batch.log", "w")  # noqa: SIM115 (handed to the child)
    job = subprocess.Popen([sys.executable, __file__, "batch", str(state_dir), script], env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    (state_dir / f"{JOB_ID}.pid").write_text(str(job.pid))
    print(f"Submitted batch job {JOB_ID}", flush=True)


def batch(state_dir: Path, script: str) -> None:
    """The job's batch step: wait for submitit's pickle, then run the script as Slurm would on the first node."""
    folder = re.search(r"_submit (\S+)", Path(script).read_text()).group(1).replace("%j", JOB_ID)
    deadline = time.monotonic() + 60
    while not (Path(folder) / f"{JOB_ID}_submitted.pkl").exists():
        if time.monotonic() > deadline:
            sys.exit("fake sbatch: submitit never wrote the job's pickle")
        time.sleep(0.2)
    # Start in a later second than the submission: the job must still use the sweep directory the submitting
    # process named (Hydra copies the resolver cache into the job's config).
    time.sleep(1.5)
    code = subprocess.call(["bash", script])
    (state_dir / f"{JOB_ID}.exit").write_text(str(code))
    sys.exit(code)


def srun(args: list[str]) -> None:
    outputs = {}
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            outputs[flag] = args.pop(0)
    nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
    per_node = int(os.environ.get("FAKE_SLURM_TASKS_PER_NODE", "1"))
    tasks = nodes * per_node
    procs = []
    for task in range(tasks):
        env = {**os.environ, "SLURM_NODEID": str(task // per_node), "SLURM_PROCID": str(task),
               "SLURM_LOCALID": str(task % per_node), "SLURM_NTASKS": str(tasks), "SLURM_STEP_ID": "0"}
        name = (outputs.get("--output") or os.devnull).replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t",
                                                                                                        str(task))
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        out = open(name, "a")  # noqa: SIM115 (handed to the child)
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    sys.exit(next((c for c in codes if c), 0))


def main() -> None:
    command, state_dir, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if command == "install":
        install(state_dir, Path(args[0]))
    elif command == "sbatch":
        sbatch(state_dir, args[0])
    elif command == "batch":
        batch(state_dir, args[0])
    elif command == "srun":
        srun(args)
    elif command == "sacct":
        print("JobID|State|NodeList")
    else:
        sys.exit(f"fake_slurm: unknown command {command}")


if __name__ == "__main__":
    main()

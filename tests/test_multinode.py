"""Beyond one machine, on one machine: two torchrun agents ("nodes") meeting at a c10d rendezvous on 127.0.0.1, one
process each (gloo), started by hand (multi-node torchrun) or by a Slurm job (hydra/launcher=slurm, with stand-ins
for sbatch/srun/sacct). They must train exactly like one node with the same world size, in one run directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPTS, launch, metrics, run_cmd, summary

STEPS = 4


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: one node, 2 processes."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    launch("world_size=2", f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}")
    return run_dir


def assert_same_losses(one_node: Path, two_nodes: Path) -> None:
    a, b = [r["loss"] for r in metrics(one_node)], [r["loss"] for r in metrics(two_nodes)]
    assert len(a) == len(b) == STEPS
    # Same world size, same collectives (gloo, 2 ranks): the same arithmetic; the parity tests' bound (1e-5) still
    # applies in case the transport ever reorders a reduction (measured: identical).
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= 1e-5, f"step {step}: {x} vs {y}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(commands: list[list[str]], cwd: Path, env: dict, stagger_s: float = 0.0) -> list[subprocess.Popen]:
    procs = []
    for cmd in commands:
        procs.append(subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
        time.sleep(stagger_s)
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, output) of each; on timeout, or if the test fails, every node's process group is killed."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


@pytest.mark.slow
def test_two_nodes_train_like_one_node_in_one_run_dir(tmp_path, one_node):
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=qfsdp-test",
            str(ROOT / "launch.py"), f"trainer.max_steps={STEPS}"]
    # A fresh model cache: both nodes' local rank 0 build the tiny model at once (tiny.build_once must cope).
    # The second node starts 1.2 s later, so the two agents' start times differ in their seconds: without the
    # rendezvous agreement (rundir.py) the nodes would name two different run directories.
    nodes = start_nodes([node, node], cwd=tmp_path, env={"QFSDP_CACHE": str(tmp_path / "cache")}, stagger_s=1.2)
    results = wait_all(nodes, timeout=420)
    for code, text in results:
        assert code == 0, text[-4000:]
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    two_nodes = run_dirs[0]
    s = summary(two_nodes)
    assert s["world_size"] == 2 and s["steps"] == STEPS and len(s["quantized_bytes_per_rank"]) == 2
    assert sum("results in" in text for _, text in results) == 1  # rank 0 alone reports
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    assert not leftovers  # no half-built model left behind
    assert_same_losses(one_node, two_nodes)


@pytest.mark.slow
def test_slurm_job_on_two_nodes_trains_like_one_node(tmp_path, one_node):
    """`python launch.py -m hydra/launcher=slurm hydra.launcher.nodes=2`: submitit submits the batch script, srun
    starts the Hydra job (qfsdp's driver) on both "nodes", and each starts its node's torchrun agent from the
    SLURM_* variables (qfsdp/slurm.py)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    subprocess.run([sys.executable, str(SCRIPTS / "fake_slurm.py"), "install", str(bin_dir), str(state)], check=True)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MASTER_PORT": str(free_port())}
    try:
        result = run_cmd([sys.executable, str(ROOT / "launch.py"), "-m", "hydra/launcher=slurm",
                          "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=null", f"trainer.max_steps={STEPS}"],
                         cwd=tmp_path, env=env, timeout=420)
    finally:
        pid = state / "4242.pid"
        if pid.exists():  # the job runs in its own session: end it whatever happened
            try:
                os.killpg(int(pid.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    logs = sorted((tmp_path / "multirun_outputs").glob("*/*/.submitit/4242/*.out"))
    detail = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
    assert result.returncode == 0, result.stderr[-3000:] + detail
    # One sweep directory: the job, run by each node seconds after submission, resolved the same one as the
    # submitting process (which created .submitit/ there).
    sweeps = list((tmp_path / "multirun_outputs").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    assert (sweep / ".submitit").is_dir()
    job = sweep / "0"
    s = summary(job)
    assert s["world_size"] == 2 and len(s["quantized_bytes_per_rank"]) == 2
    assert (job / ".hydra" / "config.yaml").is_file() and not (job / "status.json").exists()
    node0, node1 = (sweep / ".submitit" / "4242" / f"4242_{t}_log.out" for t in (0, 1))
    assert "results in" in node0.read_text() and "results in" not in node1.read_text(), detail  # node 0 reports
    assert_same_losses(one_node, job)


def test_concurrent_builders_build_once(tmp_path):
    """Two processes that are both local rank 0 (two nodes on one machine, or sharing a network cache) ask for the
    same cached checkpoint at once: one builds it, the other waits and uses it."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from qfsdp.tiny import build_once
        target, log = Path({str(tmp_path / 'model')!r}), Path({str(tmp_path / 'builds.log')!r})
        def build(out):
            with open(log, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(2)  # long enough that the other process asks while this one builds
            (out / "config.json").write_text("{{}}")
        build_once(target, build)
        assert (target / "config.json").read_text() == "{{}}"
    """)
    procs = start_nodes([[sys.executable, "-c", script]] * 2, cwd=ROOT, env={"LOCAL_RANK": "0"})
    for code, text in wait_all(procs, timeout=120):
        assert code == 0, text
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "builds.log", "model"]


def test_nodes_without_a_shared_store_are_told_to_name_the_run_dir(monkeypatch):
    """With the agents' store not shared with workers, the ranks cannot agree on a directory by themselves: the
    config fails to compose, saying what to do, rather than each node writing its own directory."""
    from qfsdp import rundir

    for key, value in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "RANK": "1",
                       "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "False"}.items():
        monkeypatch.setenv(key, value)
    rundir._run_start.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="hydra.run.dir"):
            rundir._now("%H-%M-%S")
    finally:
        rundir._run_start.cache_clear()

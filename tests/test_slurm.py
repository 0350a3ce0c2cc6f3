"""Slurm without a cluster: the torchrun each node's driver starts, from fake SLURM_* environments, and the batch
script hydra-submitit-launcher submits for `hydra/launcher=slurm` (captured by a stand-in `sbatch`)."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from conftest import launch
from qfsdp.config import compose_config
from qfsdp.launcher import torchrun_command
from qfsdp.slurm import SlurmJob, expand_nodelist
from qfsdp.validate import ConfigError, Machine, validate


def slurm_env(**overrides) -> dict[str, str]:
    """What Slurm sets in each task of `srun` for a 2-node job with 4 GPUs per node, one task per node."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "4"}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-09]", ["gpu07", "gpu08", "gpu09"]),
    ("gpu[1,3-4],login2", ["gpu1", "gpu3", "gpu4", "login2"]),
    ("a[008-010]-ib,b[1-2]", ["a008-ib", "a009-ib", "a010-ib", "b1", "b2"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_torchrun_across_the_allocation(tmp_path):
    job = SlurmJob.from_env(slurm_env())
    assert job.world_size == 8
    port = 29500 + 123456 % 2000
    assert torchrun_command(tmp_path, 8, job) == [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", f"--rdzv-endpoint=gpu07:{port}",
        "--rdzv-id=qfsdp-123456", "--rdzv-conf=is_host=false",
        "--local-ranks-filter=0", "-m", "qfsdp.worker", str(tmp_path),
    ]
    node0 = SlurmJob.from_env(slurm_env(SLURM_NODEID="0", SLURM_PROCID="0"))
    assert "--rdzv-conf=is_host=true" in node0.torchrun_args()  # the first host runs the rendezvous store
    assert f"--rdzv-endpoint=gpu07:{port}" in node0.torchrun_args()


def test_processes_per_node_and_port_sources():
    # no SLURM_GPUS_ON_NODE (e.g. --gres without a count variable): the GPUs this task sees; none: one process
    assert SlurmJob.from_env(slurm_env(SLURM_GPUS_ON_NODE=None), visible_gpus=2).procs_per_node == 2
    assert SlurmJob.from_env(slurm_env(SLURM_GPUS_ON_NODE=None)).procs_per_node == 1
    assert SlurmJob.from_env(slurm_env(MASTER_PORT="31000")).port == 31000


def test_outside_slurm_or_on_one_node_runs_standalone(tmp_path):
    assert SlurmJob.from_env({}) is None
    one_node = SlurmJob.from_env(slurm_env(SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu07", SLURM_NTASKS="1"))
    assert one_node is None
    assert torchrun_command(tmp_path, 2)[3:5] == ["--standalone", "--nproc_per_node=2"]


def test_one_task_per_node_is_required():
    with pytest.raises(ConfigError, match="one task per node.*tasks_per_node=1"):
        SlurmJob.from_env(slurm_env(SLURM_NTASKS="16"))


def test_world_size_must_match_the_allocation():
    job, batch = SlurmJob.from_env(slurm_env()), "trainer.global_batch_size=16"
    assert validate(compose_config([batch]), Machine(gpus=4), slurm=job) == 8  # null follows the allocation
    assert validate(compose_config([batch, "world_size=8"]), Machine(gpus=4), slurm=job) == 8
    with pytest.raises(ConfigError) as e:
        validate(compose_config([batch, "world_size=4"]), Machine(gpus=4), slurm=job)
    msg = str(e.value)
    assert "\n" not in msg and "world_size=4" in msg and "2 node(s) x 4" in msg and "hydra.launcher.nodes" in msg


def test_hsdp_across_nodes_is_validated_against_the_allocation():
    job, batch = SlurmJob.from_env(slurm_env()), "trainer.global_batch_size=16"
    assert validate(compose_config([batch, "fsdp2=hsdp"]), Machine(gpus=4), slurm=job) == 8  # a group per node
    with pytest.raises(ConfigError, match="fsdp2.replicate=3"):
        validate(compose_config([batch, "fsdp2=hsdp", "fsdp2.replicate=3"]), Machine(gpus=4), slurm=job)


def test_node_drivers_other_than_node_0_write_nothing(monkeypatch):
    """Every node's driver composes the job's config; only node 0's writes .hydra/ and the log (hydra#2070)."""
    from qfsdp.rundir import _log_file, _output_subdir

    class Root:  # what the resolvers read from Hydra's config
        class hydra:
            class runtime:
                output_dir = "/nonexistent/run"

            class job:
                name = "launch"

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert _output_subdir(_root_=Root) is None and _log_file(_root_=Root) == os.devnull
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _output_subdir(_root_=Root) == ".hydra"


FAKE_SBATCH = """#!/bin/sh
# Stands in for Slurm's sbatch: keeps the batch script submitit wrote, then refuses it (no cluster here).
cp "$1" "{capture}"
echo "sbatch: error: no cluster (test stand-in)" >&2
exit 1
"""
FAKE_SRUN = """#!/bin/sh
# submitit looks for srun before submitting; never run here
exit 1
"""


def test_slurm_launcher_renders_a_multi_node_batch_script(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir, capture, sweep = tmp_path / "bin", tmp_path / "job.sh", tmp_path / "sweep"
    bin_dir.mkdir()
    for name, text in [("sbatch", FAKE_SBATCH.format(capture=capture)), ("srun", FAKE_SRUN)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    result = launch("-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                    "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90", "fsdp2=hsdp",
                    "trainer.max_steps=2", f"hydra.sweep.dir={sweep}", check=False,
                    env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode != 0 and "no cluster" in result.stdout + result.stderr
    script = capture.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.MULTILINE))
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "1"  # one qfsdp driver per node
    assert flags["gpus-per-node"] == "4" and flags["partition"] == "gpu" and flags["time"] == "90"
    assert flags["cpus-per-task"] == "32" and flags["job-name"] == "launch"
    assert flags["output"].startswith(str(sweep / ".submitit"))
    # srun starts the pickled Hydra job (qfsdp's driver) once per task, i.e. once per node
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "-m submitit.core._submit" in srun and str(sweep / ".submitit") in srun
    assert "export SUBMITIT_EXECUTOR=slurm" in script
    assert Path(sys.executable).name in srun

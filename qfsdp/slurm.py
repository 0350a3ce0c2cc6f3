"""Running inside a Slurm allocation: the one place that turns SLURM_* variables into a torchrun across all nodes.

With `hydra/launcher=slurm` (hydra-submitit-launcher), each Hydra job becomes a Slurm job whose allocation runs one
task per node, and every task runs the Hydra job function, i.e. qfsdp's driver (launcher.py). Each driver starts
one torchrun agent on its node; the agents meet at a c10d rendezvous on the allocation's first host and start
`procs_per_node` workers each, so the job trains on nodes x procs_per_node processes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from qfsdp.validate import ConfigError

# torchrun's rendezvous port on the first host. Derived from the job id, so two jobs that share a first node
# (small allocations on a shared node) do not collide; MASTER_PORT overrides it.
_PORT_BASE, _PORT_SPAN = 29500, 2000


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    nodes: int
    node_rank: int
    hosts: tuple[str, ...]
    tasks: int
    procs_per_node: int
    port: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, visible_gpus: int = 0) -> SlurmJob | None:
        """The multi-node Slurm job this process is a task of; None outside Slurm, and for a one-node job, which
        runs like any single machine (world_size up to the visible GPUs, `--standalone` torchrun).

        Processes per node: the GPUs Slurm gave this node (SLURM_GPUS_ON_NODE, set for `--gpus-per-node` and
        `--gres=gpu:N`), else the GPUs this process sees, else 1 (a CPU node runs one process).
        """
        env = os.environ if environ is None else environ
        if "SLURM_JOB_ID" not in env:
            return None
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        if nodes == 1:
            return None
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if len(hosts) != nodes:
            raise ConfigError(f"SLURM_JOB_NODELIST names {len(hosts)} host(s) but SLURM_JOB_NUM_NODES={nodes}; "
                              f"run qfsdp inside the job's allocation (srun, or hydra/launcher=slurm)")
        tasks = int(env.get("SLURM_NTASKS", "1"))
        if tasks != nodes:
            raise ConfigError(
                f"the Slurm job runs {tasks} task(s) on {nodes} node(s); qfsdp needs one task per node (it starts "
                f"one torchrun per node, which starts one process per GPU): set hydra.launcher.tasks_per_node=1 "
                f"(srun --ntasks-per-node=1)")
        gpus = _int_suffix(env.get("SLURM_GPUS_ON_NODE")) or visible_gpus
        job_id = env.get("SLURM_JOB_ID", "0")
        digits = int(re.sub(r"\D", "", job_id) or 0)
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _PORT_BASE + digits % _PORT_SPAN
        return cls(job_id=job_id, nodes=nodes, node_rank=int(env.get("SLURM_NODEID", "0")), hosts=tuple(hosts),
                   tasks=tasks, procs_per_node=max(gpus, 1), port=port)

    def check_world_size(self, requested: int | None) -> int:
        if requested is not None and requested != self.world_size:
            raise ConfigError(
                f"world_size={requested} but the Slurm job has {self.nodes} node(s) x {self.procs_per_node} "
                f"process(es) per node = {self.world_size}; drop world_size= (it follows the allocation) or set "
                f"hydra.launcher.nodes and hydra.launcher.gpus_per_node so that nodes x gpus_per_node = {requested}")
        return self.world_size

    def torchrun_args(self) -> list[str]:
        """torchrun's multi-node arguments for this node's agent."""
        return [
            f"--nnodes={self.nodes}",
            f"--nproc-per-node={self.procs_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.hosts[0]}:{self.port}",
            f"--rdzv-id=qfsdp-{self.job_id}",
            # Node 0 hosts the rendezvous store. Said explicitly rather than left to torchrun's guess (does the
            # endpoint's name match this host?), which fails on hosts whose name does not resolve to themselves.
            f"--rdzv-conf=is_host={'true' if self.node_rank == 0 else 'false'}",
        ]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: "gpu[01-03,07],login2" -> gpu01, gpu02, gpu03, gpu07,
    login2 (zero padding kept). One bracket group per host name, which is what Slurm prints."""
    hosts: list[str] = []
    for name in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)?", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", name)
        if not m:
            hosts.append(name)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def _int_suffix(value: str | None) -> int:
    """SLURM_GPUS_ON_NODE is a count; Slurm's GPU counts may also read "type:N" (SLURM_GPUS_PER_NODE style)."""
    if not value:
        return 0
    m = re.search(r"(\d+)$", value.split(",")[0])
    return int(m.group(1)) if m else 0

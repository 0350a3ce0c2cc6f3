"""Process group, device and rank helpers: the one place that knows who is rank 0 and which device to use."""

from __future__ import annotations

import gc
import hashlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def env_rank() -> int:
    """This process' rank before any process group exists: torchrun's RANK in a worker; in a driver started by
    Slurm on each node of a multi-node job (one task per node), its task rank, so that node 0's driver alone writes
    the run directory's `.hydra/`, log and status."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun set up: NCCL (and gloo for CPU tensors) on GPUs, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # gloo beside NCCL: with CPU offload of trained weights (full fine-tuning, trained biases) the sharded
        # gradients live in CPU memory, and their norm (grad clipping) is reduced across ranks there.
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=30), **kwargs)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def data_parallel_mesh(device_type: str, world_size: int, replicate: int = 1):
    """FSDP2's device mesh: 1-D ("fsdp",) when replicate == 1; 2-D ("replicate", "fsdp") for HSDP.

    `fully_shard` reads a 2-D mesh as (replicate, shard): parameters are sharded along the last dimension, within
    each group of world_size // replicate consecutive ranks, and replicated along the first. torchrun numbers ranks
    node by node, so with replicate = nodes a shard group is one node.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % replicate:
        raise ValueError(f"fsdp2.replicate={replicate} does not divide world_size={world_size}")
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("fsdp",))
    return init_device_mesh(device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "fsdp"))


def shutdown_and_exit(code: int = 0) -> None:
    """End a worker process: free FSDP2 state, leave the process group, exit without interpreter teardown.

    With gloo, FSDP2 modules still alive when the interpreter shuts down intermittently abort the process
    ("terminate called without an active exception", ~1 run in 8 on torch 2.13) after all work is done. Collecting
    them first and skipping the C++ static teardown makes a finished run exit cleanly.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_gather_object(obj) -> list:
    """`obj` from every rank, in rank order (just `[obj]` in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(what: str, value: str) -> None:
    """Raise on every rank if `value` differs between ranks (a rank with another config diverges silently)."""
    digest = hashlib.sha256(value.encode()).hexdigest()
    digests = all_gather_object(digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise RuntimeError(f"{what} differs between ranks (rank 0 vs ranks {odd}); start every rank the same way")


def check_trainable_same_on_all_ranks(model: nn.Module) -> None:
    """Raise if any trainable parameter differs between ranks before sharding (e.g. LoRA initialized per rank)."""
    with torch.no_grad():
        sums = ";".join(
            f"{n}:{p.detach().double().sum().item():.17g}:{p.detach().double().abs().sum().item():.17g}"
            for n, p in model.named_parameters() if p.requires_grad
        )
    check_same_on_all_ranks("the initial trainable parameters (LoRA init)", sums)

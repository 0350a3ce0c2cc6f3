"""For the scripts here that run under torchrun: rank 0 writes every rank's result to one JSON file, then the
process group ends (qfsdp.distributed.shutdown_and_exit)."""

import json

import torch.distributed as dist

from qfsdp.distributed import shutdown_and_exit


def write_and_exit(path: str, result) -> None:
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(results, f)
    shutdown_and_exit()

"""Run under torchrun (gloo): load the checkpoint in argv[2] (safetensors, full precision), quantize and shard it as a
run does, and write this rank's host memory to argv[1] as JSON: its own (anonymous) memory before and at its peak
while loading (hostmem.LoadHostMemory, as summary.json reports it), its peak RSS, which also counts the checkpoint's
memory-mapped pages, and its 4-bit bytes.
"""

import sys

import torch

from qfsdp.config import FSDP2Config, ModelConfig, QuantConfig
from qfsdp.distributed import data_parallel_mesh, init_distributed
from qfsdp.hostmem import GIB, LoadHostMemory
from qfsdp.model import load_model
from qfsdp.shard import parallelize, quantized_bytes
from rank_results import write_and_exit  # beside this script


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


d = init_distributed()
mesh = data_parallel_mesh(d.device.type, d.world_size)
anon_before = anon_bytes()
host_memory = LoadHostMemory()
model = load_model(ModelConfig(path=sys.argv[2]), QuantConfig(), torch.float32)
parallelize(model, mesh, d.device, FSDP2Config(activation_checkpointing=False), param_dtype=torch.float32)
host = host_memory.stop()
result = {"anon_before": anon_before, "peak_anon": host["peak_anon_gib"] * GIB,
          "peak_rss": host["peak_rss_gib"] * GIB, "rank_bytes": quantized_bytes(model)}
write_and_exit(sys.argv[1], result)

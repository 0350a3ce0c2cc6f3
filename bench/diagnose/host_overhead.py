"""Host work per micro-step of FSDP2's per-unit and per-parameter bookkeeping, on any machine (CPU over gloo too):

    torchrun --nproc_per_node 2 bench/diagnose/host_overhead.py [--layers 32] [--units 1,2,4] [--steps 20]

A deep, narrow Llama (hidden 64, `--layers` decoder layers; the 8B shape has 32) with random weights, quantized to
NF4 with LoRA r=16 on every projection, sharded by `qfsdp.shard.parallelize` exactly as training shards it, with
activation checkpointing. Its compute is tiny, so a micro-step (forward and backward, no optimizer) is mostly the
host's own work: FSDP2's hooks, gathers and reduce-scatters, the Python of every module. The unsharded model
(`mesh=None`) is the baseline without FSDP2; each `--units` value k puts k decoder layers in one FSDP2 unit
(fsdp2.layers_per_unit). Per configuration, on rank 0:

- Python function calls per micro-step (cProfile over 3 micro-steps): the same on every run of one software stack
  (it moves with the torch and Python versions and the device path: gloo here, NCCL and CUDA streams on a GPU),
  and the measure of host work in docs/BENCHMARKS.md's CPU table. Calls at 2 processes less calls at one
  are the host work that 2 GPUs add to a micro-step; on an H200 host, where eager steps of the 8B shape wait on the
  host, that work is the likely part of their 40-51 ms a micro-step;
- the median milliseconds per micro-step over `--steps` (after 5 warm-up ones): on CPU this includes gloo's
  collectives, which run synchronously, so it shows the direction, not a GPU host's magnitude.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qfsdp.config import FSDP2Config, LoraConfig, ModelConfig, QuantConfig
from qfsdp.distributed import data_parallel_mesh, init_distributed
from qfsdp.model import attach_lora, load_model, make_trainable_fp32
from qfsdp.shard import parallelize


def checkpoint(layers: int) -> Path:
    """A random-weight checkpoint of the deep tiny Llama, one per process (seconds to write; nothing shared)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(tempfile.gettempdir()) / f"qfsdp-host-overhead-{layers}-{os.environ.get('RANK', '0')}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return path


def measure(model, ids, steps: int) -> tuple[float, float]:
    """(median ms per micro-step, Python calls per micro-step)."""
    model.train()
    times = []
    for _ in range(5 + steps):
        dist.barrier()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    profile.disable()
    model.zero_grad(set_to_none=True)
    calls = sum(stat[1] for stat in pstats.Stats(profile).stats.values()) / 3
    return statistics.median(times[5:]) * 1e3, calls


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--units", default="1,2,4", help="layers per FSDP2 unit, comma-separated")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    path = checkpoint(a.layers)  # before the process group, as training does
    d = init_distributed()
    mesh = data_parallel_mesh(d.device.type, d.world_size, 1)
    ids = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0)).to(d.device)

    def build():
        model = load_model(ModelConfig(path=str(path)), QuantConfig(), torch.bfloat16)
        model = attach_lora(model, LoraConfig(r=16), seed=0)
        make_trainable_fp32(model)
        return model

    results = []
    for k in [int(x) for x in a.units.split(",")]:
        model = parallelize(build(), mesh, d.device, FSDP2Config(layers_per_unit=k), param_dtype=torch.bfloat16)
        results.append((f"{k} layer(s) per unit", *measure(model, ids, a.steps)))
    unsharded = parallelize(build(), None, d.device, FSDP2Config(), param_dtype=torch.bfloat16)
    results.insert(0, ("unsharded (no FSDP2)", *measure(unsharded, ids, a.steps)))
    if d.rank == 0:
        print(f"{a.layers} layers, {d.world_size} process(es) on {d.device.type}, torch {torch.__version__}: "
              f"per micro-step (forward + backward), Python calls and median ms over {a.steps}")
        base_ms, base_calls = results[0][1:]
        for name, ms, calls in results:
            print(f"  {name:24s} {calls:9,.0f} calls (+{calls - base_calls:,.0f})   {ms:8.1f} ms (+{ms - base_ms:.1f})"
                  f"   over unsharded")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

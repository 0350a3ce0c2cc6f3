"""Shared helpers: every test runs the real code (torch, bitsandbytes, PEFT, TRL, Hydra) on the tiny model, with
real processes for distributed runs (torchrun, gloo)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"

# Under pytest-xdist (the README's `-n 2 --dist loadfile`) two test modules run at once on CI's 2 cores: every
# process they start, and the test processes themselves, compute on one OpenMP thread, as torchrun gives each of
# several processes (two-thread processes two at a time on 2 cores mostly wait in OpenMP barriers).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One tiny-model cache for the whole session, shared with every subprocess."""
    os.environ.setdefault("QFSDP_CACHE", str(tmp_path_factory.mktemp("qfsdp-cache")))
    os.environ["PYTHONUNBUFFERED"] = "1"


def run_cmd(args: list[str], timeout: int = 300, env: dict | None = None, cwd: Path = ROOT):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def launch(*overrides: str, timeout: int = 300, check: bool = True, env: dict | None = None):
    """`python launch.py OVERRIDES...`, as a user types it."""
    result = run_cmd([sys.executable, "launch.py", *overrides], timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(overrides)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def torchrun(nproc: int, *args: str, timeout: int = 300, check: bool = True):
    result = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      *args], timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def tree_digest(path: Path) -> str:
    """Every file's name and bytes under `path`: equal digests, an untouched directory."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def save_prequantized_tiny(out: Path) -> Path:
    """The tiny model saved in bitsandbytes 4-bit (NF4, double quant, bf16 compute), as hub `...-bnb-4bit`
    checkpoints are: quantized from bf16 weights, as a bf16 run quantizes at load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qfsdp.tiny import tiny_model_path

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny"), quantization_config=q,
                                                 device_map={"": "cpu"}, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path("tiny")).save_pretrained(out)
    return out


# Runs several test modules read (OPT training, export), each launched once per test session on first use.
SHARED_RUNS = {
    "opt_full_ws1": ["model=tiny_opt", "lora=none", "quant=none", "precision=fp32", "world_size=1"],
    "opt_full_ws2": ["model=tiny_opt", "lora=none", "quant=none", "precision=fp32", "world_size=2"],
    # 4-bit + LoRA in the default precision (bf16); a high learning rate, so the adapter visibly moves the logits
    "opt_qlora_ws2": ["model=tiny_opt", "world_size=2", "trainer.learning_rate=1e-2"],
    "llama_qlora_fp32": ["precision=fp32", "world_size=1", "trainer.learning_rate=1e-2"],
    # Qwen2's attention biases, trained too (lora.bias=lora_only)
    "qwen2_qlora_bias_fp32": ["model=tiny_qwen2", "lora.bias=lora_only", "precision=fp32", "world_size=1",
                              "trainer.learning_rate=1e-2"],
}
SHARED_STEPS = 3


class _SharedRuns(dict):
    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        launch(*SHARED_RUNS[name], f"trainer.max_steps={SHARED_STEPS}", f"hydra.run.dir={self.root / name}",
               timeout=600)
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> dict[str, Path]:
    return _SharedRuns(tmp_path_factory.mktemp("shared-runs"))

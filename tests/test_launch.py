"""The launch commands of the README, end to end, and what every run leaves behind."""

from __future__ import annotations

import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SCRIPTS, launch, metrics, run_cmd, summary, torchrun, tree_digest

METRIC_KEYS = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gib"}
SUMMARY_KEYS = {"world_size", "steps", "final_loss", "tokens_per_second", "peak_memory_gib",
                "quantized_bytes_per_rank", "wall_time_s", "versions"}


def assert_finished_run(run_dir: Path, world_size: int, steps: int) -> dict:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert METRIC_KEYS <= r.keys()
        assert len(r["peak_memory_gib"]) == world_size and all(m > 0 for m in r["peak_memory_gib"])
        assert r["tokens_per_second"] > 0 and r["loss"] > 0
    # Step phases (metrics.StepPhases; tests/test_step_phases.py for the arithmetic): one duration per micro-step,
    # and the steps' phases fit in the run's wall time (CPU runs: the same clock; a profiled step's writing is
    # outside its phases, so only an upper bound holds).
    micro = {len(r["micro_steps_ms"]) for r in rows}
    assert len(micro) == 1 and micro.pop() >= 1
    phased = sum(sum(r["micro_steps_ms"]) + r["optimizer_ms"] + r["after_optimizer_ms"] + r.get("between_steps_ms", 0)
                 for r in rows[1:]) / 1e3
    assert 0 < phased <= (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) * 1.05 + 0.05
    s = summary(run_dir)
    assert SUMMARY_KEYS <= s.keys()
    assert s["world_size"] == world_size and s["steps"] == steps and s["final_loss"] == rows[-1]["loss"]
    assert len(s["peak_memory_gib"]) == len(s["quantized_bytes_per_rank"]) == world_size
    assert set(s["versions"]) == {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert not list(run_dir.glob("error-rank*.txt"))
    assert_load_host_memory(s, world_size)
    return s


def assert_load_host_memory(s: dict, world_size: int) -> None:
    """Every rank's host memory while loading: its own (anonymous) peak is part of its peak RSS; the node's figures
    are the sums over its ranks (the tests' ranks all run on this host)."""
    ranks = s["load_host_memory"]
    assert len(ranks) == world_size
    for r in ranks:
        assert 0 < r["peak_anon_gib"] <= r["peak_rss_gib"], r
    host = socket.gethostname()
    assert {r["host"] for r in ranks} == {host}
    assert s["load_host_memory_per_node"] == {host: {
        "processes": world_size, "peak_rss_gib": pytest.approx(sum(r["peak_rss_gib"] for r in ranks)),
        "peak_anon_gib": pytest.approx(sum(r["peak_anon_gib"] for r in ranks))}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`python launch.py`, exactly as the README says, from a fresh directory."""
    cwd = tmp_path_factory.mktemp("demo")
    result = run_cmd([sys.executable, str(ROOT / "launch.py")], cwd=cwd, timeout=600)  # 60 steps, a busy machine
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = list((cwd / "outputs").glob("*/*"))
    return result, run_dir


def test_default_demo(demo):
    result, run_dir = demo
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", f"{run_dir.parent.name}/{run_dir.name}")
    s = assert_finished_run(run_dir, world_size=1, steps=60)
    # it visibly learns (the bar: 80% of the first loss), below uniform guessing over the vocabulary too
    assert s["losses"][-1] <= 0.8 * s["losses"][0], s["losses"]
    assert s["losses"][-1] < math.log(512) - 0.5, s["losses"]
    assert len(metrics(run_dir)[0]["micro_steps_ms"]) == 4  # global batch 8 = micro batch 2 x 4 micro-steps
    assert f"results in {run_dir}" in result.stdout
    assert "it/s" in result.stderr  # the progress bar
    # Library warnings (transformers' deprecations, accelerate's thread notice) go to the run's log, not the console.
    console = result.stdout + result.stderr
    assert not re.search(r"\w+Warning\b", console), console[-3000:]
    assert re.search(r"\[py\.warnings\]\[WARNING\] - .*\w+Warning: ", (run_dir / "launch.log").read_text())


def test_finished_run_is_never_overwritten(demo):
    _, run_dir = demo
    before = tree_digest(run_dir)
    result = launch(f"hydra.run.dir={run_dir}", "trainer.max_steps=2", check=False)
    assert result.returncode == 2
    assert "holds a finished run" in result.stderr and "hydra.run.dir" in result.stderr
    assert tree_digest(run_dir) == before


@pytest.mark.slow
def test_host_memory_while_loading_on_two_processes(shared_runs):
    """summary.json holds both ranks' host memory peaks while loading and their node's sums; rank 0 logs the
    node's line in launch.log."""
    run_dir = shared_runs["opt_qlora_ws2"]
    s = summary(run_dir)
    assert_load_host_memory(s, world_size=2)
    node = s["load_host_memory_per_node"][socket.gethostname()]
    line = (f"loading: host memory peak {node['peak_rss_gib']:.2f} GiB RSS, {node['peak_anon_gib']:.2f} GiB own "
            "(all 2 processes of this node)")
    assert line in (run_dir / "launch.log").read_text()


@pytest.mark.slow
def test_torchrun_shares_one_run_dir(tmp_path):
    """Under torchrun, 2 processes with offload, compile and the profiler together."""
    result = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      str(ROOT / "launch.py"), "fsdp2=offload", "compile=true", "profile=true", "trainer.max_steps=5"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs  # both ranks in one directory, no per-rank timestamps
    assert_finished_run(run_dirs[0], world_size=2, steps=5)
    assert result.stdout.count("results in") == 1  # rank 0 alone reports
    # profile=true: rank 0 profiled optimizer steps 4-5
    profile = (run_dirs[0] / "profile.txt").read_text()
    assert profile.startswith("optimizer steps 4-5: wall") and "aten::mm" in profile


@pytest.mark.slow
def test_rank_with_different_config_is_an_error(tmp_path):
    result = torchrun(2, "launch.py", "seed=${oc.env:RANK}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'r'}",
                      check=False)
    assert result.returncode != 0
    assert "the composed config differs between ranks" in result.stdout + result.stderr
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.slow
def test_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = launch("-m", "world_size=1,2", "fsdp2=default,offload", "trainer.max_steps=3",
                    f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        ws = int(re.search(r"world_size=(\d)", overrides).group(1))
        assert_finished_run(job, world_size=ws, steps=3)
        seen.add((ws, "offload" in overrides))
    assert seen == {(1, False), (1, True), (2, False), (2, True)}
    assert result.stdout.count("results in") == 4


def test_default_dirs(tmp_path):
    result = launch("--cfg", "hydra")
    assert "dir: outputs/${qfsdp_now:%Y-%m-%d}/${qfsdp_now:%H-%M-%S}" in result.stdout
    assert "dir: multirun_outputs/${qfsdp_now:%Y-%m-%d}/${qfsdp_now:%H-%M-%S}" in result.stdout


@pytest.mark.slow
def test_trained_adapter_gives_trained_logits(tmp_path):
    """The adapter saved from a 2-process run, reloaded into a plain PeftModel on the unsharded 4-bit base,
    reproduces the trained sharded model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qfsdp.tiny import tiny_model_path

    run_dir = tmp_path / "probe"
    torchrun(2, str(SCRIPTS / "train_and_probe.py"), str(run_dir), "precision=fp32", "trainer.max_steps=4",
             "trainer.learning_rate=1e-2")
    probe = torch.load(run_dir / "probe.pt")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny"), quantization_config=q,
                                                device_map={"": "cpu"}, dtype=torch.float32)
    for m in base.modules():  # same CPU kernels as training (see qfsdp.nf4.to_nf4_weight)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids=probe["input_ids"]).logits.float()
    assert (probe["logits"] - base_logits).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)

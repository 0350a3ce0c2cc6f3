"""Mid-run checkpoints and resuming (qfsdp/checkpoint.py, docs/checkpoints.md), with real torchrun processes over
gloo on the tiny model.

One uninterrupted 2-process fp32 run of 12 steps with checkpoints at steps 6 and 12 is the reference for:
- the same run killed (`kill -9` of rank 1) in the middle of step 8, resumed with `resume=auto`, killed again in the
  middle of step 12's save, and resumed again: losses and final adapter bit-identical to the reference;
- its step-6 checkpoint continued at world_size=1 with fsdp2=offload in a new run directory, and that run's step-9
  checkpoint continued at world_size=2 without offload: losses within 1e-5;
- its step-6 checkpoint continued at world_size=4, and as HSDP (2 replica groups x 2 shards) at 4 processes whose
  step-9 checkpoint is continued as plain FSDP at 2: losses within 1e-5 (slow: 4 processes on CPU);
- every bad input, refused before any weights load with one line.
A 1-process pair in bf16 (the default precision; 6 steps, resumed at 3) checks resuming there (the bound: 1e-6;
measured: bit-identical). The tiny OPT fully fine-tuned (lora=none quant=none: every weight is trained and saved) on
2 processes, fp32, 6 steps saving every 3, is killed in the middle of step 5 and resumed: bit-identical again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SCRIPTS, adapter_weights, launch, metrics, summary, tree_digest
from qfsdp import checkpoint
from qfsdp.config import compose_config
from qfsdp.validate import ConfigError, Machine, validate

pytestmark = pytest.mark.slow  # most start 2 or more processes: `pytest -m "not slow"` leaves them out

STEPS = 12
# One OpenMP thread, as torchrun gives each of several processes: a 2-thread process on a busy 2-core machine spends
# most of its time in OpenMP barriers (4x slower here).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
REFERENCE = ["world_size=2", "precision=fp32", f"trainer.max_steps={STEPS}", "trainer.save_strategy=steps",
             "trainer.save_steps=6"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    launch(*REFERENCE, f"hydra.run.dir={run_dir}", timeout=600)
    return run_dir


def _launch_and_kill(args: list[str], pause: str, logs: Path) -> tuple[int, str, str]:
    """`python launch.py ARGS` with one rank held at `pause` (tests/scripts/pause_rank), then `kill -9` of that
    rank's process. Returns the launcher's exit code, stdout and stderr."""
    marker = logs / "paused.pid"
    env = {**os.environ, "QFSDP_TEST_PAUSE": pause, "QFSDP_TEST_PAUSE_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(p for p in [str(SCRIPTS / "pause_rank"), os.environ.get("PYTHONPATH")] if p)}
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    with out.open("w") as o, err.open("w") as e:
        # its own process group: if the test fails half-way, the launcher, torchrun and the workers go with it
        proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, env=env, stdout=o, stderr=e,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while not marker.exists():
                assert proc.poll() is None, f"ended before the pause ({proc.returncode}):\n{err.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "the rank never reached the pause"
                time.sleep(0.2)
            os.kill(int(marker.read_text()), signal.SIGKILL)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, out.read_text(), err.read_text()


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, reference) -> dict:
    """The reference's config with `resume=auto` and save_total_limit=1, run three times into one directory: killed
    in the middle of step 8, then in the middle of step 12's save, then to the end. What each stage left is kept."""
    root = tmp_path_factory.mktemp("crash")
    run_dir = root / "run"
    args = [*REFERENCE, "trainer.save_total_limit=1", f"hydra.run.dir={run_dir}"]
    seen: dict = {"run_dir": run_dir}
    (root / "mid-step").mkdir()
    seen["mid_step"] = _launch_and_kill([*args, "resume=auto"], "1:step:8", root / "mid-step")
    seen["after_mid_step"] = sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).iterdir())
    # the same command without resume: refused, and nothing in the directory changes (Hydra's .hydra/ included)
    before = tree_digest(run_dir)
    seen["without_resume"] = launch(*args, check=False)
    seen["unchanged_without_resume"] = tree_digest(run_dir) == before
    (root / "mid-save").mkdir()
    seen["mid_save"] = _launch_and_kill([*args, "resume=auto"], "1:save:12", root / "mid-save")
    seen["after_mid_save"] = sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).iterdir())
    interrupted = run_dir / checkpoint.CHECKPOINTS / checkpoint.SAVING / "checkpoint-12"
    seen["interrupted_save"] = shutil.copytree(interrupted, root / "interrupted-save")
    seen["final"] = launch(*args, "resume=auto", timeout=600)
    return seen


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def _assert_same_adapter(a: dict, b: dict, rel: float = 0.0) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        if rel == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            assert (a[key] - b[key]).abs().max().item() <= rel * a[key].abs().max().item() + 1e-9, key


def test_checkpoints_and_their_metrics(reference):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [p.name for p in checkpoint.step_dirs(reference)] == ["step-6", "step-12"]
    assert not (reference / checkpoint.CHECKPOINTS / checkpoint.SAVING).exists()
    for path in checkpoint.step_dirs(reference):
        assert checkpoint.incomplete_reason(path) is None
        info = checkpoint.manifest(path)
        step = info["step"]
        assert step == checkpoint.step_of(path) and info["world_size"] == 2 and info["base_fingerprint"]
        # each rank wrote its own shard; nothing of the frozen base is saved
        assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt",
                "trainer_state.json", "config.yaml", "adapter/adapter_model.safetensors"} <= info["files"].keys()
        assert info["save_bytes"] < 2e6 and info["save_s"] > 0
        # the step's own row reports the save; the checkpoint keeps the rows up to it
        row = rows[step - 1]
        assert row["checkpoint"] == f"checkpoints/step-{step}"
        assert (row["save_s"], row["save_bytes"]) == (info["save_s"], info["save_bytes"])
        assert checkpoint.checkpoint_rows(path) == rows[:step]
    assert sum("checkpoint" in r for r in rows) == 2


def test_checkpoint_adapter_is_the_whole_trained_adapter(reference, tmp_path):
    """The PEFT adapter in a checkpoint holds every rank's part (accelerate#4206 saved rank 0's alone): it equals the
    trained weights the ranks wrote to dcp/, reassembled, and loads into a plain PeftModel."""
    from peft import PeftModel
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from qfsdp.tiny import tiny_model_path

    step6 = reference / "checkpoints" / "step-6"
    dcp_to_torch_save(step6 / "dcp", tmp_path / "full.pt")
    trained = torch.load(tmp_path / "full.pt")["model"]
    adapter = adapter_weights(step6)
    assert len(adapter) == len(trained) == 28  # 2 layers x 7 projections x (A, B)
    for name, value in trained.items():
        assert torch.equal(adapter[name.replace(".default.", ".")], value), name
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny")), step6 / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(loaded[n], v) for n, v in trained.items())


def test_kill_mid_step_and_mid_save_then_resume(reference, crashed):
    run_dir = crashed["run_dir"]
    code, out, err = crashed["mid_step"]
    assert "resume=auto: no complete checkpoint" in out and "starting fresh" in out
    # torchrun ends the job; the launcher names the first recorded error (rank 0's broken connection to rank 1) or,
    # when torchrun stopped rank 0 before it noticed, a process that died without a Python error; and where to go on
    assert code == 1, err[-3000:]
    error = [line for line in err.splitlines() if line.startswith("qfsdp: error:")]
    assert len(error) == 1, err[-3000:]
    assert error[0].startswith("qfsdp: error: rank 0: ") or "no rank recorded an error" in error[0], error[0]
    assert error[0].endswith("continue from checkpoints/step-6 with resume=auto (same run directory)")
    assert crashed["after_mid_step"] == ["step-6"]

    code, out, err = crashed["mid_save"]
    assert code == 1 and "resuming from" in out and "step-6 (step 6 of 12)" in out
    assert "continue from checkpoints/step-6 with resume=auto" in err
    # the interrupted save is a temporary directory without checkpoint.json; step-6 is whole
    assert crashed["after_mid_save"] == [checkpoint.SAVING, "step-6"]
    assert "no checkpoint.json" in checkpoint.incomplete_reason(crashed["interrupted_save"])
    assert (crashed["interrupted_save"] / "dcp").is_dir()

    # resumed from step 6 again: the whole run equals the uninterrupted one, bit for bit
    assert "resuming from" in crashed["final"].stdout
    assert _losses(run_dir) == _losses(reference)
    _assert_same_adapter(adapter_weights(run_dir), adapter_weights(reference))
    _assert_same_adapter(adapter_weights(run_dir / "checkpoints" / "step-12"),
                         adapter_weights(reference / "checkpoints" / "step-12"))
    s = summary(run_dir)
    assert s["steps"] == STEPS and s["losses"] == _losses(reference)
    # save_total_limit=1 keeps the newest complete checkpoint only
    assert [p.name for p in checkpoint.checkpoints_dir(run_dir).iterdir()] == ["step-12"]


def test_unfinished_run_without_resume_is_refused(crashed):
    result = crashed["without_resume"]
    assert result.returncode == 2
    assert "holds an unfinished run (its newest complete checkpoint is step-6)" in result.stderr
    assert "resume=auto" in result.stderr
    assert crashed["unchanged_without_resume"]


def test_resume_at_another_world_size_with_offload(reference, tmp_path):
    """A finished run's checkpoint, written by 2 processes without offload, continued by one with fsdp2=offload in
    a new directory (the data position is in optimizer steps of the global batch, and DCP reshards on load); that
    run's own step-9 checkpoint continued by 2 processes without offload (1 -> 2)."""
    before = tree_digest(reference)
    run_dir, two = tmp_path / "one", tmp_path / "two"
    result = launch("world_size=1", "fsdp2=offload", "precision=fp32", f"trainer.max_steps={STEPS}",
                    "trainer.save_strategy=steps", "trainer.save_steps=3",
                    f"resume={reference / 'checkpoints' / 'step-6'}", f"hydra.run.dir={run_dir}", env=ONE_THREAD)
    assert "changed: fsdp2.offload: false -> true" in result.stdout and "world_size: 2 -> 1" in result.stdout
    assert tree_digest(reference) == before  # a finished run is never written
    rows, ref = metrics(run_dir), metrics(reference)
    assert rows[:6] == ref[:6]  # the checkpoint's rows
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(rows[6:], ref[6:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert len(a["peak_memory_gib"]) == 1
    _assert_same_adapter(adapter_weights(run_dir), adapter_weights(reference), rel=1e-5)

    step9 = run_dir / "checkpoints" / "step-9"
    assert checkpoint.manifest(step9)["world_size"] == 1
    result = launch("world_size=2", "precision=fp32", f"trainer.max_steps={STEPS}", f"resume={step9}",
                    f"hydra.run.dir={two}", timeout=600)
    assert "world_size: 1 -> 2" in result.stdout and "fsdp2.offload: true -> false" in result.stdout
    _assert_losses_close(two, reference, range(7, STEPS + 1))
    assert len(metrics(two)[-1]["peak_memory_gib"]) == 2
    _assert_same_adapter(adapter_weights(two), adapter_weights(reference), rel=1e-5)


def _assert_losses_close(run_dir: Path, ref: Path, steps: range) -> None:
    """The losses of `steps` within 1e-5 of the reference run's (the bound for any two world sizes)."""
    rows = {r["step"]: r["loss"] for r in metrics(run_dir)}
    ref_rows = {r["step"]: r["loss"] for r in metrics(ref)}
    assert [s for s in rows if s in steps] == list(steps)
    for step in steps:
        assert abs(rows[step] - ref_rows[step]) <= 1e-5, (step, rows[step], ref_rows[step])


def test_resume_from_two_to_four_processes(reference, tmp_path):
    run_dir = tmp_path / "four"
    result = launch("world_size=4", "precision=fp32", f"trainer.max_steps={STEPS}",
                    f"resume={reference / 'checkpoints' / 'step-6'}", f"hydra.run.dir={run_dir}", timeout=600)
    assert "world_size: 2 -> 4" in result.stdout
    assert metrics(run_dir)[:6] == metrics(reference)[:6]
    _assert_losses_close(run_dir, reference, range(7, STEPS + 1))
    assert len(metrics(run_dir)[-1]["peak_memory_gib"]) == 4
    _assert_same_adapter(adapter_weights(run_dir), adapter_weights(reference), rel=1e-5)


def test_resume_from_hsdp_to_fsdp(reference, tmp_path):
    """A checkpoint written by HSDP (4 processes, 2 replica groups x 2 shards: each shard is held twice) continued
    by plain FSDP on 2. The HSDP run itself continues the reference's step-6 checkpoint up to step 9, so that the
    whole chain is compared with one uninterrupted run (constant learning rate: a shorter max_steps changes
    nothing before it)."""
    hsdp, fsdp = tmp_path / "hsdp", tmp_path / "fsdp"
    # the save settings are this run's own, not the checkpoint's
    launch("world_size=4", "fsdp2=hsdp", "precision=fp32", "trainer.max_steps=9", "trainer.save_strategy=steps",
           "trainer.save_steps=3", f"resume={reference / 'checkpoints' / 'step-6'}", f"hydra.run.dir={hsdp}",
           timeout=600)
    step9 = hsdp / "checkpoints" / "step-9"
    assert checkpoint.manifest(step9)["world_size"] == 4
    _assert_losses_close(hsdp, reference, range(7, 10))
    result = launch("world_size=2", "precision=fp32", f"trainer.max_steps={STEPS}", f"resume={step9}",
                    f"hydra.run.dir={fsdp}", timeout=600)
    assert "fsdp2.replicate: 2 -> 1" in result.stdout and "world_size: 4 -> 2" in result.stdout
    _assert_losses_close(fsdp, reference, range(7, STEPS + 1))
    _assert_same_adapter(adapter_weights(fsdp), adapter_weights(reference), rel=1e-5)


def test_bf16_resume_is_exact(tmp_path):
    args = ["world_size=1", "trainer.max_steps=6"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(*args, "trainer.save_strategy=steps", "trainer.save_steps=3", f"hydra.run.dir={full}", env=ONE_THREAD)
    launch(*args, f"resume={full / 'checkpoints' / 'step-3'}", f"hydra.run.dir={resumed}", env=ONE_THREAD)
    for a, b in zip(_losses(resumed), _losses(full), strict=True):
        assert abs(a - b) <= 1e-6
    a, b = adapter_weights(resumed), adapter_weights(full)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max().item() <= 1e-6, key


# ---- full fine-tuning (every weight trained and saved) on OPT ----

OPT_FULL = ["model=tiny_opt", "lora=none", "quant=none", "world_size=2", "precision=fp32", "trainer.max_steps=6",
            "trainer.save_strategy=steps", "trainer.save_steps=3"]


@pytest.fixture(scope="module")
def opt_full(tmp_path_factory) -> dict:
    """An uninterrupted run, and the same run killed (rank 1, `kill -9`) in the middle of step 5, then resumed."""
    root = tmp_path_factory.mktemp("opt-full")
    runs = {"reference": root / "reference", "run": root / "run"}
    launch(*OPT_FULL, f"hydra.run.dir={runs['reference']}", timeout=600)
    (root / "mid-step").mkdir()
    runs["mid_step"] = _launch_and_kill([*OPT_FULL, "resume=auto", f"hydra.run.dir={runs['run']}"], "1:step:5",
                                        root / "mid-step")
    runs["final"] = launch(*OPT_FULL, "resume=auto", f"hydra.run.dir={runs['run']}", timeout=600)
    return runs


def _checkpoint_weights(step_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir / checkpoint.DCP_DIR, tmp_path / f"{step_dir.name}.pt")
    return torch.load(tmp_path / f"{step_dir.name}.pt")["model"]


def test_full_finetune_checkpoint_holds_every_weight(opt_full, tmp_path):
    """dcp/ holds the whole model, unquantized: at the last step it equals the model the run saved at its end."""
    ref = opt_full["reference"]
    final = load_file(ref / "model" / "model.safetensors")
    step3, step6 = (_checkpoint_weights(ref / "checkpoints" / f"step-{n}", tmp_path) for n in (3, 6))
    # every weight but the head, which is the input embedding (tied) and saved once
    assert step6.keys() == final.keys() - {"lm_head.weight"} and len(step6) == 36
    assert torch.equal(final["lm_head.weight"], final["model.decoder.embed_tokens.weight"])
    for name, value in step6.items():
        assert value.dtype == torch.float32 and torch.equal(value, final[name]), name
    assert not any(torch.equal(step3[n], step6[n]) for n in step6)  # steps 4-6 moved every weight
    for step_dir in checkpoint.step_dirs(ref):
        assert not (step_dir / checkpoint.ADAPTER_DIR).exists()  # no LoRA: the weights are in dcp/ only


def test_full_finetune_killed_and_resumed_exactly(opt_full):
    code, out, err = opt_full["mid_step"]
    assert code == 1 and "continue from checkpoints/step-3 with resume=auto" in err, err[-3000:]
    assert "resuming from" in opt_full["final"].stdout and "step-3 (step 3 of 6)" in opt_full["final"].stdout
    run, ref = opt_full["run"], opt_full["reference"]
    assert _losses(run) == _losses(ref) and len(_losses(run)) == 6
    a, b = load_file(run / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) == 37
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- bad input: one line, before any weights load ----

def _resume_error(*overrides, run_dir: Path) -> str:
    with pytest.raises(ConfigError) as e:
        checkpoint.resolve_resume(compose_config(list(overrides)), run_dir)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("override,expected", [
    ("model.path=tiny_4layers", "model.path=tiny"),
    ("lora.r=8", "lora.r=16"),
    ("trainer.global_batch_size=16", "trainer.global_batch_size=8"),
    ("seed=7", "seed=42"),
])
def test_resume_with_a_different_setup_is_refused(reference, tmp_path, override, expected):
    step6 = reference / "checkpoints" / "step-6"
    msg = _resume_error(*REFERENCE, override, f"resume={step6}", run_dir=tmp_path)
    assert f"resume with {expected}" in msg and str(step6) in msg


def test_resume_with_other_base_weights_is_refused(reference, tmp_path):
    """The base is reloaded, not saved: weights replaced under the same model.path are recognized by the fingerprint
    the checkpoint recorded."""
    from qfsdp.tiny import tiny_model_path

    weights = tiny_model_path("tiny") / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        msg = _resume_error(*REFERENCE, f"resume={reference / 'checkpoints' / 'step-6'}", run_dir=tmp_path)
    finally:
        weights.write_bytes(original)
    assert "differ from those" in msg and "fingerprint" in msg


def test_incomplete_checkpoints_are_refused(reference, crashed, tmp_path):
    broken = shutil.copytree(reference / "checkpoints" / "step-6", tmp_path / "checkpoints" / "step-6")
    (broken / "dcp" / "__1_0.distcp").unlink()
    msg = _resume_error(*REFERENCE, f"resume={broken}", run_dir=tmp_path)
    assert "not a complete checkpoint: dcp/__1_0.distcp is missing" in msg
    msg = _resume_error(*REFERENCE, f"resume={crashed['interrupted_save']}", run_dir=tmp_path)
    assert "no checkpoint.json" in msg and "its save did not finish" in msg
    assert "does not exist" in _resume_error(*REFERENCE, f"resume={tmp_path / 'nowhere'}", run_dir=tmp_path)
    msg = _resume_error(*REFERENCE, "trainer.max_steps=6", f"resume={reference / 'checkpoints' / 'step-6'}",
                        run_dir=tmp_path)
    assert "nothing to train" in msg and "trainer.max_steps" in msg
    # resume=auto skips what is incomplete: here nothing is left, so the run starts fresh
    assert checkpoint.resolve_resume(compose_config([*REFERENCE, "resume=auto"]), tmp_path) is None


@pytest.mark.parametrize("overrides,expected", [
    (["trainer.save_steps=0"], "trainer.save_steps=0"),
    (["trainer.save_steps=-5"], "trainer.save_steps=-5"),
    (["trainer.save_total_limit=0"], "trainer.save_total_limit=0"),
])
def test_bad_save_settings(overrides, expected):
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["trainer.save_strategy=steps", *overrides]), Machine(gpus=0))
    assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="save_strategy=epoch is not supported"):
        validate(compose_config(["trainer.save_strategy=epoch"]), Machine(gpus=0))


def test_cli_refusals_before_loading(reference, crashed, tmp_path):
    started = time.monotonic()
    run_dir = tmp_path / "run"
    result = launch(*REFERENCE, f"resume={crashed['interrupted_save']}", f"hydra.run.dir={run_dir}", check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("qfsdp: error:")]
    assert len(lines) == 1 and "not a complete checkpoint" in lines[0]
    assert "Loading weights" not in result.stderr and not run_dir.exists()
    # a finished run is never continued in place (its checkpoints may go on into another directory)
    result = launch(*REFERENCE, "resume=auto", f"hydra.run.dir={reference}", check=False)
    assert result.returncode == 2 and "holds a finished run" in result.stderr
    assert time.monotonic() - started < 120

"""Watching a run (qfsdp/progress.py): one progress bar with loss, tokens/s and memory on the console, one log file,
TensorBoard and wandb (offline) writing inside the run directory; the default reports nowhere."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT, metrics, run_cmd

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
NO_WANDB = "wandb is not installed (pip install -e '.[test]' installs it)"


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """`python launch.py world_size=2 trainer.report_to=[tensorboard,wandb]` from a fresh directory, wandb offline."""
    cwd = tmp_path_factory.mktemp("watch")
    run_dir = cwd / "run"
    report_to = "[tensorboard,wandb]" if HAVE_WANDB else "tensorboard"
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_DIR", "WANDB_PROJECT", "TENSORBOARD_LOGGING_DIR"):  # qfsdp's defaults under test
            env.delenv(name, raising=False)
        result = run_cmd([sys.executable, str(ROOT / "launch.py"), "world_size=2", "trainer.max_steps=3",
                          f"trainer.report_to={report_to}", f"hydra.run.dir={run_dir}"],
                         cwd=cwd, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result, run_dir, cwd


def _bars(stderr: str) -> tuple[int, str]:
    """How many tqdm bars the console got, and the last one's final state. A bar redraws itself after \\r, which
    text-mode subprocess output turns into a line break, so each bar is counted by its first draw (0%)."""
    draws = [line for line in stderr.splitlines() if "%|" in line]
    return sum(bool(re.match(r"\s*0%\|", line)) for line in draws), draws[-1]


@pytest.mark.slow
def test_one_progress_bar_with_loss_tokens_and_memory(watched):
    result, run_dir, _ = watched
    count, bar = _bars(result.stderr)
    assert count == 1  # no dataset-preprocessing bars, no second training bar, nothing from rank 1
    last = metrics(run_dir)[-1]
    assert "3/3" in bar
    assert f"loss={last['loss']:.4f}" in bar
    assert f"tokens/s={last['tokens_per_second']:,.0f}" in bar
    assert f"peak={max(last['peak_memory_gib']):.2f}GiB" in bar
    # transformers' ProgressCallback printed the log dict under the bar at every step; the postfix replaces it
    assert "'loss':" not in result.stdout + result.stderr


@pytest.mark.slow
def test_one_log_file_with_every_step(watched):
    _, run_dir, _ = watched
    assert [p.name for p in run_dir.glob("*.log")] == ["launch.log"]
    lines = (run_dir / "launch.log").read_text().splitlines()
    steps = [line for line in lines if "][qfsdp][INFO] - step " in line]
    assert len(steps) == 3
    for line, row in zip(steps, metrics(run_dir)):
        assert re.search(rf"step {row['step']}/3: loss={row['loss']:.4f}, tokens/s=[\d,]+, peak=[\d.]+GiB$", line)


@pytest.mark.slow
def test_tensorboard_events_in_the_run_directory(watched):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[test]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, cwd = watched
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics(run_dir)]
    assert not (run_dir / "trainer" / "runs").exists() and not (cwd / "runs").exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WANDB, reason=NO_WANDB)
def test_wandb_offline_run_in_the_run_directory(watched):
    _, run_dir, cwd = watched
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (data,) = offline.glob("run-*.wandb")
    content = data.read_bytes()
    # the run was closed (wandb flushes at interpreter exit, which workers skip): every step's loss is in it
    for row in metrics(run_dir):
        assert json.dumps(row["loss"]).encode() in content
    assert b"train/loss" in content
    assert not (cwd / "wandb").exists()  # not in the directory the command ran from


def test_report_to_takes_a_name_or_a_list_and_defaults_to_none(tmp_path):
    from qfsdp.config import compose_config
    from qfsdp.train import sft_config

    def report_to(*overrides: str) -> list[str]:
        return sft_config(compose_config(overrides), Path(tmp_path), 1, use_cpu=True).report_to

    assert report_to() == []
    assert report_to("trainer.report_to=tensorboard") == ["tensorboard"]
    assert report_to("trainer.report_to=[tensorboard,wandb]") == ["tensorboard", "wandb"]


def test_disable_tqdm_prints_one_line_per_step(tmp_path, capsys):
    """`trainer.disable_tqdm=true` (consoles that are log files): a line per step instead of a bar or a dict."""
    from types import SimpleNamespace

    from qfsdp.progress import ProgressBar

    (tmp_path / "launch.log").write_text("")
    row = {"step": 1, "loss": 6.25, "tokens_per_second": 1234.5, "peak_memory_gib": [0.5, 0.75]}
    metrics = SimpleNamespace(rows=[row], eval_rows=[])
    bar = ProgressBar(metrics, tmp_path)
    args = SimpleNamespace(disable_tqdm=True)
    state = SimpleNamespace(is_world_process_zero=True, global_step=1, max_steps=3)
    bar.on_train_begin(args, state, None)
    bar.on_step_end(args, state, None)
    bar.on_log(args, state, None, logs={"loss": 6.25})
    # an evaluation (MetricsCallback recorded it first): its own line, then every step's line carries it
    metrics.eval_rows.append({"step": 1, "eval_loss": 6.5})
    bar.on_log(args, state, None, logs={"eval_loss": 6.5})
    state.global_step = 2
    metrics.rows.append({**row, "step": 2})
    bar.on_log(args, state, None, logs={"loss": 6.25})
    bar.on_log(args, state, None, logs={"train_runtime": 1.0})  # the end-of-training summary: not a step
    bar.on_train_end(args, state, None)
    assert capsys.readouterr().out == ("step 1/3: loss=6.2500, tokens/s=1,234, peak=0.75GiB\n"
                                       "step 1/3: eval_loss=6.5000\n"
                                       "step 2/3: loss=6.2500, tokens/s=1,234, peak=0.75GiB, eval_loss=6.5000\n")
    assert (tmp_path / "launch.log").read_text().endswith(
        " - step 2/3: loss=6.2500, tokens/s=1,234, peak=0.75GiB, eval_loss=6.5000\n")


def test_library_notices_go_to_the_run_log_only(tmp_path, capsys):
    """transformers' own logger (its default handler prints to the console) ends in the run's log, as warnings do."""
    import logging

    from transformers.utils import logging as hf_logging

    from qfsdp.progress import log_to_run_log_only

    (tmp_path / "launch.log").write_text("")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
             for name in ("py.warnings", "qfsdp", "transformers")}
    try:
        log_to_run_log_only(tmp_path)
        hf_logging.get_logger("transformers.tokenization_utils_base").warning("a notice nobody can act on")
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
    assert "a notice nobody can act on" not in capsys.readouterr().err
    assert "[transformers.tokenization_utils_base][WARNING] - a notice nobody can act on" in (
        tmp_path / "launch.log").read_text()

"""The sweep report (qfsdp/report.py): written into the sweep directory by `python launch.py -m ...`, redone by
`python -m qfsdp.report`, every value checked against the runs' own files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTS, launch, metrics, run_cmd, summary

COLUMNS = ["job", "overrides", "world_size", "status", "error", "steps", "final_loss", "eval_loss", "max_abs_dloss",
           "dloss_reference", "tokens_per_second", "mfu", "peak_memory_gib", "wall_time_s", "device", "run_dir"]
REPORT_FILES = ["summary.csv", "summary.md", "loss_curves.png", "throughput.png", "memory.png"]
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def report_cmd(*args: str):
    return run_cmd([sys.executable, "-m", "qfsdp.report", *args])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Jobs, in Hydra's order: 0 world_size=2 and 2 world_size=1 at global batch 8 (the same losses), 1 world_size=2
    at global batch 2, which fails (2 % (2 x 2)), and the sweep goes on; 3 world_size=1 at global batch 2 (a reference
    of its own: the failed job logged no losses)."""
    sweep_dir = tmp_path_factory.mktemp("report") / "sweep"
    result = launch("-m", "world_size=2,1", "trainer.global_batch_size=8,2", "trainer.max_steps=3",
                    f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir, result


@pytest.fixture(scope="module")
def failing_rank(tmp_path_factory):
    """A 2-process sweep job whose rank 1 raises once it joined the process group (tests/scripts/fail_rank)."""
    sweep_dir = tmp_path_factory.mktemp("failing") / "sweep"
    path = os.pathsep.join(p for p in [str(SCRIPTS / "fail_rank"), os.environ.get("PYTHONPATH", "")] if p)
    result = launch("-m", "world_size=2", "trainer.max_steps=2", f"hydra.sweep.dir={sweep_dir}",
                    env={"PYTHONPATH": path, "QFSDP_TEST_FAIL_RANK": "1"})
    return sweep_dir, result


@pytest.mark.slow
def test_sweep_writes_its_report(sweep):
    sweep_dir, result = sweep
    for name in REPORT_FILES:
        assert (sweep_dir / name).stat().st_size > 0, name
    for name in ("loss_curves.png", "throughput.png", "memory.png"):
        assert (sweep_dir / name).read_bytes()[:8] == PNG
    # the table and where it is, at the end of the sweep's console output
    assert f"report in {sweep_dir}/" in result.stdout
    assert "| 1 | world_size=2 trainer.global_batch_size=2 | 2 | failed: trainer.global_batch_size=2" in result.stdout
    md = (sweep_dir / "summary.md").read_text()
    assert "4 jobs, 3 ok, 1 failed; every job: `trainer.max_steps=3`; device: cpu" in md
    assert "| 0 | world_size=2 trainer.global_batch_size=8 | 2 | ok | 3 |" in md
    # a failed job is recorded and the sweep goes on: the jobs after it trained, and the sweep exits 0
    assert result.returncode == 0 and result.stdout.count("results in") == 3


@pytest.mark.slow
def test_report_rows_are_the_runs_own_numbers(sweep):
    sweep_dir, _ = sweep
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    expected_ws = {"0": "2", "1": "2", "2": "1", "3": "1"}
    for row in rows:
        job = sweep_dir / row["job"]
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        assert row["overrides"].split() == [line.removeprefix("- ") for line in overrides.splitlines()]
        assert row["world_size"] == expected_ws[row["job"]]
        assert row["run_dir"] == str(job)
        if row["status"] != "ok":
            continue
        m, s = metrics(job), summary(job)
        assert int(row["steps"]) == m[-1]["step"] == 3
        assert float(row["final_loss"]) == m[-1]["loss"] == s["final_loss"]
        assert float(row["tokens_per_second"]) == s["tokens_per_second"] > 0
        assert float(row["peak_memory_gib"]) == max(s["peak_memory_gib"]) > 0
        assert float(row["wall_time_s"]) == s["wall_time_s"]
        assert row["device"] == "cpu" and row["mfu"] == "" and row["error"] == "" and row["eval_loss"] == ""


@pytest.mark.slow
def test_dloss_is_against_the_first_job_with_the_same_global_batch(sweep):
    sweep_dir, _ = sweep
    rows = {r["job"]: r for r in read_csv(sweep_dir / "summary.csv")}
    assert rows["0"]["dloss_reference"] == "0" and float(rows["0"]["max_abs_dloss"]) == 0.0
    assert rows["3"]["dloss_reference"] == "3" and float(rows["3"]["max_abs_dloss"]) == 0.0  # batch 2: its own
    assert rows["2"]["dloss_reference"] == "0"
    two, one = metrics(sweep_dir / "0"), metrics(sweep_dir / "2")
    assert float(rows["2"]["max_abs_dloss"]) == max(abs(a["loss"] - b["loss"]) for a, b in zip(two, one))
    assert float(rows["2"]["max_abs_dloss"]) <= 1e-5  # 2 vs 1 processes: the same optimization
    # job 3 trained on another batch: comparing it with job 0 would have shown this difference
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two, metrics(sweep_dir / "3"))) > 1e-3
    assert rows["1"]["max_abs_dloss"] == rows["1"]["dloss_reference"] == ""
    md = (sweep_dir / "summary.md").read_text()
    assert f"| {float(rows['2']['max_abs_dloss']):.2e} (vs 0) |" in md


@pytest.mark.slow
def test_failed_job_row_has_its_error_line(sweep):
    sweep_dir, _ = sweep
    row = read_csv(sweep_dir / "summary.csv")[1]
    error = json.loads((sweep_dir / "1" / "status.json").read_text())["error"]
    assert row["error"] == error.splitlines()[0]
    assert row["error"].startswith("trainer.global_batch_size=2 is not a multiple of")
    assert all(row[k] == "" for k in ("steps", "final_loss", "tokens_per_second", "peak_memory_gib", "wall_time_s"))
    # the job's log file ends with its outcome
    assert (sweep_dir / "1" / "launch.log").read_text().splitlines()[-1].endswith(f"job failed: {row['error']}")


@pytest.mark.slow
def test_failing_rank_reaches_the_console_and_the_summary(failing_rank):
    sweep_dir, result = failing_rank
    assert result.returncode == 0  # the sweep records the job and goes on
    line = "rank 1: RuntimeError: injected failure on rank 1 (QFSDP_TEST_FAIL_RANK)"
    # rank 1's own output is filtered (its traceback would carry the line too): the driver reports the root cause,
    # not rank 0's "connection closed" that followed it
    assert result.stderr.count("injected failure on rank 1") == 1
    assert f"qfsdp: error: {line}" in result.stderr
    assert (sweep_dir / "0" / "error-rank1.txt").exists()
    (row,) = read_csv(sweep_dir / "summary.csv")
    assert row["status"] == "failed" and row["error"] == line and row["world_size"] == "2"


@pytest.mark.slow
def test_report_command_redoes_a_sweep_report(sweep, tmp_path):
    sweep_dir, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)  # copy2: file times kept
    for name in REPORT_FILES:
        (copy / name).unlink()
    result = report_cmd(str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in REPORT_FILES:
        assert (copy / name).stat().st_size > 0, name
    strip = [{k: v for k, v in r.items() if k != "run_dir"} for r in read_csv(copy / "summary.csv")]
    assert strip == [{k: v for k, v in r.items() if k != "run_dir"} for r in read_csv(sweep_dir / "summary.csv")]
    assert f"report in {copy}/" in result.stdout and "| job | overrides |" in result.stdout


@pytest.mark.slow
def test_report_command_on_run_directories(sweep, failing_rank, tmp_path):
    sweep_dir, failing_dir = sweep[0], failing_rank[0]
    out = tmp_path / "out"
    runs = [sweep_dir / "3", sweep_dir / "2", failing_dir / "0"]
    result = report_cmd(*map(str, runs), "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "summary.csv")
    assert [r["run_dir"] for r in rows] == [str(r) for r in runs]  # in the order given
    root = Path(os.path.commonpath(runs))
    assert [r["job"] for r in rows] == [str(r.relative_to(root)) for r in runs]
    # job 2 (batch 8) is now the first of its batch: its own reference; job 3 keeps batch 2's
    assert rows[0]["dloss_reference"] == rows[0]["job"] and rows[1]["dloss_reference"] == rows[1]["job"]
    assert rows[2]["status"] == "failed" and rows[2]["error"].startswith("rank 1: RuntimeError: injected")
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    # without -o: refused, never written into a run directory
    result = report_cmd(str(sweep_dir / "3"))
    assert result.returncode == 2 and "give -o OUT" in result.stderr
    assert not (sweep_dir / "3" / "summary.csv").exists()


@pytest.mark.slow
def test_mfu_against_the_datasheet_peak_of_the_runs_gpu(sweep, tmp_path):
    """The sweep ran on CPU (no MFU); the same run recorded as an H100 gets tokens/s per GPU x FLOPs per token
    over 989 TFLOP/s."""
    from qfsdp.tiny import tiny_model_path

    run = tmp_path / "run"
    shutil.copytree(sweep[0] / "0", run)  # world_size=2
    s = summary(run)
    (run / "summary.json").write_text(json.dumps({**s, "device": "NVIDIA H100 80GB HBM3"}))
    result = report_cmd(str(run), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_csv(tmp_path / "out" / "summary.csv")
    c = json.loads((tiny_model_path("tiny") / "config.json").read_text())
    d, layers, kv = c["hidden_size"], c["num_hidden_layers"], c["num_key_value_heads"] * c["head_dim"]
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * c["intermediate_size"]) + d * c["vocab_size"]
    per_token = 4 * linear + 12 * layers * 256 * d  # sample data: s = trainer.max_length = 256
    expected = s["tokens_per_second"] / 2 * per_token / 989e12
    assert float(row["mfu"]) == pytest.approx(expected, rel=1e-9)
    assert f"| {expected:.1%} |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("device,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.0), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA L40S", "bfloat16", 362.0), ("NVIDIA L4", "bfloat16", 121.0), ("Tesla T4", "float16", 65.0),
    ("NVIDIA A10G", "bfloat16", None), ("cpu", "bfloat16", None), ("NVIDIA H100 80GB HBM3", "float32", None),
])
def test_peak_table(device, dtype, tflops):
    from qfsdp.bench.flops import peak_tflops

    assert peak_tflops(device, dtype) == tflops


def test_report_needs_runs(tmp_path):
    result = report_cmd(str(tmp_path))
    assert result.returncode == 2 and "neither a run directory nor a sweep directory" in result.stderr


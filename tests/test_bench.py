"""The benchmark command runs on CPU with the tiny model, so it cannot rot (GPU numbers: docs/BENCHMARKS.md); the
training path does not depend on it."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, run_cmd


@pytest.mark.slow
def test_bench_runs_rows_side_by_side_with_the_stock_recipe(tmp_path):
    out = tmp_path / "bench"
    result = run_cmd([sys.executable, "-m", "qfsdp.bench", "run", str(out), "--preset", "tiny",
                      "--rows", "qfsdp-1-det,qfsdp-2-det,stock-1"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"qfsdp-1-det", "qfsdp-2-det", "stock-1"} and all(r["status"] == "ok" for r in rows.values())
    assert len(rows["qfsdp-1-det"]["losses"]) == 5 and rows["stock-1"]["tokens_per_second"] > 0
    assert rows["qfsdp-2-det"]["summary"]["world_size"] == 2
    # the stock recipe trains the same model on the same data: same starting loss
    assert abs(rows["stock-1"]["losses"][0] - rows["qfsdp-1-det"]["losses"][0]) < 1e-2
    checks = {name: ok for name, ok, _ in data["checks"]}
    assert checks["loss parity qfsdp-1-det vs qfsdp-2-det: per-step |dloss| <= 1e-3"] is True
    table = (out / "results.md").read_text()
    assert "| qfsdp-2-det | ok | 2 |" in table and "PASS loss parity" in table
    for name in ("loss.png", "throughput.png", "memory.png", "bench.log"):
        assert (out / name).stat().st_size > 0

    merged = tmp_path / "merged"
    merged.mkdir()
    result = run_cmd([sys.executable, "-m", "qfsdp.bench", "report", str(merged), str(out)])
    assert result.returncode == 0 and "| stock-1 | ok | 1 |" in (merged / "results.md").read_text()


@pytest.mark.slow
def test_set_overrides_qfsdp_rows_not_the_baseline(tmp_path):
    """`run --set KEY=VALUE` tries a setting across the matrix (e.g. fsdp2.layers_per_unit=2); the stock recipe
    stays the fixed baseline, and a bad key fails before any row starts."""
    from qfsdp.bench.matrix import PRESETS, row_config
    from qfsdp.config import compose_config

    extra = ("fsdp2.layers_per_unit=2",)
    assert row_config("qfsdp-2-offload", PRESETS["tiny"], extra)[-2:] == ["fsdp2=offload", *extra]
    assert compose_config(row_config("qfsdp-2-offload", PRESETS["tiny"], extra)).fsdp2.layers_per_unit == 2
    assert not set(extra) & set(row_config("stock-1", PRESETS["tiny"], extra))
    result = run_cmd([sys.executable, "-m", "qfsdp.bench", "run", str(tmp_path / "b"), "--preset", "tiny",
                      "--rows", "qfsdp-1", "--set", "fsdp2.layers_per_units=2"])
    assert result.returncode == 2 and "layers_per_units" in result.stderr
    assert not (tmp_path / "b").exists()


def test_gpu_host_scripts_name_real_rows():
    """The per-host scripts (bench/h200x*.sh) run on GPU hosts only: a misspelled row would cost a device call."""
    import re

    from qfsdp.bench.matrix import ROWS

    named = set()
    for script in sorted((ROOT / "bench").glob("h200x*.sh")):
        for lane in re.findall(r"(?:\d[\d,]*|all):([\w,-]+)", script.read_text()):
            named.update(n for n in lane.split(",") if n)
    assert named and named <= set(ROWS), sorted(named - set(ROWS))


def test_training_imports_nothing_from_the_bench():
    """Every module of the product, imported in a fresh interpreter, leaves qfsdp.bench unimported."""
    modules = sorted(f"qfsdp.{p.stem}" for p in (ROOT / "qfsdp").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('qfsdp.bench')))")
    result = run_cmd([sys.executable, "-c", code, *modules])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "qfsdp.train" in modules and "qfsdp.shard" in modules
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout

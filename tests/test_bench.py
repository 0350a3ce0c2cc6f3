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
    for name in ("loss.png", "throughput.png", "memory.png", "frontier.png", "bench.log"):
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
    """The per-host scripts (bench/h200x*.sh) and the bench/gpu.sh commands in docs/BENCHMARKS.md run on GPU hosts
    only: a misspelled row would cost a device call."""
    import re

    from qfsdp.bench.matrix import ROWS

    texts = [script.read_text() for script in sorted((ROOT / "bench").glob("h200x*.sh"))]
    texts += [line for line in (ROOT / "docs" / "BENCHMARKS.md").read_text().splitlines() if "bench/gpu.sh $OUT" in line]
    named = set()
    for text in texts:
        for lane in re.findall(r"(?:\d[\d,]*|all):([\w,-]+)", text):
            named.update(n for n in lane.split(",") if n)
    assert named and named <= set(ROWS), sorted(named - set(ROWS))
    assert {"stock-1-noac", "qfsdp-1-pack", "qfsdp-1-liger-compile-det"} <= named  # the docs' commands are scanned


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


# ---- rows for issues 16 and 17 (they run on a GPU host: here their configs and checks) ----

NEW_ROWS = ["qfsdp-1-lognormal", "qfsdp-1-pack", "stock-1-lognormal", "stock-1-noac", "qfsdp-1-noac-compile",
            "qfsdp-1-liger", "qfsdp-1-liger-compile", "qfsdp-1-liger-det", "qfsdp-1-liger-compile-det",
            "qfsdp-1-compile-ckpt24", "qfsdp-1-compile-ckpt16", "qfsdp-1-compile-auto", "qfsdp-1-compile-auto24",
            "qfsdp-1-compile-auto-det", "kaggle-1-ckptall", "qfsdp-1-compile-offact", "qfsdp-1-offact-det",
            "qfsdp-1-pack-flex"]


def test_new_rows_compose_and_pass_the_launchers_checks(monkeypatch):
    from qfsdp import settings
    from qfsdp.bench.matrix import PRESETS, ROWS, batch_shape, row_config
    from qfsdp.config import compose_config
    from qfsdp.validate import Machine, validate

    monkeypatch.setattr(settings, "liger_import_error", lambda: None)  # GPU hosts carry liger-kernel
    preset = PRESETS["llama8b"]
    cfgs = {}
    for name in NEW_ROWS:
        cfgs[name] = compose_config([*row_config(name, preset), "world_size=1"])  # as the bench launches them
        assert validate(cfgs[name], Machine(gpus=1)) == ROWS[name].world_size == 1, name
    noac = cfgs["stock-1-noac"]
    assert not noac.fsdp2.activation_checkpointing and noac.trainer.global_batch_size == 16
    assert batch_shape(row_config("stock-1-noac", preset), 1) == {"micro_batch": 4, "gradient_accumulation": 4}
    # the packed row and its twins differ only in packing and the recipe: same lengths, same data
    assert cfgs["qfsdp-1-lognormal"].dataset == cfgs["qfsdp-1-pack"].dataset == cfgs["stock-1-lognormal"].dataset
    assert cfgs["qfsdp-1-pack"].trainer.packing and not cfgs["qfsdp-1-lognormal"].trainer.packing
    assert cfgs["qfsdp-1-pack"].dataset.lengths.value == "lognormal"
    flex, packed = cfgs["qfsdp-1-pack-flex"], cfgs["qfsdp-1-pack"]  # the packed row, its attention alone changed
    assert flex.dataset == packed.dataset and flex.trainer.packing
    assert (flex.model.attn_implementation, packed.model.attn_implementation) == ("flex_attention", "sdpa")
    assert [cfgs[n].kernels.value for n in NEW_ROWS if "liger" in n] == ["liger"] * 4
    assert cfgs["qfsdp-1-liger-compile-det"].compile and cfgs["qfsdp-1-liger-compile-det"].deterministic
    assert [cfgs[n].fsdp2.checkpointed_layers for n in ("qfsdp-1-compile-ckpt24", "qfsdp-1-compile-ckpt16")] == [24, 16]
    # The preset recomputes every layer (the rows' history); the -auto rows are what a user gets by default.
    assert cfgs["qfsdp-1-liger"].fsdp2.checkpointed_layers == "all"
    auto, auto24 = cfgs["qfsdp-1-compile-auto"], cfgs["qfsdp-1-compile-auto24"]
    assert auto.fsdp2.checkpointed_layers == auto24.fsdp2.checkpointed_layers == "auto" and auto.compile
    assert auto.gpu_memory_limit_gib is None and auto24.gpu_memory_limit_gib == 24
    auto_det = cfgs["qfsdp-1-compile-auto-det"]
    assert auto_det.deterministic and auto_det.compile and auto_det.fsdp2.checkpointed_layers == "auto"
    assert cfgs["kaggle-1-ckptall"].fsdp2.checkpointed_layers == "all" and cfgs["kaggle-1-ckptall"].gpu_memory_limit_gib == 15
    offact = [n for n in NEW_ROWS if "offact" in n]
    assert all(cfgs[n].trainer.activation_offloading for n in offact) and cfgs["qfsdp-1-offact-det"].deterministic
    assert [cfgs[n].fsdp2.checkpointed_layers for n in offact] == ["all", "all"]


def test_stock_recipe_trains_on_qfsdps_lognormal_rows():
    """The stock recipe builds its rows itself: the same lengths and tokens as qfsdp's for the same seed, or real
    tokens/s would compare different data."""
    from qfsdp.bench.matrix import PRESETS, row_config
    from qfsdp.bench.stock import training_data
    from qfsdp.config import compose_config
    from qfsdp.data import load_datasets
    from qfsdp.model import load_config

    stock_cfg = compose_config(row_config("stock-1-lognormal", PRESETS["llama8b"]))
    qfsdp_cfg = compose_config(row_config("qfsdp-1-pack", PRESETS["llama8b"]))
    vocab = load_config(qfsdp_cfg.model).vocab_size
    ours = load_datasets(qfsdp_cfg.dataset, vocab, qfsdp_cfg.seed)[0]["input_ids"]
    theirs = training_data(stock_cfg, vocab)["input_ids"]
    lengths = [len(r) for r in ours]
    assert [len(r) for r in theirs] == lengths and theirs == ours
    assert len(lengths) == 2048 and 200 <= sorted(lengths)[1024] <= 320 and max(lengths) == 2048
    # enough tokens that the packed row's 20 steps of 16 x 2048 tokens see no sequence twice
    assert sum(lengths) >= 20 * 16 * 2048


def _result(name, tps, peak=9.6, losses=(1.0, 0.9, 0.8), real=None, padding=0, runner=None, world_size=1):
    from qfsdp.bench.matrix import ROWS

    mem = [{"peak_allocated_gib": peak, "peak_reserved_gib": peak + 0.5}] * world_size
    return {"name": name, "status": "ok", "runner": runner or ROWS[name].runner, "world_size": world_size,
            "overrides": list(ROWS[name].overrides), "tokens_per_second": tps, "losses": list(losses),
            "micro_batch": 4, "gradient_accumulation": 4, "real_tokens": real or int(tps * 20),
            "padding_tokens": padding,
            "summary": {"memory": mem, "load_memory": mem, "quantized_bytes_per_rank": [3.25 * 2**30],
                        "final_loss": losses[-1], "wall_time_s": 100.0}}


def _checks(*rows):
    from qfsdp.bench.results import checks

    return {name: (ok, detail) for name, ok, detail in checks(list(rows))}


def test_packing_check():
    name = "packing: qfsdp-1-pack real tokens/s >= 1.5 x qfsdp-1-lognormal"
    unpacked = _result("qfsdp-1-lognormal", 4000, real=80_000, padding=80_000)
    ok, detail = _checks(unpacked, _result("qfsdp-1-pack", 6400, real=128_000, padding=1_000))[name]
    assert ok is True and "1.60x" in detail and "50%" in detail
    assert _checks(unpacked, _result("qfsdp-1-pack", 5600))[name][0] is False
    ok, detail = _checks(unpacked)[name]
    assert ok is None and "qfsdp-1-pack" in detail
    # FlexAttention beside sdpa on the same packed rows: reported, no target
    flex = "packing with FlexAttention: qfsdp-1-pack-flex vs qfsdp-1-pack (sdpa)"
    ok, detail = _checks(_result("qfsdp-1-pack", 6400, losses=(12.0, 11.5, 11.0)),
                         _result("qfsdp-1-pack-flex", 8000, losses=(12.0, 11.5004, 11.0)))[flex]
    assert ok is None and "8000 vs 6400 real tokens/s (1.25x)" in detail and "4.00e-04 over 3 steps" in detail
    assert flex not in _checks(_result("qfsdp-1-pack", 6400))


def test_target_1_same_memory():
    from qfsdp.bench.results import TARGET_1

    stock = _result("stock-1", 8000, peak=9.6)
    heavy = _result("qfsdp-1-noac-compile", 16000, peak=41.3)  # faster, but over stock-1's memory + 10%
    other_data = _result("qfsdp-1-lognormal", 30000, peak=5.0)  # other data: its tokens/s do not compare
    ok, detail = _checks(stock, heavy, other_data, _result("qfsdp-1-compile", 12500, peak=10.4),
                         _result("qfsdp-1", 8100, peak=10.0))[TARGET_1]
    assert ok is True and detail.startswith("qfsdp-1-compile 12500") and "1.56x" in detail
    assert "qfsdp-1-noac-compile 41.30" in detail and "lognormal" not in detail
    ok, detail = _checks(stock, heavy, _result("qfsdp-1-compile", 11000, peak=10.4))[TARGET_1]
    assert ok is False and "qfsdp-1-compile" in detail
    # 10.6 GiB is over 1.1 x 9.6: the slower row within the bound is the one measured
    ok, detail = _checks(stock, _result("qfsdp-1-compile", 12500, peak=10.6), _result("qfsdp-1", 8100, peak=10.0))[
        TARGET_1]
    assert ok is False and detail.startswith("qfsdp-1 8100") and "over the bound: qfsdp-1-compile 10.60" in detail
    assert _checks(stock, heavy)[TARGET_1][0] is None  # no qfsdp row within the memory bound was run
    assert _checks(heavy, _result("qfsdp-1-compile", 12500))[TARGET_1][0] is None  # no stock-1


def test_target_2_memory_free():
    from qfsdp.bench.results import TARGET_2

    stocks = [_result("stock-1", 8000), _result("stock-1-noac", 12168, peak=52.0),
              _result("stock-1-lognormal", 30000)]  # other data: not the baseline
    ok, detail = _checks(*stocks, _result("qfsdp-1-compile", 10200), _result("qfsdp-1-noac-compile", 16000))[TARGET_2]
    assert ok is True and detail.startswith("qfsdp-1-noac-compile 16000") and "stock-1-noac 12168" in detail
    assert "1.31x" in detail
    assert _checks(*stocks, _result("qfsdp-1-noac-compile", 15000))[TARGET_2][0] is False
    ok, detail = _checks(stocks[0], _result("qfsdp-1-noac-compile", 16000))[TARGET_2]
    assert ok is None and "stock-1-noac" in detail


def test_liger_parity_checks_and_the_table():
    from qfsdp.bench.results import checks, table

    reference = _result("qfsdp-1-det", 7000, losses=(12.0, 11.5, 11.0))
    close = _result("qfsdp-1-liger-det", 7500, losses=(12.0, 11.5008, 11.0002))
    far = _result("qfsdp-1-liger-compile-det", 9000, losses=(12.0, 11.502, 11.0))
    got = _checks(reference, close, far)
    assert got["kernels=liger vs eager: qfsdp-1-liger-det vs qfsdp-1-det, per-step |dloss| <= 1e-3"][0] is True
    assert got["kernels=liger vs eager: qfsdp-1-liger-compile-det vs qfsdp-1-det, per-step |dloss| <= 1e-3"][0] is False
    defaults = ("the GPU defaults (compile, auto checkpointing) vs eager, every layer recomputing: "
                "qfsdp-1-compile-auto-det vs qfsdp-1-det, per-step |dloss| <= 1e-3")
    assert _checks(reference, _result("qfsdp-1-compile-auto-det", 9000, losses=(12.0, 11.5009, 11.0)))[defaults][0]
    assert _checks(reference, far)[defaults][0] is None  # not run
    assert _checks(reference, _result("qfsdp-1-compile-auto-det", 9000, losses=(12.0, 11.5011, 11.0)))[defaults][0] \
        is False
    offload = ("activation offloading on vs off identical: qfsdp-1-offact-det vs qfsdp-1-det, "
               "per-step |dloss| <= 1e-5")
    assert _checks(reference, _result("qfsdp-1-offact-det", 6500, losses=(12.0, 11.5, 11.0)))[offload][0] is True
    assert _checks(reference, _result("qfsdp-1-offact-det", 6500, losses=(12.0, 11.5001, 11.0)))[offload][0] is False
    rows = [reference, _result("qfsdp-1-pack", 6400, real=128_000, padding=32_000)]
    text = table(rows, {"preset": "llama8b", "preset_overrides": [], "ceiling": {"tflops": 800.0},
                        "flops_per_token": 3.324e10, "warmup_steps": 3}, checks(rows))
    assert "| real tokens/s |" in text and "| padding |" in text
    assert "| qfsdp-1-pack | ok | 1 | 4 x 4 | 6,400 | 6,400 | 20% | n/a |" in text  # MFU: not the preset's lengths
    assert "| qfsdp-1-det | ok | 1 | 4 x 4 | 7,000 | 7,000 | 0% | 29.1% |" in text
    # host memory while loading: the busiest node's sums over its processes (RSS / own); "-" where not recorded
    two = _result("qfsdp-2", 12000, world_size=2)
    two["summary"]["load_host_memory_per_node"] = {
        "a": {"processes": 2, "peak_rss_gib": 33.04, "peak_anon_gib": 4.46},
        "b": {"processes": 1, "peak_rss_gib": 17.0, "peak_anon_gib": 2.2}}
    text = table([reference, two], {"preset": "llama8b", "preset_overrides": [], "flops_per_token": 3.324e10,
                                    "warmup_steps": 3}, [])
    assert "| load host GiB (RSS / own, per node) |" in text
    assert "| 9.60 | 33.0 / 4.5 | 9.60 / 10.10 |" in text and "| 9.60 | - | 9.60 / 10.10 |" in text


def test_auto_checkpointing_checks():
    faster = "auto checkpointing: qfsdp-1-compile-auto faster than qfsdp-1-compile (every layer recomputing)"
    capped = ("auto checkpointing under gpu_memory_limit_gib=24: qfsdp-1-compile-auto24 peaks < 24 GiB (load and "
              "train, reserved) and is faster than qfsdp-1-compile")
    full = _result("qfsdp-1-compile", 10000, peak=10.2)
    auto24 = _result("qfsdp-1-compile-auto24", 10600, peak=16.0)
    auto24["summary"]["checkpointed_layers"] = 25
    got = _checks(full, _result("qfsdp-1-compile-auto", 14400, peak=41.3), auto24)
    assert got[faster][0] is True and "1.44x" in got[faster][1]
    assert got[capped][0] is True and "25 layers recompute" in got[capped][1] and "train [16.50]" in got[capped][1]
    assert _checks(full, _result("qfsdp-1-compile-auto24", 10600, peak=23.6))[capped][0] is False  # 24.1 reserved
    assert _checks(full, _result("qfsdp-1-compile-auto", 9900))[faster][0] is False
    assert _checks(full)[faster][0] is None


def test_auto_prediction_check():
    from qfsdp.bench.results import AUTO_PREDICTION

    auto24 = _result("qfsdp-1-compile-auto24", 10600, peak=19.5)
    auto = _result("qfsdp-1-compile-auto", 14400, peak=41.7)
    auto24["summary"].update(predicted_peak_gib=20.24, checkpointed_layers=22)
    auto["summary"].update(predicted_peak_gib=42.35, checkpointed_layers=0)
    ok, detail = _checks(auto24, auto, _result("qfsdp-1-compile", 10000))[AUTO_PREDICTION]
    assert ok is True
    assert detail == ("qfsdp-1-compile-auto24: 19.50 vs 20.24 GiB predicted (22 layers recompute); "
                      "qfsdp-1-compile-auto: 41.70 vs 42.35 GiB predicted (0 layers recompute)")
    auto["summary"]["predicted_peak_gib"] = 41.6  # one row over its prediction fails the check
    assert _checks(auto24, auto)[AUTO_PREDICTION][0] is False
    assert _checks(_result("qfsdp-1-compile", 10000))[AUTO_PREDICTION][0] is None  # no planned row


def test_kaggle_recipe_checks_speed_and_parity_against_the_offload_recipe():
    name = "throughput: kaggle-1 (no offload) >= 2x kaggle-offload-1"
    slow = _result("kaggle-offload-1", 400, losses=(6.5, 6.4, 6.3))
    ok, detail = _checks(slow, _result("kaggle-1", 1000, losses=(6.5, 6.4, 6.3)))[name]
    assert ok is True and "2.50x" in detail
    assert _checks(slow, _result("kaggle-1", 700, losses=(6.5, 6.4, 6.3)))[name][0] is False
    parity = "kaggle-1 loss curve matches kaggle-offload-1: per-step |dloss| <= 1e-3"
    assert _checks(slow, _result("kaggle-1", 1000, losses=(6.5, 6.4, 6.302)))[parity][0] is False
    assert _checks(slow)[name][0] is None
    # the recipe's default (auto checkpointing) against every layer recomputing: same losses, speed for the record
    auto = "kaggle-1 (auto checkpointing) loss curve matches kaggle-1-ckptall (every layer): per-step |dloss| <= 1e-3"
    got = _checks(_result("kaggle-1", 1200, losses=(6.5, 6.4, 6.3)),
                  _result("kaggle-1-ckptall", 1000, losses=(6.5, 6.4, 6.3005)))
    assert got[auto][0] is True
    assert got["kaggle-1 (auto checkpointing) vs kaggle-1-ckptall (every layer)"] == (None, "1200 vs 1000 tokens/s (1.20x)")


# ---- issue 17, target 5: the throughput-memory frontier that leads the report ----

META = {"preset": "llama8b", "preset_overrides": [], "ceiling": {"tflops": 800.0, "device": "NVIDIA H200"},
        "flops_per_token": 3.324e10, "warmup_steps": 3}


def _frontier_rows():
    return [
        _result("stock-1", 8000, peak=9.6),
        _result("stock-1-noac", 12000, peak=52.0),
        _result("qfsdp-1", 8000, peak=9.6),  # ties stock-1 on both: both stay on the frontier
        _result("qfsdp-1-compile", 10000, peak=10.4),
        _result("qfsdp-1-noac-compile", 11000, peak=60.0),  # slower than stock-1-noac at more memory: dominated
        _result("qfsdp-1-liger", 10000, peak=12.0),  # as fast as qfsdp-1-compile at more memory: dominated
        _result("qfsdp-2", 9000, peak=6.1, world_size=2),  # beats the 1-GPU rows at <= 9.6 GiB, not 10.4
        _result("qfsdp-1-pack", 30000, peak=5.0),  # other lengths: not compared
        _result("kaggle-1", 900, peak=4.0),  # another recipe and data: not compared
    ]


def test_frontier_set():
    from qfsdp.bench.results import _frontier_rows as compared, pareto

    rows = compared(_frontier_rows())
    assert {r["name"] for r in rows} == {"stock-1", "stock-1-noac", "qfsdp-1", "qfsdp-1-compile",
                                         "qfsdp-1-noac-compile", "qfsdp-1-liger", "qfsdp-2"}
    assert pareto(rows) == {"qfsdp-2", "qfsdp-1-compile", "stock-1-noac"}
    # without the 2-GPU row, the tied 1-GPU rows are on it together
    one_gpu = [r for r in rows if r["world_size"] == 1]
    assert pareto(one_gpu) == {"stock-1", "qfsdp-1", "qfsdp-1-compile", "stock-1-noac"}
    assert pareto([]) == set()


def test_frontier_leads_the_report_and_is_plotted(tmp_path):
    from qfsdp.bench.results import write_report

    rows = _frontier_rows()
    write_report(tmp_path, rows, META)
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("## Throughput–memory frontier")
    section, rest = text.split("## All rows and checks", 1)
    table_rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in table_rows] == [
        "qfsdp-2", "qfsdp-1", "stock-1", "qfsdp-1-compile", "qfsdp-1-liger", "stock-1-noac", "qfsdp-1-noac-compile"]
    assert "| qfsdp-2 | 2 | 9,000 | 6.10 | 18.7% | yes |" in section  # MFU per GPU: 4500 x 3.324e10 / 800e12
    assert "| qfsdp-1-liger | 1 | 10,000 | 12.00 | 41.5% | no |" in section
    assert "pack" not in section and "kaggle" not in section
    assert "4·N_linear + 12·L·s·d" in section and "800 TFLOP/s" in section
    # the existing table and checks follow, unchanged
    assert rest.lstrip().startswith("Preset `llama8b`") and "| kaggle-1 | ok | 1 |" in rest and "Checks:" in rest
    for name in ("frontier.png", "throughput.png", "memory.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_frontier_section_in_a_merged_report_names_each_calls_peak():
    from qfsdp.bench.results import frontier_section

    rows = [_result("qfsdp-1", 8000), _result("stock-1", 6000)]
    rows[1]["ceiling"] = {"tflops": 780.0, "device": "NVIDIA H100 80GB HBM3"}
    text = frontier_section(rows, META)
    assert "780 TFLOP/s / 800 TFLOP/s" in text and "| stock-1 | 1 | 6,000 | 9.60 | 25.6% | no |" in text
    assert "none finished" in frontier_section([_result("kaggle-1", 900)], {**META, "ceiling": None})

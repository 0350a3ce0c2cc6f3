"""Benchmark matrix: qfsdp configurations through the same `launch.py` users run, beside the stock recipe
(`qfsdp.stock`), on one host, in one command.

    python -m qfsdp.bench run OUT [--preset llama8b|tiny] [--rows NAME,NAME...]   # run rows, write the report
                                  [--set KEY=VALUE ...]      # overrides for every qfsdp row (not the baseline)
    python -m qfsdp.bench report OUT SRC [SRC...]                                  # merge runs, redo report + checks
    python -m qfsdp.bench prepare --rows NAME,NAME...     # build the rows' checkpoints first (before parallel lanes)

`run --stop-at EPOCH` starts no row within 60 s of EPOCH and cuts a running row there (device calls have a hard
time limit; bench/gpu.sh sets it). On GPU hosts, bench/gpu.sh runs lanes of rows side by side on disjoint GPUs.

Per row: steady-state tokens/s (first `WARMUP` steps excluded), MFU against a bf16 matmul ceiling measured in the
same run, peak memory per rank while loading and while training (allocated and reserved), quantized bytes per
rank, per-step loss, wall time. Output in OUT: results.json, results.md (table + PASS/FAIL checks), loss.png,
throughput.png, memory.png, bench.log.

MFU's FLOPs per token: `qfsdp.flops.flops_per_token` (4 * N_linear + 12 * L * s * d, explained there).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qfsdp.config import compose_config
from qfsdp.flops import flops_per_token
from qfsdp.metrics import steady_tokens_per_second
from qfsdp.rundir import first_error

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3

PRESETS = {
    # Llama-3.1-8B shape, random weights, synthetic 2048-token sequences, global batch 16, 20 steps. Micro batch 4
    # (4 micro-steps per step on 1 GPU, 2 on 2): eager steps at micro batch 2 wait on the host's kernel launches,
    # which made one GPU's speed, and 2 GPUs' ratio to it, depend on the machine; at 4 both ran steadier and
    # faster (docs/BENCHMARKS.md, seventh session).
    "llama8b": ["model=llama3_1_8b", "model.random_init=true", "dataset=synthetic", "dataset.seq_length=2048",
                "dataset.num_samples=512", "trainer.max_length=2048", "trainer.global_batch_size=16",
                "trainer.per_device_train_batch_size=4", "trainer.max_steps=20", "lora.r=16"],
    # The same matrix on the tiny model, for CPU tests.
    "tiny": ["dataset=synthetic", "dataset.seq_length=64", "trainer.global_batch_size=8",
             "trainer.per_device_train_batch_size=2", "trainer.max_steps=5"],
}

@dataclass(frozen=True)
class Row:
    runner: str  # "qfsdp": launch.py, as users run it; "stock": qfsdp.stock (the baseline recipe) under torchrun
    world_size: int
    overrides: tuple[str, ...] = ()
    preset: bool = True  # False: the overrides are the whole recipe (an experiment), the preset is not applied


# "-det" rows run with deterministic=true: GPU kernels are not deterministic run to run (the same config twice
# differs by ~1e-3 in loss after a few steps on H200), so comparisons that must hold below that (1 vs N GPUs,
# offload, compile) are made between deterministic rows.
DET = ("deterministic=true",)
KAGGLE = ("experiment=kaggle_2xt4", "model.random_init=true", *DET)
ROWS = {
    "qfsdp-1": Row("qfsdp", 1),
    "qfsdp-2": Row("qfsdp", 2),
    "qfsdp-4": Row("qfsdp", 4),
    "qfsdp-1-offload": Row("qfsdp", 1, ("fsdp2=offload",)),
    "qfsdp-2-offload": Row("qfsdp", 2, ("fsdp2=offload",)),
    "qfsdp-1-compile": Row("qfsdp", 1, ("compile=true",)),
    "qfsdp-2-compile": Row("qfsdp", 2, ("compile=true",)),
    "qfsdp-1-fp16": Row("qfsdp", 1, ("precision=fp16",)),
    "qfsdp-2-fp16": Row("qfsdp", 2, ("precision=fp16",)),
    "qfsdp-1-noac": Row("qfsdp", 1, ("fsdp2.activation_checkpointing=false",)),
    "qfsdp-2-noac": Row("qfsdp", 2, ("fsdp2.activation_checkpointing=false",)),
    "qfsdp-1-det": Row("qfsdp", 1, DET),
    "qfsdp-2-det": Row("qfsdp", 2, DET),
    "qfsdp-4-det": Row("qfsdp", 4, DET),
    "qfsdp-2-offload-det": Row("qfsdp", 2, ("fsdp2=offload", *DET)),
    "qfsdp-2-compile-det": Row("qfsdp", 2, ("compile=true", *DET)),
    "kaggle-1": Row("qfsdp", 1, KAGGLE, preset=False),
    "kaggle-2": Row("qfsdp", 2, KAGGLE, preset=False),
    "stock-1": Row("stock", 1),
    "stock-2-ddp": Row("stock", 2),
}


def _env() -> dict:
    # NVLink multicast stays off on shared multi-GPU hosts (../shared/gpu/README.md), in every child process too.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def run_row(name: str, preset: list[str], rows_dir: Path, log, timeout: int, extra: tuple[str, ...] = ()) -> dict:
    row_spec = ROWS[name]
    runner, world_size = row_spec.runner, row_spec.world_size
    args = row_config(name, preset, extra)
    overrides = [*row_spec.overrides, *_extra_for(row_spec, extra)]
    run_dir = rows_dir / name
    if runner == "qfsdp":
        cmd = [sys.executable, str(ROOT / "launch.py"), f"world_size={world_size}", *args, f"hydra.run.dir={run_dir}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "qfsdp.stock", str(run_dir), *args]
    log.write(f"\n=== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    # Its own process group, so a timeout stops torchrun's workers too: left running, they would hold the lane's
    # GPUs under the next row.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout)
        error = None if returncode == 0 else f"exit code {returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        error = f"timed out after {timeout}s"
    row = {"name": name, "runner": runner, "world_size": world_size, "overrides": overrides,
           "command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - start}
    summary_path = run_dir / "summary.json"
    if error is None and summary_path.exists():
        row.update(status="ok", summary=json.loads(summary_path.read_text()))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        row["losses"] = [r["loss"] for r in rows]
        row["step_tokens_per_second"] = [r["tokens_per_second"] for r in rows]
        row["tokens_per_second"] = steady_tokens_per_second(rows, WARMUP)
    else:
        row.update(status="failed", error=first_error(run_dir) or error)
    return row


def row_config(name: str, preset: list[str], extra: tuple[str, ...] = ()):
    """The row's overrides: the preset's (unless the row is a whole recipe), the row's own, then `extra`."""
    spec = ROWS[name]
    return [*(preset if spec.preset else []), *spec.overrides, *_extra_for(spec, extra)]


def _extra_for(spec: Row, extra: tuple[str, ...]) -> tuple[str, ...]:
    """`run --set` overrides apply to qfsdp rows only: the stock recipe is the fixed baseline."""
    return extra if spec.runner == "qfsdp" else ()


def prepare(names: list[str], preset: list[str], extra: tuple[str, ...] = ()) -> None:
    """Build every checkpoint and tokenizer the rows need, once, before rows run (possibly several at a time)."""
    import torch

    from qfsdp.model import load_tokenizer, prepare_checkpoint

    for name in names:
        cfg = compose_config(row_config(name, preset, extra))
        prepare_checkpoint(cfg.model, getattr(torch, cfg.precision.dtype), full_finetune=not cfg.lora.enabled)
        if ROWS[name].runner == "stock":
            prepare_checkpoint(cfg.model, torch.bfloat16)  # the stock recipe loads bf16 weights
        load_tokenizer(cfg.model)


def matmul_ceiling() -> dict:
    """bf16 matmul rate on this device (the MFU denominator), in a child process so no CUDA context lingers."""
    code = (
        "import json, torch, time\n"
        "if not torch.cuda.is_available(): print(json.dumps(None)); raise SystemExit\n"
        "n = 8192; a = torch.randn(n, n, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)\n"
        "for _ in range(3): a @ b\n"
        "torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)\n"
        "s.record()\n"
        "for _ in range(20): a @ b\n"
        "e.record(); torch.cuda.synchronize()\n"
        "print(json.dumps({'tflops': 2 * n**3 * 20 / (s.elapsed_time(e) / 1e3) / 1e12,\n"
        "                  'device': torch.cuda.get_device_name()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def report(out: Path, rows: list[dict], meta: dict) -> None:
    from qfsdp.bench_report import checks, plots, table

    results = checks(rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": results}, indent=1))
    (out / "results.md").write_text(table(rows, meta, results))
    plots(out, rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qfsdp.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--preset", default="llama8b", choices=sorted(PRESETS))
    r.add_argument("--rows", default="qfsdp-1,qfsdp-2,stock-1", help=f"comma-separated, from: {', '.join(ROWS)}")
    r.add_argument("--timeout", type=int, default=900, help="seconds per row")
    r.add_argument("--rows-dir", type=Path, help="where each row's run directory goes (default OUT/rows)")
    r.add_argument("--stop-at", type=float, help="epoch seconds: start no row after this (less 60 s), cut rows there")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every qfsdp row (not the stock baseline), e.g. "
                        "fsdp2.layers_per_unit=2; repeatable")
    pr = sub.add_parser("prepare", help="build the checkpoints and tokenizers the rows need")
    pr.add_argument("--preset", default="llama8b", choices=sorted(PRESETS))
    pr.add_argument("--rows", required=True)
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for run")
    m = sub.add_parser("report")
    m.add_argument("out", type=Path, help="where to write the merged report")
    m.add_argument("sources", type=Path, nargs="+",
                   help="directories holding results.json (per row: the first that finished wins)")
    a = p.parse_args(argv)

    if a.cmd == "prepare":
        prepare([n for n in a.rows.split(",") if n], PRESETS[a.preset], tuple(a.set))
    elif a.cmd == "report":
        by_name, meta = {}, {}
        for d in a.sources:
            data = json.loads((d / "results.json").read_text())
            meta = meta or data["meta"]
            for row in data["rows"]:
                # each row keeps the matmul ceiling measured in its own call (the MFU denominator)
                row.setdefault("ceiling", data["meta"].get("ceiling"))
                # first source wins, but a finished row beats one that failed or was cut off elsewhere
                if row["name"] not in by_name or (by_name[row["name"]]["status"] != "ok" and row["status"] == "ok"):
                    by_name[row["name"]] = row
        rows = list(by_name.values())
        a.out.mkdir(parents=True, exist_ok=True)
        report(a.out, rows, meta)
        print((a.out / "results.md").read_text())
    else:
        names = [n for n in a.rows.split(",") if n]
        unknown = [n for n in names if n not in ROWS]
        if unknown:
            p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
        preset = PRESETS[a.preset]
        extra = tuple(a.set)
        if extra:  # a bad override fails here, before any row starts
            try:
                compose_config([*preset, *extra])
            except Exception as e:  # Hydra's own message names the key or value
                p.error(f"--set {' '.join(extra)}: {e}")
        a.out.mkdir(parents=True, exist_ok=True)
        meta = {"preset": a.preset, "preset_overrides": preset, "qfsdp_overrides": list(extra),
                "ceiling": matmul_ceiling(),
                "flops_per_token": flops_per_token(compose_config(preset)), "warmup_steps": WARMUP,
                "host": os.uname().nodename}
        rows = []
        with (a.out / "bench.log").open("a") as log:
            for name in names:
                left = (a.stop_at - time.time()) if a.stop_at else a.timeout
                if left < 60:  # a device call has a hard time limit: keep what finished, report, stop
                    rows.append({"name": name, "runner": ROWS[name].runner, "world_size": ROWS[name].world_size,
                                 "status": "skipped", "error": "not started: --stop-at reached", "wall_s": 0.0})
                    continue
                rows.append(run_row(name, preset, a.rows_dir or a.out / "rows", log, int(min(a.timeout, left)),
                                    extra))
                report(a.out, rows, meta)  # after every row: a cut-off call keeps what finished
                print(f"{name}: {rows[-1]['status']} {rows[-1].get('tokens_per_second', 0):.0f} tokens/s "
                      f"({rows[-1]['wall_s']:.0f}s)", flush=True)
        report(a.out, rows, meta)  # rows skipped at the stop time are listed too
        print((a.out / "results.md").read_text())
        if any(row["status"] != "ok" for row in rows):
            sys.exit(1)


if __name__ == "__main__":
    main()

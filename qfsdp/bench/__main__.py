"""Benchmark matrix: qfsdp configurations through the same `launch.py` users run, beside the stock recipe
(`qfsdp.bench.stock`), on one host, in one command.

    python -m qfsdp.bench run OUT [--preset llama8b|tiny] [--rows NAME,NAME...]   # run rows, write the report
                                  [--set KEY=VALUE ...]      # overrides for every qfsdp row (not the baseline)
    python -m qfsdp.bench report OUT SRC [SRC...]                                  # merge runs, redo report + checks
    python -m qfsdp.bench prepare --rows NAME,NAME...     # build the rows' checkpoints first (before parallel lanes)

`run --stop-at EPOCH` starts no row within 60 s of EPOCH and cuts a running row there (device calls have a hard
time limit; bench/gpu.sh sets it). On GPU hosts, bench/gpu.sh runs lanes of rows side by side on disjoint GPUs.

OUT gets results.json, results.md (throughput-memory frontier, table + PASS/FAIL checks), loss.png, throughput.png,
memory.png, frontier.png, bench.log. MFU is against a bf16 matmul ceiling measured in the same run, FLOPs per token
from `qfsdp.bench.flops`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from qfsdp.bench.flops import flops_per_token
from qfsdp.bench.matrix import PRESETS, ROWS, WARMUP, matmul_ceiling, prepare, run_row
from qfsdp.bench.results import merge, write_report
from qfsdp.config import compose_config


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
        rows, meta = merge(a.sources)
        a.out.mkdir(parents=True, exist_ok=True)
        write_report(a.out, rows, meta)
        print((a.out / "results.md").read_text())
    else:
        run(p, a)


def run(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
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
            "ceiling": matmul_ceiling(), "flops_per_token": flops_per_token(compose_config(preset)),
            "warmup_steps": WARMUP, "host": os.uname().nodename}
    rows = []
    with (a.out / "bench.log").open("a") as log:
        for name in names:
            left = (a.stop_at - time.time()) if a.stop_at else a.timeout
            if left < 60:  # a device call has a hard time limit: keep what finished, report, stop
                rows.append({"name": name, "runner": ROWS[name].runner, "world_size": ROWS[name].world_size,
                             "status": "skipped", "error": "not started: --stop-at reached", "wall_s": 0.0})
                continue
            rows.append(run_row(name, preset, a.rows_dir or a.out / "rows", log, int(min(a.timeout, left)), extra))
            write_report(a.out, rows, meta)  # after every row: a cut-off call keeps what finished
            print(f"{name}: {rows[-1]['status']} {rows[-1].get('tokens_per_second', 0):.0f} tokens/s "
                  f"({rows[-1]['wall_s']:.0f}s)", flush=True)
    write_report(a.out, rows, meta)  # rows skipped at the stop time are listed too
    print((a.out / "results.md").read_text())
    if any(row["status"] != "ok" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

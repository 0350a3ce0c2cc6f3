"""Benchmark report: the Markdown table, the PASS/FAIL checks of what must hold, and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qfsdp.bench import flops
from qfsdp.bench.matrix import ROWS
from qfsdp.report import max_loss_gap

GIB = 2**30


def _by_name(rows):
    return {r["name"]: r for r in rows if r["status"] == "ok"}


def _mem(row, phase: str, key: str) -> list[float]:
    """Per-rank peak memory (GiB) of a row, while loading (`load_memory`) or training (`memory`)."""
    return [m.get(key, m.get("peak_rss_gib", 0.0)) for m in row["summary"][phase]]


def _load_host(row) -> str:
    """Host memory while loading, summed over the processes of the row's busiest node: peak RSS (which counts a
    mapped checkpoint's pages once per process) / own (anonymous) memory, in GiB."""
    nodes = row["summary"].get("load_host_memory_per_node") or {}
    if not nodes:
        return "-"
    node = max(nodes.values(), key=lambda n: n["peak_rss_gib"])
    return f"{node['peak_rss_gib']:.1f} / {node['peak_anon_gib']:.1f}"


def _peak(row) -> float:
    """A row's training peak (allocated GiB) on its busiest GPU."""
    return max(_mem(row, "memory", "peak_allocated_gib"))


def _on_preset_data(row) -> bool:
    """Whether a row trains on the preset's data as the preset builds it: not an experiment's own recipe, not its own
    lengths or packing. Only such rows' tokens/s compare with each other."""
    spec = ROWS.get(row["name"])
    if spec is not None and not spec.preset:
        return False
    overrides = row.get("overrides", spec.overrides if spec is not None else ())
    return not any(o.startswith(("dataset", "trainer.packing")) for o in overrides)


def _runner(row) -> str:
    return row.get("runner") or row["name"].split("-", 1)[0]


def _max_dloss(a, b) -> float:
    return max_loss_gap(dict(enumerate(a["losses"], 1)), dict(enumerate(b["losses"], 1)))


def checks(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """What must hold on a GPU host. None = not measured in these rows."""
    r = _by_name(rows)
    out: list[tuple[str, bool | None, str]] = []

    def check(name, needed, fn):
        if all(n in r for n in needed):
            ok, detail = fn(*[r[n] for n in needed])
            out.append((name, bool(ok), detail))
        else:
            out.append((name, None, "not run: needs " + ", ".join(n for n in needed if n not in r)))

    def dloss_detail(a, b):
        return f"max |dloss| = {_max_dloss(a, b):.2e} over {min(len(a['losses']), len(b['losses']))} steps"

    def dloss_within(bound):
        return lambda a, b: (_max_dloss(a, b) <= bound, dloss_detail(a, b))

    def at_least_as_fast(a, b):
        ta, tb = a["tokens_per_second"], b["tokens_per_second"]
        return ta >= tb, f"{ta:.0f} vs {tb:.0f} tokens/s ({ta / tb:.2f}x)"

    # Deterministic rows: the differences measured are the configurations', not GPU run-to-run noise.
    for one, many in [("qfsdp-1-det", "qfsdp-2-det"), ("qfsdp-1-det", "qfsdp-4-det")]:
        check(f"loss parity {one} vs {many}: per-step |dloss| <= 1e-3", [one, many], dloss_within(1e-3))
    # Offload moves only frozen weights to the CPU (shard.py): the same bytes reach the same kernels, and the
    # optimizer step stays on the GPU, so the losses should be equal (1e-5: float32 printing, not arithmetic).
    check("offload on vs off identical: qfsdp-2-offload-det vs qfsdp-2-det, per-step |dloss| <= 1e-5",
          ["qfsdp-2-det", "qfsdp-2-offload-det"], dloss_within(1e-5))
    check("compile on vs off: qfsdp-2-compile-det vs qfsdp-2-det, per-step |dloss| <= 1e-3",
          ["qfsdp-2-det", "qfsdp-2-compile-det"], dloss_within(1e-3))
    # Fused kernels round differently from PyTorch's: they must stay within the equal-loss promise of the eager run.
    for fused in ("qfsdp-1-liger-det", "qfsdp-1-liger-compile-det"):
        check(f"kernels=liger vs eager: {fused} vs qfsdp-1-det, per-step |dloss| <= 1e-3", ["qfsdp-1-det", fused],
              dloss_within(1e-3))
    # Activation offloading copies saved tensors out and back bit for bit, so the losses should be equal.
    check("activation offloading on vs off identical: qfsdp-1-offact-det vs qfsdp-1-det, per-step |dloss| <= 1e-5",
          ["qfsdp-1-det", "qfsdp-1-offact-det"], dloss_within(1e-5))
    # Keeping layers' activations changes no arithmetic; compile's fusions round differently (as above).
    check("the GPU defaults (compile, auto checkpointing) vs eager, every layer recomputing: qfsdp-1-compile-auto-det "
          "vs qfsdp-1-det, per-step |dloss| <= 1e-3", ["qfsdp-1-det", "qfsdp-1-compile-auto-det"], dloss_within(1e-3))
    # The same comparisons without deterministic kernels, for reference (run-to-run noise included).
    for one, many in [("qfsdp-1", "qfsdp-2"), ("qfsdp-1", "qfsdp-4"), ("qfsdp-2", "qfsdp-2-offload"),
                      ("qfsdp-2", "qfsdp-2-compile")]:
        if one in r and many in r:
            out.append((f"{many} vs {one} without deterministic kernels (run-to-run noise included)", None,
                        dloss_detail(r[one], r[many])))
    for bf16, fp16 in [("qfsdp-1", "qfsdp-1-fp16"), ("qfsdp-2", "qfsdp-2-fp16")]:
        def fp16_ok(a, b):
            finite = all(math.isfinite(x) for x in b["losses"])
            rel = abs(b["losses"][-1] - a["losses"][-1]) / abs(a["losses"][-1])
            return finite and rel <= 0.02, f"finite={finite}, final {b['losses'][-1]:.4f} vs bf16 " \
                                           f"{a['losses'][-1]:.4f} ({rel:.2%})"
        check(f"fp16 trains without inf/NaN, final loss within 2% of bf16 ({fp16})", [bf16, fp16], fp16_ok)
    for name in [n for n in r if n.startswith("qfsdp-") and r[n]["world_size"] > 1]:
        def bytes_ok(one, many):
            total = one["summary"]["quantized_bytes_per_rank"][0]
            per = many["summary"]["quantized_bytes_per_rank"]
            worst = max(abs(b - total / len(per)) / (total / len(per)) for b in per)
            return worst <= 0.01, f"{[round(b / GIB, 3) for b in per]} GiB per rank of {total / GIB:.3f} GiB"
        check(f"quantized bytes per rank = total / world_size within 1% ({name})", ["qfsdp-1", name], bytes_ok)
    check("load: every GPU's peak at world_size=2 below the 1-GPU load peak", ["qfsdp-1", "qfsdp-2"],
          lambda a, b: (max(_mem(b, "load_memory", "peak_allocated_gib")) < _mem(a, "load_memory",
                                                                                 "peak_allocated_gib")[0],
                        f"{_fmt(_mem(b, 'load_memory', 'peak_allocated_gib'))} vs "
                        f"{_fmt(_mem(a, 'load_memory', 'peak_allocated_gib'))} GiB"))
    check("train: every GPU's peak at world_size=2 <= 75% of the 1-GPU peak", ["qfsdp-1", "qfsdp-2"],
          lambda a, b: (max(_mem(b, "memory", "peak_allocated_gib")) <= 0.75 * _mem(a, "memory",
                                                                                     "peak_allocated_gib")[0],
                        f"{_fmt(_mem(b, 'memory', 'peak_allocated_gib'))} vs "
                        f"{_fmt(_mem(a, 'memory', 'peak_allocated_gib'))} GiB"))
    kaggle_limit = 15.0
    for name in ("kaggle-1", "kaggle-2", "kaggle-offload-1", "kaggle-offload-2"):
        check(f"{name}: peak memory per GPU < {kaggle_limit:.0f} GiB (load and train, reserved)", [name],
              lambda a: (max(_mem(a, "memory", "peak_reserved_gib") + _mem(a, "load_memory", "peak_reserved_gib"))
                         < kaggle_limit and all(math.isfinite(x) for x in a["losses"]),
                         f"train {_fmt(_mem(a, 'memory', 'peak_reserved_gib'))}, load "
                         f"{_fmt(_mem(a, 'load_memory', 'peak_reserved_gib'))} GiB reserved; "
                         f"{len(a['losses'])} steps, finite losses"))
    check("kaggle-2 loss curve matches kaggle-1: per-step |dloss| <= 1e-3", ["kaggle-1", "kaggle-2"],
          dloss_within(1e-3))
    check("kaggle-1 (auto checkpointing) loss curve matches kaggle-1-ckptall (every layer): per-step |dloss| <= 1e-3",
          ["kaggle-1", "kaggle-1-ckptall"], dloss_within(1e-3))
    if "kaggle-1" in r and "kaggle-1-ckptall" in r:
        out.append(("kaggle-1 (auto checkpointing) vs kaggle-1-ckptall (every layer)", None,
                    at_least_as_fast(r["kaggle-1"], r["kaggle-1-ckptall"])[1]))
    for n in (1, 2):
        check(f"kaggle-{n} loss curve matches kaggle-offload-{n}: per-step |dloss| <= 1e-3",
              [f"kaggle-{n}", f"kaggle-offload-{n}"], dloss_within(1e-3))
        check(f"throughput: kaggle-{n} (no offload) >= 2x kaggle-offload-{n}", [f"kaggle-{n}", f"kaggle-offload-{n}"],
              lambda a, b: (a["tokens_per_second"] >= 2 * b["tokens_per_second"],
                            f"{a['tokens_per_second']:.0f} vs {b['tokens_per_second']:.0f} tokens/s "
                            f"({a['tokens_per_second'] / b['tokens_per_second']:.2f}x)"))
    check("throughput: qfsdp 1 GPU >= stock recipe 1 GPU", ["qfsdp-1", "stock-1"], at_least_as_fast)
    check("throughput: qfsdp 1 GPU compile=true >= stock recipe 1 GPU", ["qfsdp-1-compile", "stock-1"],
          at_least_as_fast)
    # Compiled layers must keep activation checkpointing's savings (shard.compile_layer).
    check("memory: qfsdp 1 GPU compile=true train peak within 5% of eager", ["qfsdp-1", "qfsdp-1-compile"],
          lambda a, b: (_mem(b, "memory", "peak_allocated_gib")[0] <= 1.05 * _mem(a, "memory", "peak_allocated_gib")[0],
                        f"{_fmt(_mem(b, 'memory', 'peak_allocated_gib'))} vs "
                        f"{_fmt(_mem(a, 'memory', 'peak_allocated_gib'))} GiB"))
    # checkpointed_layers=auto (the GPU default): faster than every layer recomputing, and within its cap.
    check("auto checkpointing: qfsdp-1-compile-auto faster than qfsdp-1-compile (every layer recomputing)",
          ["qfsdp-1-compile", "qfsdp-1-compile-auto"], lambda a, b: at_least_as_fast(b, a))
    check("auto checkpointing under gpu_memory_limit_gib=24: qfsdp-1-compile-auto24 peaks < 24 GiB (load and train, "
          "reserved) and is faster than qfsdp-1-compile", ["qfsdp-1-compile", "qfsdp-1-compile-auto24"],
          lambda a, b: (max(_mem(b, "memory", "peak_reserved_gib") + _mem(b, "load_memory", "peak_reserved_gib")) < 24
                        and b["tokens_per_second"] >= a["tokens_per_second"],
                        f"train {_fmt(_mem(b, 'memory', 'peak_reserved_gib'))}, load "
                        f"{_fmt(_mem(b, 'load_memory', 'peak_reserved_gib'))} GiB reserved, "
                        f"{b['summary'].get('checkpointed_layers')} layers recompute; "
                        + at_least_as_fast(b, a)[1]))
    out.append(auto_prediction(r))
    out += speed_targets(r)
    # Log-normal lengths: tokens/s count real tokens only, so padding costs what it costs (metrics.TokenCounter).
    check("packing: qfsdp-1-pack real tokens/s >= 1.5 x qfsdp-1-lognormal", ["qfsdp-1-lognormal", "qfsdp-1-pack"],
          lambda a, b: (b["tokens_per_second"] >= 1.5 * a["tokens_per_second"],
                        f"{b['tokens_per_second']:.0f} vs 1.5 x {a['tokens_per_second']:.0f} real tokens/s "
                        f"({b['tokens_per_second'] / a['tokens_per_second']:.2f}x); padding {_padding(b)} vs "
                        f"{_padding(a)} of the tokens run"))
    if "qfsdp-1-pack" in r and "qfsdp-1-pack-flex" in r:
        a, b = r["qfsdp-1-pack"], r["qfsdp-1-pack-flex"]
        out.append(("packing with FlexAttention: qfsdp-1-pack-flex vs qfsdp-1-pack (sdpa)", None,
                    f"{b['tokens_per_second']:.0f} vs {a['tokens_per_second']:.0f} real tokens/s "
                    f"({b['tokens_per_second'] / a['tokens_per_second']:.2f}x), {dloss_detail(a, b)}"))
    for qfsdp_row in ("qfsdp-1-lognormal", "qfsdp-1-pack"):
        if qfsdp_row in r and "stock-1-lognormal" in r:
            a, b = r["stock-1-lognormal"], r[qfsdp_row]
            out.append((f"{qfsdp_row} vs stock-1-lognormal (same lengths)", None,
                        f"{b['tokens_per_second']:.0f} vs {a['tokens_per_second']:.0f} real tokens/s "
                        f"({b['tokens_per_second'] / a['tokens_per_second']:.2f}x)"))
    check("throughput: qfsdp 2 GPUs >= 1.9 x qfsdp 1 GPU", ["qfsdp-1", "qfsdp-2"],
          lambda a, b: (b["tokens_per_second"] >= 1.9 * a["tokens_per_second"],
                        f"{b['tokens_per_second']:.0f} vs 1.9 x {a['tokens_per_second']:.0f} tokens/s "
                        f"({b['tokens_per_second'] / a['tokens_per_second']:.2f}x)"))
    return out


AUTO_PREDICTION = ("checkpointed_layers=auto: the plan's predicted train peak is not below the measured one "
                   "(allocated, rank 0)")


def auto_prediction(r: dict) -> tuple[str, bool | None, str]:
    """Every row that `auto` planned (its summary has `predicted_peak_gib`) peaked at or under its prediction: the
    plan must err towards recompute, never past the GPU's memory."""
    planned = {name: row for name, row in r.items() if "predicted_peak_gib" in row["summary"]}
    if not planned:
        return AUTO_PREDICTION, None, "not run: no row planned with checkpointed_layers=auto on a GPU"
    pairs = {name: (_mem(row, "memory", "peak_allocated_gib")[0], row["summary"]["predicted_peak_gib"])
             for name, row in planned.items()}
    return (AUTO_PREDICTION, all(measured <= predicted for measured, predicted in pairs.values()),
            "; ".join(f"{name}: {measured:.2f} vs {predicted:.2f} GiB predicted "
                      f"({_recomputing(planned[name])} layers recompute)"
                      for name, (measured, predicted) in pairs.items()))


def _recomputing(row) -> str:
    layers = row["summary"].get("checkpointed_layers")
    return "all" if layers is None else str(layers)


TARGET_1 = ("target 1 (same memory): qfsdp's fastest 1-GPU row with train peak <= stock-1's + 10% reaches >= 1.5 x "
            "stock-1 tokens/s")
TARGET_2 = "target 2 (memory free): qfsdp's fastest 1-GPU row >= 1.3 x the stock recipe's fastest 1-GPU row"


def speed_targets(r: dict) -> list[tuple[str, bool | None, str]]:
    """Issue 17's targets 1 and 2 over the 1-GPU rows on the preset's data; each names the rows it picked."""
    one_gpu = [row for row in r.values() if row["world_size"] == 1 and _on_preset_data(row)]
    qfsdp = [row for row in one_gpu if _runner(row) == "qfsdp"]
    stock = [row for row in one_gpu if _runner(row) == "stock"]
    out = []

    def tps(row):
        return row["tokens_per_second"]

    if "stock-1" not in r or not qfsdp:
        out.append((TARGET_1, None, "not run: needs stock-1 and a qfsdp 1-GPU row on the preset's data"))
    else:
        base = r["stock-1"]
        bound = 1.10 * _peak(base)
        within = [row for row in qfsdp if _peak(row) <= bound]
        over = ", ".join(f"{row['name']} {_peak(row):.2f}" for row in qfsdp if row not in within)
        if not within:
            out.append((TARGET_1, None, f"not run: no qfsdp 1-GPU row within {bound:.2f} GiB (stock-1 "
                                        f"{_peak(base):.2f} + 10%); over it: {over} GiB"))
        else:
            best = max(within, key=tps)
            out.append((TARGET_1, tps(best) >= 1.5 * tps(base),
                        f"{best['name']} {tps(best):.0f} tokens/s at {_peak(best):.2f} GiB vs stock-1 {tps(base):.0f} "
                        f"at {_peak(base):.2f} GiB (bound {bound:.2f}): {tps(best) / tps(base):.2f}x"
                        + (f"; over the bound: {over} GiB" if over else "")))
    # stock-1-noac (no checkpointing) is the stock recipe's fast configuration: without it the baseline is too weak.
    if "stock-1-noac" not in r or not qfsdp:
        out.append((TARGET_2, None, "not run: needs stock-1-noac and a qfsdp 1-GPU row on the preset's data"))
    else:
        best, base = max(qfsdp, key=tps), max(stock, key=tps)
        out.append((TARGET_2, tps(best) >= 1.3 * tps(base),
                    f"{best['name']} {tps(best):.0f} tokens/s ({_peak(best):.2f} GiB) vs {base['name']} "
                    f"{tps(base):.0f} ({_peak(base):.2f} GiB): {tps(best) / tps(base):.2f}x"))
    return out


def _padding(row) -> str:
    """The share of padding in the tokens a row's forwards ran (older results lack the counts)."""
    real, padding = row.get("real_tokens"), row.get("padding_tokens")
    return f"{padding / (real + padding):.0%}" if real else "n/a"


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def _ceiling(row: dict, meta: dict) -> float | None:
    """The matmul rate (TFLOP/s) a row's MFU divides by: in a merged report its own call's, else this call's."""
    ceiling = (meta.get("ceiling") or {}).get("tflops")
    return (row.get("ceiling") or {}).get("tflops", ceiling) if "ceiling" in row else ceiling


def _mfu(row: dict, meta: dict) -> float | None:
    """A finished row's MFU, or None: no measured ceiling, or not the preset's data (FLOPs per token are the preset's:
    its sequence length)."""
    ceiling = _ceiling(row, meta)
    if not ceiling or not _on_preset_data(row):
        return None
    return flops.mfu(row["tokens_per_second"], row["world_size"], meta["flops_per_token"], ceiling)


def _frontier_rows(rows: list[dict]) -> list[dict]:
    """Finished rows on the preset's data, 1 GPU or more, by train peak: only their tokens/s compare."""
    return sorted((r for r in rows if r["status"] == "ok" and _on_preset_data(r)),
                  key=lambda r: (_peak(r), -r["tokens_per_second"], r["name"]))


def pareto(rows: list[dict]) -> set[str]:
    """Names of the rows no other row beats: at least as fast at no more memory, and better in one of the two. Rows
    tied on both stay on the frontier together."""
    def beats(a, b):
        ta, tb, ma, mb = a["tokens_per_second"], b["tokens_per_second"], _peak(a), _peak(b)
        return ta >= tb and ma <= mb and (ta > tb or ma < mb)

    return {b["name"] for b in rows if not any(beats(a, b) for a in rows)}


def frontier_section(rows: list[dict], meta: dict) -> str:
    """results.md's lead: tokens/s against train peak memory per row, the frontier marked, and what MFU divides."""
    on = _frontier_rows(rows)
    best = pareto(on)
    lines = ["## Throughput–memory frontier", "",
             "Finished rows on the preset's data, by train peak GiB per GPU; on frontier: no other row is at least as "
             "fast at no more memory (frontier.png plots them).", "",
             "| row | GPUs | real tokens/s | train peak GiB (alloc) | MFU | on frontier |", "|---|---|---|---|---|---|"]
    for row in on:
        mfu = _mfu(row, meta)
        lines.append(f"| {row['name']} | {row['world_size']} | {row['tokens_per_second']:,.0f} | {_peak(row):.2f} | "
                     f"{f'{mfu:.1%}' if mfu is not None else 'n/a'} | {'yes' if row['name'] in best else 'no'} |")
    if not on:
        lines.append("| none finished | | | | | |")
    # merged reports: each row divides by its own call's ceiling, so name every one the rows used
    ceilings = sorted({_ceiling(row, meta) for row in on} - {None}) or [(meta.get("ceiling") or {}).get("tflops")]
    peak = " / ".join(f"{c:.0f} TFLOP/s" for c in ceilings if c) or "n/a (no GPU)"
    lines += ["", f"MFU = tokens/s per GPU × FLOPs per token ÷ the bf16 matmul peak measured in the row's call "
                  f"({peak}); FLOPs per token = {meta['flops_per_token']:.3e} = {flops.FORMULA}.", "",
              "## All rows and checks", ""]
    return "\n".join(lines) + "\n"


def table(rows: list[dict], meta: dict, results) -> str:
    ceiling = (meta.get("ceiling") or {}).get("tflops")
    fpt = meta["flops_per_token"]
    lines = [
        f"Preset `{meta['preset']}`: {' '.join(meta['preset_overrides'])}",
        *([f"Every qfsdp row also: {' '.join(meta['qfsdp_overrides'])}"] if meta.get("qfsdp_overrides") else []),
        "",
        f"bf16 matmul ceiling: {f'{ceiling:.0f} TFLOP/s' if ceiling else 'n/a (no GPU)'} "
        f"({(meta.get('ceiling') or {}).get('device', 'cpu')}; merged reports: each row's own call's); "
        f"FLOPs/token {fpt:.3e}; "
        f"tokens/s count real (non-padding) tokens and exclude the first {meta['warmup_steps']} steps; padding: its "
        f"share of the tokens the forwards ran; MFU only for rows on the preset's data.",
        "",
        "| row | status | GPUs | micro batch x accumulation | real tokens/s | tokens/s/GPU | padding | MFU | "
        "load peak GiB (alloc) | load host GiB (RSS / own, per node) | train peak GiB (alloc / reserved) | "
        "4-bit GiB/rank | final loss | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            status = f"{row['status'].upper()}: {row.get('error', '')[:80]}"
            lines.append(f"| {row['name']} | {status} | {row['world_size']} | {_batch(row)} |"
                         + " |" * 10)
            continue
        s, ws, tps = row["summary"], row["world_size"], row["tokens_per_second"]
        mfu = _mfu(row, meta)
        mfu = f"{mfu:.1%}" if mfu is not None else "n/a"
        load = max(_mem(row, "load_memory", "peak_allocated_gib"))
        alloc = max(_mem(row, "memory", "peak_allocated_gib"))
        reserved = max(_mem(row, "memory", "peak_reserved_gib"))
        lines.append(f"| {row['name']} | ok | {ws} | {_batch(row)} | {tps:,.0f} | {tps / ws:,.0f} | {_padding(row)} | "
                     f"{mfu} | {load:.2f} | {_load_host(row)} | "
                     f"{alloc:.2f} / {reserved:.2f} | {s['quantized_bytes_per_rank'][0] / GIB:.3f} | "
                     f"{s['final_loss']:.4f} | {s['wall_time_s']:.0f} |")
    lines += ["", "Checks:", ""]
    for name, ok, detail in results:
        label = "PASS" if ok else "FAIL" if ok is not None else "n/a" if detail.startswith("not run") else "info"
        lines.append(f"- {label} {name}: {detail}")
    return "\n".join(lines) + "\n"


def _batch(row: dict) -> str:
    micro, accumulation = row.get("micro_batch"), row.get("gradient_accumulation")
    return f"{micro} x {accumulation}" if micro else "n/a"


def plots(out: Path, rows: list[dict]) -> None:
    from qfsdp.plots import bar_plot, line_plot

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    def curves(rows):
        return [(r["name"], range(1, len(r["losses"]) + 1), r["losses"]) for r in rows]

    # Rows of the preset share data and model, so their curves overlay; an experiment (kaggle-*) trains on other
    # data, so its curves get their own plot.
    line_plot(out / "loss.png", curves([r for r in ok if not r["name"].startswith("kaggle")]),
              xlabel="optimizer step", ylabel="loss")
    kaggle = [r for r in ok if r["name"].startswith("kaggle")]
    if kaggle:
        line_plot(out / "loss_kaggle.png", curves(kaggle), xlabel="optimizer step", ylabel="loss",
                  title="experiment=kaggle_2xt4: 1 vs 2 GPUs")
    names = [r["name"] for r in ok]
    bar_plot(out / "throughput.png", names, [r["tokens_per_second"] for r in ok], ylabel="real tokens/s (all GPUs)")
    bar_plot(out / "memory.png", names, [max(_mem(r, "memory", "peak_allocated_gib")) for r in ok],
             ylabel="peak GiB per GPU (train)")
    frontier_plot(out / "frontier.png", rows)


def frontier_plot(path: Path, rows: list[dict]) -> None:
    """Real tokens/s of all GPUs against train peak GiB per GPU, qfsdp and stock apart, the frontier joined."""
    from qfsdp.plots import scatter_plot

    on = _frontier_rows(rows)
    best = [r for r in on if r["name"] in pareto(on)]  # by memory: the line runs left to right

    def point(row):
        return f"{row['name']} ({row['world_size']} GPU{'s' if row['world_size'] > 1 else ''})", _peak(row), \
            row["tokens_per_second"]

    groups = [(runner, [point(r) for r in on if _runner(r) == runner]) for runner in sorted({_runner(r) for r in on})]
    scatter_plot(path, groups, xlabel="train peak GiB per GPU (allocated)", ylabel="real tokens/s (all GPUs)",
                 line=[(_peak(r), r["tokens_per_second"]) for r in best], line_label="frontier",
                 title="throughput vs memory, rows on the preset's data")


def write_report(out: Path, rows: list[dict], meta: dict) -> None:
    """OUT/results.json, results.md (the frontier, the table and checks) and the plots."""
    results = checks(rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": results}, indent=1))
    (out / "results.md").write_text(frontier_section(rows, meta) + table(rows, meta, results))
    plots(out, rows)


def merge(sources: list[Path]) -> tuple[list[dict], dict]:
    """Rows and meta of several runs' results.json: per row the first source wins, but a finished row beats one that
    failed or was cut off elsewhere. Each row keeps the matmul ceiling of its own call (its MFU denominator)."""
    by_name, meta = {}, {}
    for source in sources:
        data = json.loads((source / "results.json").read_text())
        meta = meta or data["meta"]
        for row in data["rows"]:
            row.setdefault("ceiling", data["meta"].get("ceiling"))
            if row["name"] not in by_name or (by_name[row["name"]]["status"] != "ok" and row["status"] == "ok"):
                by_name[row["name"]] = row
    return list(by_name.values()), meta

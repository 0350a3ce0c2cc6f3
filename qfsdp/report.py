"""Sweep report: one row per job, from what each run directory already holds.

    python -m qfsdp.report SWEEP_DIR                      # writes into SWEEP_DIR
    python -m qfsdp.report RUN_DIR [RUN_DIR ...] -o OUT   # any run directories, side by side (first = reference)

Writes summary.csv and summary.md (per job: overrides, world size, status ok/failed with the error line, steps,
final loss, eval loss (when evaluated), max |Δloss| against the first job with the same global batch, tokens/s, MFU,
peak memory per GPU, wall time), loss_curves.png (every job overlaid), throughput.png and memory.png. After
`python launch.py -m ...` the sweep's own directory gets them without asking: `SweepReport` is a Hydra callback
(conf/config.yaml, hydra.callbacks), run after every job (so a sweep cut short still has its report) and at the end of
the sweep.

Reads per run: .hydra/config.yaml and overrides.yaml, metrics.jsonl, summary.json (finished), status.json (a sweep
job that failed) and error-rank*.txt (the failing ranks' error lines).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qfsdp.distributed import env_rank
from qfsdp.rundir import STATUS, SUMMARY, first_error, write_status

FILES = ("summary.csv", "summary.md", "loss_curves.png", "throughput.png", "memory.png")
COLUMNS = ("job", "overrides", "world_size", "status", "error", "steps", "final_loss", "eval_loss", "max_abs_dloss",
           "dloss_reference", "tokens_per_second", "mfu", "peak_memory_gib", "wall_time_s", "device", "run_dir")


@dataclass
class Job:
    name: str
    path: Path
    overrides: list[str]
    config: DictConfig | None
    summary: dict | None  # None unless the run finished
    rows: list[dict]  # metrics.jsonl: the steps it logged, finished or not
    status: str  # ok | failed | unfinished
    error: str

    @property
    def global_batch(self) -> int | None:
        return OmegaConf.select(self.config, "trainer.global_batch_size") if self.config is not None else None

    @property
    def world_size(self) -> int | None:
        if self.summary:
            return self.summary["world_size"]
        return OmegaConf.select(self.config, "world_size") if self.config is not None else None


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (".hydra/config.yaml", SUMMARY, STATUS, "metrics.jsonl"))


def _job_number(path: Path) -> tuple[int, str]:
    """Hydra's job number (sweep order), whatever hydra.sweep.subdir named the directory; jobs without one last."""
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num") if hydra_yaml.exists() else None
    return (num if isinstance(num, int) else sys.maxsize), path.name


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path is a run directory, or a sweep directory whose job directories are taken in sweep order."""
    runs: list[Path] = []
    for path in paths:
        if is_run_dir(path):
            runs.append(path)
            continue
        jobs = [p for p in path.iterdir() if p.is_dir() and is_run_dir(p)] if path.is_dir() else []
        if not jobs:
            raise FileNotFoundError(f"{path} is neither a run directory nor a sweep directory holding runs")
        runs += sorted(jobs, key=_job_number)
    return runs


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def load_job(path: Path, name: str) -> Job:
    hydra_dir = path / ".hydra"
    config = OmegaConf.load(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").exists() else None
    overrides = list(OmegaConf.load(hydra_dir / "overrides.yaml")) if (hydra_dir / "overrides.yaml").exists() else []
    metrics = path / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).exists() else None
    recorded = json.loads((path / STATUS).read_text()) if (path / STATUS).exists() else None
    # The first error file written is the root cause: a rank that fails makes the others fail after it (a peer's
    # "connection closed"). status.json holds the driver's error: a bad config, or the same rank line.
    rank_error = first_error(path)
    if summary is not None:
        status, error = "ok", ""
    elif rank_error or recorded is not None:
        status = (recorded or {}).get("status", "failed")
        error = _first_line(rank_error or recorded.get("error") or "")
    else:
        status, error = "unfinished", f"no {SUMMARY} or {STATUS}: still running, or stopped without a trace"
    return Job(name, path, overrides, config, summary, rows, status, error)


def load_jobs(paths: list[Path]) -> list[Job]:
    runs = find_runs(paths)
    # Names relative to what the runs share: "0", "1" for one sweep; "sweepA/0", "sweepB/0" across sweeps.
    root = Path(os.path.commonpath([p.resolve() for p in runs])) if len(runs) > 1 else runs[0].resolve().parent
    return [load_job(p, str(p.resolve().relative_to(root))) for p in runs]


def max_loss_gap(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Largest per-step |loss difference| over the steps both runs logged ({step: loss}); None if they share none.
    The one definition behind the sweep report, the bench checks and the notebook."""
    common = a.keys() & b.keys()
    return max(abs(a[s] - b[s]) for s in common) if common else None


def max_abs_dloss(a: Job, b: Job) -> float | None:
    """Largest per-step |loss difference| over the steps both jobs logged."""
    return max_loss_gap({r["step"]: r["loss"] for r in a.rows}, {r["step"]: r["loss"] for r in b.rows})


def references(jobs: list[Job]) -> dict[str, Job]:
    """Each job's loss reference: the first job (in sweep order) with the same global batch that logged losses.

    Only the same global batch compares: world_size, offload, compile... must not change the losses, but the batch
    does.
    """
    first: dict[int | None, Job] = {}
    for job in jobs:
        if job.rows and job.global_batch not in first:
            first[job.global_batch] = job
    return {job.name: first[job.global_batch] for job in jobs if job.global_batch in first}


def job_mfu(job: Job) -> float | None:
    """MFU against the datasheet peak of the run's GPU (qfsdp.bench.flops); None on CPU, an unknown GPU or fp32."""
    from qfsdp.bench import flops

    if job.summary is None or job.config is None:
        return None
    peak = flops.peak_tflops(job.summary.get("device"), OmegaConf.select(job.config, "precision.dtype"))
    if peak is None:
        return None
    try:
        per_token = flops.flops_per_token(job.config)
    except (OSError, ValueError):  # the model's config is not reachable from here (a hub id, offline)
        return None
    return flops.mfu(job.summary["tokens_per_second"], job.summary["world_size"], per_token, peak)


def job_eval_loss(job: Job) -> float | None:
    """The last evaluation's loss: summary.json's, or (a run not finished) the last metrics.jsonl row that has one."""
    if job.summary is not None and job.summary.get("eval_loss") is not None:
        return job.summary["eval_loss"]
    evaluated = [r["eval_loss"] for r in job.rows if "eval_loss" in r]
    return evaluated[-1] if evaluated else None


def job_row(job: Job, ref: Job | None) -> dict:
    s = job.summary
    last = job.rows[-1] if job.rows else None
    peak = s["peak_memory_gib"] if s else (last["peak_memory_gib"] if last else None)
    return {
        "job": job.name,
        "overrides": " ".join(job.overrides),
        "world_size": job.world_size,
        "status": job.status,
        "error": job.error,
        "steps": last["step"] if last else (s["steps"] if s else None),
        "final_loss": last["loss"] if last else None,
        "eval_loss": job_eval_loss(job),
        "max_abs_dloss": max_abs_dloss(job, ref) if ref is not None and job.rows else None,
        "dloss_reference": ref.name if ref is not None and job.rows else None,
        "tokens_per_second": s["tokens_per_second"] if s else None,
        "mfu": job_mfu(job),
        "peak_memory_gib": max(peak) if peak else None,
        "wall_time_s": s["wall_time_s"] if s else None,
        "device": s.get("device") if s else None,
        "run_dir": str(job.path),
    }


def build_rows(jobs: list[Job]) -> list[dict]:
    refs = references(jobs)
    return [job_row(job, refs.get(job.name)) for job in jobs]


def write_csv(path: Path, rows: list[dict]) -> None:
    # Missing values are empty cells (NaN for pandas); floats keep full precision.
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])


def _split_overrides(jobs: list[Job]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides every job shares, and each job's own (what the sweep varied)."""
    common = [o for o in jobs[0].overrides if all(o in j.overrides for j in jobs)] if len(jobs) > 1 else []
    return common, {j.name: [o for o in j.overrides if o not in common] for j in jobs}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(jobs: list[Job], rows: list[dict]) -> list[str]:
    """The Markdown table: a job's own overrides only (the shared ones are said once, above it)."""
    _, own = _split_overrides(jobs)
    evaluated = any(r["eval_loss"] is not None for r in rows)  # the eval loss column only when a job has one
    lines = [("| job | overrides | world size | status | steps | final loss | " + ("eval loss | " if evaluated else "")
              + "max abs Δloss (vs job) | tokens/s | MFU | peak GiB/GPU | wall s |"),
             "|---" * (12 if evaluated else 11) + "|"]
    for job, r in zip(jobs, rows):
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        dloss = "ref" if r["dloss_reference"] == r["job"] else (
            f"{r['max_abs_dloss']:.2e} (vs {r['dloss_reference']})" if r["max_abs_dloss"] is not None else "-")
        cells = [r["job"], " ".join(own[job.name]) or "-", _fmt(r["world_size"], ""), status,
                 _fmt(r["steps"], ""), _fmt(r["final_loss"], ".4f"),
                 *([_fmt(r["eval_loss"], ".4f")] if evaluated else []), dloss, _fmt(r["tokens_per_second"], ",.0f"),
                 _fmt(r["mfu"], ".1%"), _fmt(r["peak_memory_gib"], ".2f"), _fmt(r["wall_time_s"], ".0f")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return lines


def markdown(jobs: list[Job], rows: list[dict], sources: list[Path]) -> str:
    common, _ = _split_overrides(jobs)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "unfinished")}
    devices = sorted({r["device"] for r in rows if r["device"]})
    lines = [
        "# qfsdp sweep report",
        "",
        f"{', '.join(f'`{p}`' for p in sources)}: {len(rows)} jobs, "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + (f"; every job: `{' '.join(common)}`" if common else "")
        + (f"; device: {', '.join(devices)}" if devices else "") + ".",
        "",
        *table(jobs, rows),
        "",
        ("Columns: Δloss per step against the first job with the same `trainer.global_batch_size` (ref); "
         "tokens/s over all GPUs after the first step; MFU against the GPU's datasheet bf16/fp16 peak "
         "(`qfsdp/bench/flops.py`; \"-\" on CPU, an unlisted GPU or fp32); peak memory of the fullest rank (GPU allocated, "
         "or process RSS on CPU); wall time of loading, training and saving (process start-up excluded). Every value: "
         "`summary.csv`."),
        "",
        "![loss curves](loss_curves.png) ![throughput](throughput.png) ![memory](memory.png)",
    ]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, jobs: list[Job], rows: list[dict]) -> None:
    from qfsdp.plots import bar_plot, line_plot

    _, own = _split_overrides(jobs)
    label = {j.name: f"{j.name}: {' '.join(own[j.name])}" if own[j.name] else j.name for j in jobs}
    line_plot(out / "loss_curves.png",
              [(label[j.name], [r["step"] for r in j.rows], [r["loss"] for r in j.rows]) for j in jobs if j.rows],
              xlabel="optimizer step", ylabel="training loss")
    ok = [(label[j.name], r) for j, r in zip(jobs, rows) if r["status"] == "ok"]
    bar_plot(out / "throughput.png", [n for n, _ in ok], [r["tokens_per_second"] for _, r in ok],
             ylabel="tokens/s (all GPUs)")
    bar_plot(out / "memory.png", [n for n, _ in ok], [r["peak_memory_gib"] for _, r in ok],
             ylabel="peak GiB per GPU (fullest rank)")


def write_report(paths: list[Path], out: Path) -> tuple[list[Job], list[dict]]:
    """Write the report of the runs under `paths` into `out`; return the jobs and their rows."""
    jobs = load_jobs(paths)
    rows = build_rows(jobs)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "summary.csv", rows)
    (out / "summary.md").write_text(markdown(jobs, rows, paths))
    write_plots(out, jobs, rows)
    return jobs, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qfsdp.report", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", type=Path, nargs="+", help="a sweep directory, or run directories")
    p.add_argument("-o", "--out", type=Path, help="where to write (default: the sweep directory, if one is given)")
    a = p.parse_args(argv)
    out = a.out
    if out is None:
        if len(a.paths) != 1 or is_run_dir(a.paths[0]):
            # Never into a run directory: qfsdp does not write into a finished run (see rundir.py).
            p.error("give -o OUT when reporting on run directories (only a lone sweep directory is its own OUT)")
        out = a.paths[0]
    try:
        write_report(a.paths, out)
    except FileNotFoundError as e:
        p.error(str(e))
    print((out / "summary.md").read_text(), end="")
    print(f"qfsdp: report in {out}/ ({', '.join(FILES)})")


class SweepReport(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks.sweep_report) writing the report into a sweep's directory.

    on_job_end runs in the sweep process after each job, failed ones included: it records a job that failed with an
    exception qfsdp did not catch (Hydra then stops the sweep), notes the job's outcome in its log file, and
    refreshes the report, so a report exists however the sweep ends. on_multirun_end writes it once more and prints
    the table.
    """

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        from qfsdp.progress import append_to_run_log

        if config.hydra.mode != RunMode.MULTIRUN or env_rank() != 0:
            return  # under Slurm every node's driver ends the job; node 0's writes, as for .hydra/ and the log
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and not (run_dir / SUMMARY).exists() \
                and not (run_dir / STATUS).exists():
            try:
                _ = job_return.return_value  # re-raises the job's exception
            except Exception as e:  # noqa: BLE001 - whatever the job raised is what failed it
                write_status(run_dir, "failed", f"{type(e).__name__}: {_first_line(str(e))}")
        job = load_job(run_dir, run_dir.name)
        append_to_run_log(run_dir, f"job {job.status}" + (f": {job.error}" if job.error else ""),
                          "INFO" if job.status == "ok" else "ERROR")
        self._write(Path(config.hydra.sweep.dir), announce=False)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._write(Path(config.hydra.sweep.dir), announce=True)

    @staticmethod
    def _write(sweep_dir: Path, announce: bool) -> None:
        if not sweep_dir.is_dir():
            return  # no job ran
        try:
            jobs, rows = write_report([sweep_dir], sweep_dir)
        except Exception as e:  # noqa: BLE001 - the jobs' results are safe; a report bug must not fail the sweep
            print(f"qfsdp: could not write the sweep report ({type(e).__name__}: {e}); "
                  f"retry with: python -m qfsdp.report {sweep_dir}", file=sys.stderr, flush=True)
            return
        if announce:
            failed = sum(r["status"] != "ok" for r in rows)
            print("\n" + "\n".join(table(jobs, rows)) + f"\n\nqfsdp: sweep of {len(rows)} jobs, {failed} failed; "
                  f"report in {sweep_dir}/ ({', '.join(FILES)})", flush=True)


if __name__ == "__main__":
    main()

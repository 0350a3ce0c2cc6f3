"""`profile=true`: torch.profiler over two optimizer steps after warm-up, on rank 0 -> profile.txt in the run dir.

The table answers "where does a step go": the top operators by GPU time and by CPU time, and how much of the
profiled wall time the GPU was busy. A GPU busy well under 100% means the step is bound by Python/CPU work
(kernel launches, hooks) or by the CPU waiting for the GPU, not by the GPU. On a GPU, `idle_gaps` says which: every
stretch where no kernel or copy ran is charged to what the CPU was doing (waiting in a synchronizing call, or busy in
the operator that launched the next kernel), and the trace itself is written as `trace.json.gz` (open it in
https://ui.perfetto.dev).
"""

from __future__ import annotations

import bisect
import gzip
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

FIRST_STEP = 4  # optimizer steps 1-3 are warm-up (allocator, compile)
STEPS = 2


class ProfileCallback(TrainerCallback):
    def __init__(self, run_dir: Path | None):
        self.path = run_dir / "profile.txt" if run_dir is not None else None
        self.prof = None
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.path is not None and state.global_step + 1 == FIRST_STEP:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self.path is not None and not self.path.exists():
            if self.prof is not None:
                self._write(state.global_step)  # the run ended inside the profiled steps
            else:
                self.path.write_text(f"no profile: the run ended after {state.global_step} optimizer steps, before "
                                     f"step {FIRST_STEP} (profile=true needs trainer.max_steps >= "
                                     f"{FIRST_STEP + STEPS - 1})\n")

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == FIRST_STEP + STEPS - 1:
            self._write(state.global_step)

    def _write(self, last_step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        # Kernel time: events that ran on the device; the sum over kernels is the busy time of the (single) stream
        # set, an upper bound when kernels overlap across streams.
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        lines = [
            f"optimizer steps {FIRST_STEP}-{last_step}: wall {wall:.3f} s, "
            f"GPU kernels {gpu_us / 1e6:.3f} s ({gpu_us / 1e6 / wall:.0%} of wall)",
            "",
            "== by GPU time ==",
            events.table(sort_by="self_device_time_total", row_limit=30) if gpu_us else "(no GPU)",
            "== by CPU time ==",
            events.table(sort_by="self_cpu_time_total", row_limit=30),
        ]
        self.path.write_text("\n".join(lines))
        if gpu_us:
            # torch gzips a trace whose name ends in .gz (metadata included); read back for the idle table.
            trace = self.path.with_name("trace.json.gz")
            self.prof.export_chrome_trace(str(trace))
            try:
                with gzip.open(trace, "rt") as f:
                    table = idle_gaps(json.load(f)["traceEvents"])
            except Exception as e:  # a trace this code does not understand must not stop training
                table = f"(could not analyse {trace.name}: {type(e).__name__}: {e})"
            lines += ["== GPU idle: what the CPU was doing ==", table]
            self.path.write_text("\n".join(lines))
        self.prof = None


GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")
# Runtime calls during which the CPU waits for the GPU (`.item()`, `.cpu()`, `torch.cuda.synchronize()` end in one).
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
MIN_GAP_US = 5.0


def idle_gaps(events: list[dict], top: int = 20) -> str:
    """Charge every stretch of GPU idle time in a Kineto (chrome) trace to what the CPU was doing.

    A gap is a time when no kernel, copy or memset ran on any stream. It is charged to, in this order:
    - "sync": a CPU thread of the launching process was inside a synchronizing runtime call when the gap began (the
      CPU waited for the GPU to drain, then the GPU waited for the CPU), with that call's operators;
    - "wait": the kernel ending the gap had been launched before the gap began, so it waited on something on the
      GPU side (another stream's event, a collective), not on the CPU;
    - "launch": otherwise, with the operators around that launch: the CPU was too slow to feed the GPU.
    Each context shows the innermost annotation (FSDP2's `FSDP::...`, record_function) and the innermost operators.
    """
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("correlation"))
                 for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES)
    if not gpu:
        return "(no GPU activity in the trace)"
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in RUNTIME_CATEGORIES and "correlation" in e.get("args", {})}
    cpu = _CpuTimeline([e for e in events if e.get("ph") == "X" and e.get("cat") in
                        ("cpu_op", "user_annotation", *RUNTIME_CATEGORIES)])
    window = max(gpu[-1][1] - gpu[0][0], 1e-9)
    busy_end, idle = gpu[0][1], 0.0
    charged: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for start, end, corr in gpu[1:]:
        gap = start - busy_end
        if gap >= MIN_GAP_US:
            idle += gap
            cause = charged[_cause(cpu, launches.get(corr), busy_end)]
            cause[0] += gap
            cause[1] += 1
        busy_end = max(busy_end, end)
    lines = [f"GPU busy {1 - idle / window:.1%} of {window / 1e6:.3f} s; idle {idle / 1e6:.3f} s in gaps of "
             f">= {MIN_GAP_US:.0f} us, charged to:",
             f"{'idle ms':>9} {'gaps':>6}  kind    [annotation] innermost operators (outer < inner)"]
    for (kind, where), (us, n) in sorted(charged.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / 1e3:9.1f} {n:6d}  {kind:6}  {where}")
    return "\n".join(lines)


def _cause(cpu: "_CpuTimeline", launch: dict | None, gap_start: float) -> tuple[str, str]:
    if launch is None:
        return "?", "launch not in the trace"
    for tid in cpu.threads_of(launch["pid"]):
        chain = cpu.chain(tid, gap_start)
        if any(name in SYNC_CALLS for _, name in chain):
            return "sync", _describe(chain)
    kind = "wait" if launch["ts"] + launch.get("dur", 0) <= gap_start else "launch"
    return kind, _describe(cpu.chain((launch["pid"], launch["tid"]), launch["ts"]))


def _describe(chain: list[tuple[str, str]]) -> str:
    notes = [name for cat, name in chain if cat == "user_annotation"]
    ops = [name for cat, name in chain if cat == "cpu_op"][-3:]
    return (f"[{notes[-1]}] " if notes else "") + " < ".join(ops or ["?"])


class _CpuTimeline:
    """Nested CPU events per thread: which events enclosed time t on a thread, outermost first."""

    def __init__(self, events: list[dict]):
        self.threads: dict[tuple, tuple[list[float], list[tuple]]] = {}
        by_thread = defaultdict(list)
        for e in events:
            by_thread[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e.get("dur", 0), e["cat"], e["name"]))
        for tid, evs in by_thread.items():
            evs.sort(key=lambda x: (x[0], -x[1]))
            nodes, stack = [], []  # (start, end, cat, name, parent index)
            for start, end, cat, name in evs:
                while stack and nodes[stack[-1]][1] < end:
                    stack.pop()
                nodes.append((start, end, cat, name, stack[-1] if stack else -1))
                stack.append(len(nodes) - 1)
            self.threads[tid] = ([n[0] for n in nodes], nodes)

    def threads_of(self, pid) -> list[tuple]:
        return [tid for tid in self.threads if tid[0] == pid]

    def chain(self, tid: tuple, t: float) -> list[tuple[str, str]]:
        starts, nodes = self.threads.get(tid, ([], []))
        i = bisect.bisect_right(starts, t) - 1
        while i >= 0 and nodes[i][1] < t:
            i = nodes[i][4]
        out = []
        while i >= 0:
            out.append((nodes[i][2], nodes[i][3]))
            i = nodes[i][4]
        return out[::-1]

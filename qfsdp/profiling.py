"""`profile=true`: torch.profiler over two optimizer steps after warm-up, on rank 0 -> profile.txt in the run dir.

The table answers "where does a step go": the top operators by GPU time and by CPU time, and how much of the
profiled wall time the GPU was busy. A GPU busy well under 100% means the step is bound by Python/CPU work
(kernel launches, hooks), not by the GPU.
"""

from __future__ import annotations

import time
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
        self.prof = None

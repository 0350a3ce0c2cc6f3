"""metrics.StepPhases splits each optimizer step at the Trainer's callbacks: one duration per micro-step, then the
optimizer step, what follows it, and the gap since the previous step's end. Driven here with a fake clock."""

from __future__ import annotations

import torch

from qfsdp.metrics import StepPhases


def _phases(clock: list[float]) -> StepPhases:
    phases = StepPhases(torch.device("cpu"))
    ticks = iter(clock)
    phases._now = lambda: next(ticks)
    return phases


def _step(phases: StepPhases, micro_steps: int) -> None:
    """The marks transformers' training loop makes for one step (see MetricsCallback)."""
    phases.begin()                   # on_step_begin
    for _ in range(micro_steps - 1):
        phases.mark()                # on_substep_end
    phases.mark()                    # on_pre_optimizer_step: the last micro-step's backward and clipping are done
    phases.mark()                    # on_optimizer_step
    phases.mark()                    # on_step_end


def test_micro_steps_optimizer_and_gap():
    # step 1: begin 0, micro ends 1, 3, 6; optimizer 6.5; end 6.7. step 2: begin 7.0, micro ends 8, 10, 13; ...
    phases = _phases([0.0, 1.0, 3.0, 6.0, 6.5, 6.7, 7.0, 8.0, 10.0, 13.0, 13.25, 13.5])
    _step(phases, 3)
    assert phases.take() == {"micro_steps_ms": [1000.0, 2000.0, 3000.0], "optimizer_ms": 500.0,
                             "after_optimizer_ms": 200.0}
    _step(phases, 3)
    assert phases.take() == {"micro_steps_ms": [1000.0, 2000.0, 3000.0], "optimizer_ms": 250.0,
                             "after_optimizer_ms": 250.0, "between_steps_ms": 300.0}


def test_one_micro_step_and_steps_logged_every_other_step():
    phases = _phases([0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 5.5, 6.0])
    assert phases.take() == {}  # nothing before a step completes
    _step(phases, 1)
    _step(phases, 1)  # logging_steps=2: only the logged (last) step is reported, its gap from the one before
    assert phases.take() == {"micro_steps_ms": [2000.0], "optimizer_ms": 500.0, "after_optimizer_ms": 500.0,
                             "between_steps_ms": 1000.0}

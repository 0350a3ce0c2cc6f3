"""Test-only: hold one training process at a known point, so that a test can `kill -9` it there. Loaded by Python
at start-up when this directory is on PYTHONPATH.

QFSDP_TEST_PAUSE=RANK:step:N  rank RANK stops in the middle of optimizer step N, after its first micro-step
QFSDP_TEST_PAUSE=RANK:save:N  rank RANK stops in the middle of step N's checkpoint, once it has written its shards
                              of the trained weights and optimizer state (the checkpoint is not complete yet)

The paused process writes its pid to QFSDP_TEST_PAUSE_MARKER and sleeps; the others block in their next collective.
Training itself runs unchanged up to that point.
"""

import os
import time

_spec = os.environ.get("QFSDP_TEST_PAUSE", "").split(":")
if len(_spec) == 3 and os.environ.get("RANK") == _spec[0]:
    _where, _step = _spec[1], int(_spec[2])

    def _pause() -> None:
        marker = os.environ["QFSDP_TEST_PAUSE_MARKER"]
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        time.sleep(600)

    if _where == "step":
        from qfsdp.metrics import MetricsCallback

        _on_substep_end = MetricsCallback.on_substep_end

        def _paused_substep_end(self, args, state, control, **kwargs):
            _on_substep_end(self, args, state, control, **kwargs)
            if state.global_step == _step - 1:  # global_step counts finished steps
                _pause()

        MetricsCallback.on_substep_end = _paused_substep_end
    elif _where == "save":
        from qfsdp.checkpoint import CheckpointingTrainer

        _save_optimizer = CheckpointingTrainer._save_optimizer_and_scheduler

        def _paused_save(self, output_dir):
            _save_optimizer(self, output_dir)
            if self.state.global_step == _step:
                _pause()

        CheckpointingTrainer._save_optimizer_and_scheduler = _paused_save

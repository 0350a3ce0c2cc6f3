"""Python's garbage collector, kept from stalling the GPU during training.

Python starts a collection whenever enough objects have been allocated, on the thread that launches GPU work; with
FSDP2's hooks allocating per layer, it stalled the same layer of every micro-step (docs/design.md). As torchtitan
does, automatic collection is off while training, and a young-generation collection runs at the end of every
optimizer step instead (a full one every `FULL_COLLECTION_EVERY` steps); what exists before training is frozen.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

from transformers import TrainerCallback

FULL_COLLECTION_EVERY = 100  # optimizer steps; cycles that outlived a step's young-generation collection

# Processes forked while collection is off (DataLoader workers) collect automatically again.
os.register_at_fork(after_in_child=gc.enable)


@contextmanager
def no_collection_pauses():
    """Around `trainer.train()`: automatic collection off, pre-training objects frozen; restored on any exit."""
    gc.collect()
    froze = gc.get_freeze_count() == 0  # leave a caller's own freeze alone
    if froze:
        gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if froze:
            gc.unfreeze()
        if was_enabled:
            gc.enable()


class CollectAtStepEnd(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        gc.collect(2 if state.global_step % FULL_COLLECTION_EVERY == 0 else 1)

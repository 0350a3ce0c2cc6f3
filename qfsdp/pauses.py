"""Python's garbage collector, kept from stalling the GPU during training.

Python starts a collection whenever enough objects have been allocated; a full one walks every tracked object of
the process (the model's modules and parameters, transformers, datasets...), on the thread that launches GPU work.
With FSDP2's hooks allocating Python objects per layer, that landed in the same layer of every micro-step: on an
H200 (8B shape, one GPU, `profile=true`) layer 7's `FSDP::pre_forward` took 14.6 ms of CPU time per micro-step
with no operator under it, and the GPU idled 208 ms per two optimizer steps there, the largest single cause in the
profile. As torchtitan does, automatic collection is off while training, and a young-generation collection runs
at the end of every optimizer step instead (a full one every `FULL_COLLECTION_EVERY` steps); what exists before
training is frozen (never scanned again).
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

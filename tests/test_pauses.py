"""Garbage collection during training: off between optimizer steps, done at each step's end (qfsdp/pauses.py)."""

import gc
import weakref
from types import SimpleNamespace

import torch

from qfsdp.pauses import GarbageCollection


class Cycle:
    def __init__(self):
        self.me = self
        self.tensor = torch.zeros(4)


def test_collection_runs_at_step_end_only():
    cb = GarbageCollection()
    state = SimpleNamespace(global_step=1)
    assert gc.isenabled()
    cb.on_train_begin(None, state, None)
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        garbage = weakref.ref(Cycle())
        for _ in range(10_000):  # far past the automatic threshold: nothing collects it
            [object()]
        assert garbage() is not None
        cb.on_step_end(None, state, None)
        assert garbage() is None  # the step's end collected the cycle (and its tensor)
    finally:
        cb.on_train_end(None, state, None)
    assert gc.isenabled() and gc.get_freeze_count() == 0

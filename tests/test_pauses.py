"""Garbage collection during training: off between optimizer steps, done at each step's end (qfsdp/pauses.py)."""

import gc
import os
import weakref
from types import SimpleNamespace

import pytest
import torch

from qfsdp.pauses import CollectAtStepEnd, no_collection_pauses


class Cycle:
    def __init__(self):
        self.me = self
        self.tensor = torch.zeros(4)


def test_collection_runs_at_step_end_only():
    assert gc.isenabled()
    with no_collection_pauses():
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        garbage = weakref.ref(Cycle())
        keep = [[object()] for _ in range(20_000)]  # far past the automatic threshold: nothing collects it
        assert garbage() is not None
        CollectAtStepEnd().on_step_end(None, SimpleNamespace(global_step=1), None)
        assert garbage() is None  # the step's end collected the cycle (and its tensor)
        del keep
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_an_automatic_collection_would_have_collected_it():
    """The control for the test above: with collection on, the same allocations collect the cycle."""
    garbage = weakref.ref(Cycle())
    keep = [[object()] for _ in range(20_000)]
    assert garbage() is None
    del keep


def test_restored_when_training_raises():
    with pytest.raises(RuntimeError), no_collection_pauses():
        raise RuntimeError("a failing step")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_forked_children_collect_again():
    with no_collection_pauses():
        pid = os.fork()
        if pid == 0:
            os._exit(0 if gc.isenabled() else 1)
        assert os.waitpid(pid, 0)[1] == 0

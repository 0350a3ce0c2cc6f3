"""Test-only fault injection, loaded by Python at start-up when this directory is on PYTHONPATH.

With QFSDP_TEST_FAIL_RANK=N, the training process of rank N raises once it has joined the process group, while the
other ranks go on: a failure on a non-zero rank, whose console output torchrun filters out. Used by
tests/test_report.py to check that such an error still reaches the console and the sweep summary.
"""

import os

if os.environ.get("RANK") is not None and os.environ.get("QFSDP_TEST_FAIL_RANK") == os.environ["RANK"]:
    import qfsdp.distributed as _distributed

    _init_distributed = _distributed.init_distributed

    def _failing_init_distributed():
        d = _init_distributed()
        raise RuntimeError(f"injected failure on rank {d.rank} (QFSDP_TEST_FAIL_RANK)")

    _distributed.init_distributed = _failing_init_distributed

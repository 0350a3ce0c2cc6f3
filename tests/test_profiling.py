"""`idle_gaps`: GPU idle time in a profiler trace charged to what the CPU was doing (profile=true on a GPU)."""

from qfsdp.profiling import idle_gaps


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def test_gaps_are_charged_to_the_launch_or_to_the_sync():
    events = [
        _x("kernel", "k1", 0, 10, tid=7, correlation=1),
        _x("kernel", "k2", 20, 10, tid=7, correlation=2),       # 10 us late: the CPU was busy launching it
        _x("kernel", "k3", 100, 10, tid=7, correlation=3),      # 70 us late: the CPU was waiting on `.item()`
        _x("cuda_runtime", "cudaLaunchKernel", -5, 1, correlation=1),
        _x("user_annotation", "FSDP::pre_forward", 12, 8),
        _x("cpu_op", "aten::copy_", 15, 4),
        _x("cuda_runtime", "cudaLaunchKernel", 18, 1, correlation=2),
        _x("cpu_op", "aten::item", 24, 10),
        _x("cpu_op", "aten::_local_scalar_dense", 24, 10),
        _x("cuda_runtime", "cudaStreamSynchronize", 25, 7),
        _x("cpu_op", "aten::mm", 94, 3, tid=2),                  # launched from another thread (autograd's)
        _x("cuda_runtime", "cudaLaunchKernel", 95, 1, tid=2, correlation=3),
    ]
    report = idle_gaps(events)
    lines = report.splitlines()
    assert lines[0].startswith("GPU busy 27.3% of 0.000 s")  # 30 us of 110
    assert lines[2].split() == ["0.1", "1", "sync", "aten::item", "<", "aten::_local_scalar_dense", "<",
                                "cudaStreamSynchronize"]
    assert lines[3].split() == ["0.0", "1", "launch", "[FSDP::pre_forward]", "aten::copy_"]


def test_no_gpu_activity():
    assert idle_gaps([_x("cpu_op", "aten::mm", 0, 1)]) == "(no GPU activity in the trace)"

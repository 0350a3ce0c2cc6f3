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
    assert lines[2].split() == ["0.1", "1", "sync", "aten::item", "<", "aten::_local_scalar_dense"]
    assert lines[3].split() == ["0.0", "1", "launch", "[FSDP::pre_forward]", "aten::copy_"]


def test_a_kernel_launched_before_the_gap_waited_on_the_gpu():
    events = [
        _x("kernel", "k1", 0, 10, tid=7, correlation=1),
        _x("kernel", "nccl", 50, 10, tid=9, correlation=2),   # queued at 5 us, started at 50: a stream dependency
        _x("cuda_runtime", "cudaLaunchKernel", -5, 1, correlation=1),
        _x("cpu_op", "c10d::allgather", 4, 2),
        _x("cuda_runtime", "cudaLaunchKernel", 5, 1, correlation=2),
        {"ph": "X", "cat": "kernel", "name": "no args", "pid": 1, "tid": 7, "ts": 60, "dur": 0},
        {"ph": "f", "cat": "ac2g", "name": "flow", "pid": 1, "tid": 1, "ts": 5},
    ]
    lines = idle_gaps(events).splitlines()
    assert lines[2].split() == ["0.0", "1", "wait", "c10d::allgather"]


def test_no_gpu_activity_or_a_single_instant():
    assert idle_gaps([_x("cpu_op", "aten::mm", 0, 1)]) == "(no GPU activity in the trace)"
    assert idle_gaps([_x("kernel", "k", 0, 0, correlation=1)]).startswith("GPU busy 100.0%")

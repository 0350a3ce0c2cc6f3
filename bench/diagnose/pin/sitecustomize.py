"""Diagnosis only (bench/diagnose/h200x2_scaling.sh `pin`): with QFSDP_DIAG_PIN=1 and this folder on PYTHONPATH,
each torchrun worker (LOCAL_RANK set) pins itself to its own share of the host's physical cores (their SMT siblings
included), so that ranks never share a core. Tests whether 2 GPUs lose time to the two processes disturbing each
other on the host's CPUs. Not part of qfsdp."""
import os

if os.environ.get("QFSDP_DIAG_PIN") == "1" and "LOCAL_RANK" in os.environ:
    rank, size = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores: dict = {}  # (package, core) -> its CPUs
    for cpu in sorted(os.sched_getaffinity(0)):
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            key = tuple(int(open(topo + f).read()) for f in ("physical_package_id", "core_id"))
        except OSError:
            key = (0, cpu)
        cores.setdefault(key, []).append(cpu)
    groups = [cores[k] for k in sorted(cores)]
    share = max(1, len(groups) // size)
    mine = [cpu for group in groups[rank * share:(rank + 1) * share] for cpu in group] or groups[rank % len(groups)]
    os.sched_setaffinity(0, mine)
    print(f"[pin] local rank {rank}/{size}: CPUs {mine}", flush=True)

"""Host (CPU) memory of a process: its peak resident set, and the peak of its own anonymous memory.

RSS also counts the pages of memory-mapped checkpoint files, which the page cache holds once for all processes of a
host and the kernel reclaims at will; the anonymous part (Linux `RssAnon`) is what each process holds privately.
"""

from __future__ import annotations

import resource
import socket
import threading
from pathlib import Path

GIB = 2**30


class PeakAnon:
    """Peak anonymous resident memory (Linux RssAnon) in bytes, sampled in a daemon thread until `stop`: the kernel
    keeps no peak of it. 0 where /proc is missing."""

    def __init__(self, interval_s: float = 0.02):
        self.peak, self._done = 0, threading.Event()
        if Path("/proc/self/status").is_file():
            self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
            self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            if self._done.wait(interval_s):
                return

    def stop(self) -> None:
        self._done.set()
        if hasattr(self, "_thread"):
            self._thread.join()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class LoadHostMemory:
    """This process' host memory while the model loads: started before `load_model`, stopped once the model is
    quantized and sharded (the window of summary.json's GPU `load_memory`)."""

    def __init__(self):
        self._anon = PeakAnon()

    def stop(self) -> dict:
        self._anon.stop()
        # ru_maxrss is the process' lifetime peak: read here, at the end of loading and before training, it is
        # loading's peak (or an earlier one, e.g. the data's, if that was higher).
        return {"host": socket.gethostname(), "peak_rss_gib": peak_rss_bytes() / GIB,
                "peak_anon_gib": self._anon.peak / GIB}


def node_totals(per_rank: list[dict]) -> dict[str, dict]:
    """Per host, the sum over its ranks of each rank's figures (`per_rank`: {"host", "peak_rss_gib",
    "peak_anon_gib"}). Peaks of different moments added: an upper bound of the host's peak. The RSS sum counts the
    checkpoint's mapped pages once per process, though the page cache holds them once; the anonymous sum does not."""
    nodes: dict[str, dict] = {}
    for r in per_rank:
        node = nodes.setdefault(r["host"], {"processes": 0, "peak_rss_gib": 0.0, "peak_anon_gib": 0.0})
        node["processes"] += 1
        node["peak_rss_gib"] += r["peak_rss_gib"]
        node["peak_anon_gib"] += r["peak_anon_gib"]
    return nodes


def load_line(per_rank: list[dict], host: str) -> str:
    node = node_totals(per_rank)[host]
    return (f"loading: host memory peak {node['peak_rss_gib']:.2f} GiB RSS, {node['peak_anon_gib']:.2f} GiB own "
            f"(all {node['processes']} processes of this node)")

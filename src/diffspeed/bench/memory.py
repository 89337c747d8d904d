"""Peak memory of a callable: resident set size (RSS) on the CPU, the caching allocator's peak on CUDA.

On Linux the kernel keeps the process's peak RSS (``VmHWM`` in ``/proc/self/status``) and resets it to the
current RSS when ``5`` is written to ``/proc/self/clear_refs`` (Linux >= 4.0), so the CPU peak is exact and
costs nothing while the callable runs. Where that file cannot be written (old kernels, some sandboxes) a
background thread samples ``/proc/self/statm`` every ``interval`` seconds instead; short spikes between two
samples are then missed, and ``method`` says which of the two was used. On CUDA the numbers are
``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (tensors, not the allocator's cache), with the peak
counter reset before the call.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

MB = 1 << 20  # numbers in the report are MiB
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_hwm() -> bool:
    """Set the kernel's peak-RSS counter to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _hwm_bytes()
        return True
    except (OSError, AttributeError):
        return False


class MemoryMonitor:
    """Peak RSS since the start or the last :meth:`mark`, per labelled phase; a context manager.

    ``with MemoryMonitor() as mon: encode(); mon.mark("encode"); denoise(); mon.mark("denoise")`` leaves the
    peak of each phase in ``mon.phases`` (bytes) and the overall peak in ``mon.peak``.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.phases: dict[str, int] = {}
        self.before = self.peak = self.after = 0
        self.method = ""
        self._segment = 0  # sampled peak of the current phase
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> MemoryMonitor:
        self.before = rss_bytes()
        if _reset_hwm():
            self.method = "VmHWM"
        else:
            self.method = "sampled RSS"
            self._segment = self.before
            self._thread = threading.Thread(target=self._sample, name="diffspeed-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_bytes()
            with self._lock:
                self._segment = max(self._segment, now)

    def mark(self, label: str) -> int:
        """Close the current phase under ``label`` and start the next; returns the phase's peak in bytes."""
        now = rss_bytes()
        if self.method == "VmHWM":
            peak = max(_hwm_bytes(), now)
            _reset_hwm()
        else:
            with self._lock:
                peak, self._segment = max(self._segment, now), now
        self.phases[label] = max(self.phases.get(label, 0), peak)
        self.peak = max(self.peak, peak)
        return peak

    def __exit__(self, *exc) -> None:
        self.mark("end")
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.after = rss_bytes()


def peak_memory(fn: Callable[[], Any], *, device: str | torch.device | None = None) -> dict:
    """Run ``fn()`` once and report its memory in MiB.

    ``device``: ``"cpu"`` reports RSS; ``"cuda[:N]"`` reports the CUDA allocator. ``None`` picks CUDA when it is
    already initialised in this process (initialising it here would add its own host memory) and the CPU
    otherwise. Host RSS is reported in every case (``rss_*``), since offloading trades one for the other.
    Keys: ``device``, ``method``, ``before_mb``, ``peak_mb``, ``after_mb``, ``increase_mb`` (peak - before),
    ``rss_before_mb``, ``rss_peak_mb``, ``rss_after_mb``, ``seconds`` and ``result`` (what ``fn`` returned).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with MemoryMonitor() as mon:
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = {"rss_before_mb": mon.before / MB, "rss_peak_mb": mon.peak / MB, "rss_after_mb": mon.after / MB}
    if cuda:
        before, peak, after = (cuda_before, torch.cuda.max_memory_allocated(device),
                               torch.cuda.memory_allocated(device))
        method = "max_memory_allocated"
    else:
        before, peak, after, method = mon.before, mon.peak, mon.after, mon.method
    return {"device": str(device), "method": method, "before_mb": before / MB, "peak_mb": peak / MB,
            "after_mb": after / MB, "increase_mb": (peak - before) / MB, **out, "seconds": seconds,
            "result": result}

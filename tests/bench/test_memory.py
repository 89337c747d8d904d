"""bench.memory: peak RSS per call and per phase, exact (kernel counter) or sampled."""

from __future__ import annotations

import time

import pytest
import torch

from diffspeed.bench import memory
from diffspeed.bench.memory import MB, MemoryMonitor, peak_memory, rss_bytes


def _hold(mib: int, seconds: float = 0.0) -> int:
    # 64 MiB is above glibc's largest mmap threshold (32 MiB): always freshly mapped pages, never reused heap
    x = torch.ones(mib * MB // 4)
    time.sleep(seconds)
    return int(x.sum().item())


def test_peak_memory_sees_a_temporary_allocation():
    result = peak_memory(lambda: _hold(64))
    assert result["device"] == "cpu" and result["result"] == 64 * MB // 4
    assert result["increase_mb"] > 60 and result["peak_mb"] - result["after_mb"] > 60  # freed again
    assert result["rss_peak_mb"] == result["peak_mb"] and result["seconds"] > 0


def test_monitor_keeps_a_peak_per_phase():
    with MemoryMonitor() as mon:
        _hold(64)
        mon.mark("big")
        _hold(1)
        mon.mark("small")
    assert mon.phases["big"] - mon.before > 60 * MB
    assert mon.phases["small"] - mon.before < 16 * MB  # the counter was reset at the mark
    assert mon.peak == max(mon.phases.values()) and 0 < rss_bytes()


def test_sampling_fallback_when_the_kernel_counter_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    with MemoryMonitor(interval=0.001) as mon:
        _hold(64, seconds=0.05)
        mon.mark("big")
    assert mon.method == "sampled RSS" and mon.phases["big"] - mon.before > 60 * MB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_the_allocator_peak():
    result = peak_memory(lambda: torch.ones(16 * MB // 4, device="cuda").sum().item(), device="cuda")
    assert result["method"] == "max_memory_allocated" and result["increase_mb"] >= 16

"""The hardware profile: CPU flags from /proc/cpuinfo text, the probe's cache, and injected profiles."""

import dataclasses
import json

import pytest

from diffspeed import hardware
from diffspeed.errors import DiffspeedError
from diffspeed.hardware import HardwareProfile

# trimmed from real machines: the 2-core EPYC without AVX-512, and a Sapphire Rapids with AMX
AVX2_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni
"""
AMX_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx f16c avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000 kB\n"


def test_cpuinfo_flags_and_capability():
    name, flags = hardware.parse_cpuinfo(AVX2_CPUINFO)
    assert name == "AMD EPYC 7B12" and flags == ("avx2", "f16c")
    assert hardware.cpu_capability(flags) == "AVX2"
    name, flags = hardware.parse_cpuinfo(AMX_CPUINFO)
    assert {"avx512_bf16", "amx_bf16", "avx512_fp16", "avx512_vnni"} <= set(flags)
    assert hardware.cpu_capability(flags) == "AVX512"
    assert hardware.cpu_capability(flags, (("ATEN_CPU_CAPABILITY", "AVX2"),)) == "AVX2"  # torch capped by env
    assert hardware.parse_meminfo(MEMINFO) == 16000.0


def test_detect_cpu_without_torch_reads_the_given_text(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSPEED_CACHE_DIR", str(tmp_path))
    avx2 = hardware.detect_cpu(AVX2_CPUINFO, MEMINFO, env={})
    amx = hardware.detect_cpu(AMX_CPUINFO, MEMINFO, env={})
    capped = hardware.detect_cpu(AMX_CPUINFO, MEMINFO, env={"ONEDNN_MAX_CPU_ISA": "avx2"})
    assert avx2.kind == "cpu" and avx2.capability == "AVX2" and avx2.measured is None and avx2.memory_mb == 16000
    assert not hardware.native_bf16(avx2) and hardware.native_bf16(amx)
    assert not hardware.native_bf16(capped) and capped.isa_limits == (("ONEDNN_MAX_CPU_ISA", "AVX2"),)
    assert hardware.fast_dtypes(avx2) == ("fp32",) and hardware.fast_dtypes(amx) == ("fp32", "bf16", "fp16")
    assert "no native bf16" in hardware.is_fast(avx2, "bf16")[1] and "--probe" in hardware.is_fast(avx2, "bf16")[1]
    assert len({hardware.profile_key(p) for p in (avx2, amx, capped)}) == 3


def test_measured_ratios_override_the_flags():
    amx = HardwareProfile("cpu", "x", "AVX512", ("avx512_bf16",), measured={"bf16": {"matmul": 3.0, "conv": 2.0},
                                                                               "fp16": {"matmul": 0.5, "conv": 0.5}})
    assert hardware.fast_dtypes(amx) == ("fp32", "fp16")
    fast, why = hardware.is_fast(amx, "bf16")
    assert not fast and why == "measured: bf16 matmul 3x slower than fp32, bf16 conv 2x slower than fp32"
    assert hardware.dtype_ratio(amx, "bf16") == pytest.approx(6 ** 0.5)


def test_cuda_profiles_by_capability():
    sm80 = HardwareProfile("cuda", "A100", "sm80", cuda_capability=(8, 0), sdpa_backends=("flash", "math"))
    sm75 = HardwareProfile("cuda", "T4", "sm75", cuda_capability=(7, 5))
    assert hardware.fast_dtypes(sm80) == ("fp32", "bf16", "fp16") and hardware.fast_dtypes(sm75) == ("fp32", "fp16")
    assert sm80.to_dict()["cuda_capability"] == [8, 0] and json.dumps(sm80.to_dict())
    with pytest.raises(DiffspeedError, match="hardware.kind"):
        HardwareProfile("tpu", "x", "y")


def test_probe_caches_per_machine_and_torch_version(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSPEED_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(device="cpu"):
        calls.append(device)
        return {"bf16": {"matmul": 176.0, "conv": 140.0}, "fp16": {"matmul": 30.0, "conv": 25.0}}

    monkeypatch.setattr(hardware, "measure", fake_measure)
    avx2 = hardware.detect_cpu(AVX2_CPUINFO, MEMINFO, env={})
    first = hardware.probe(avx2)
    assert calls == ["cpu"] and first.source == "probe" and first.measured["bf16"]["matmul"] == 176.0
    assert [p.name for p in tmp_path.iterdir()] == [f"probe-{hardware.profile_key(avx2)}.json"]
    second = hardware.probe(avx2)
    assert calls == ["cpu"] and second.source == "cache" and second.measured == first.measured
    assert hardware.detect_cpu(AVX2_CPUINFO, MEMINFO, env={}).measured == first.measured  # detect reads it too
    hardware.probe(dataclasses.replace(avx2, torch_version="9.9.9"))  # another torch: measured again
    hardware.probe(hardware.detect_cpu(AMX_CPUINFO, MEMINFO, env={}))  # another machine: measured again
    assert calls == ["cpu"] * 3 and len(list(tmp_path.iterdir())) == 3
    hardware.probe(avx2, refresh=True)
    assert len(calls) == 4
    assert "bf16 matmul 176x slower than fp32" in hardware.measured_text(second)


def test_a_corrupt_cache_file_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSPEED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware, "measure", lambda device="cpu": {"bf16": {"matmul": 0.5, "conv": 0.5}})
    avx2 = hardware.detect_cpu(AVX2_CPUINFO, MEMINFO, env={})
    (tmp_path / f"probe-{hardware.profile_key(avx2)}.json").write_text("{not json")
    assert hardware.probe(avx2).source == "probe"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFSPEED_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.cache_dir() == tmp_path / "diffspeed"
    monkeypatch.setenv("DIFFSPEED_CACHE_DIR", str(tmp_path / "mine"))
    assert hardware.cache_dir() == tmp_path / "mine"


def test_the_real_probe_takes_seconds_and_returns_ratios():
    import time

    t0 = time.perf_counter()
    measured = hardware.measure("cpu", repeats=2)
    assert time.perf_counter() - t0 < 30
    assert set(measured) == {"bf16", "fp16"} and all(set(v) == {"matmul", "conv"} for v in measured.values())
    assert all(r > 0 for v in measured.values() for r in v.values())

"""What the device computes fast: a hardware profile, and a short measured probe cached per machine.

Flags are not enough: a CPU without AVX-512 BF16 or AMX runs bf16 matmuls emulated, 30-180x slower than fp32
(issue 14: 2553 ms against 14.5 ms for a 1024x1024 matmul on a 2-core AVX2 EPYC), and oneDNN can be capped
below the CPU's flags (``ONEDNN_MAX_CPU_ISA``). So :func:`probe` times a 256x256 matmul and a small conv in
fp32, bf16 and fp16 (seconds in all) and caches the ratios as JSON under :func:`cache_dir`, keyed by the
machine (CPU model, flags, cores, ISA caps) and the torch version.

The CPU part of :func:`detect` reads ``/proc/cpuinfo`` and ``/proc/meminfo`` and never imports torch, so
``diffspeed presets`` stays cheap; the probe and the CUDA part import torch when called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

from diffspeed._io import write_text_beside
from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError

torch = lazy_import("torch")

# the CPU flags that decide half-precision speed: native bf16 (AVX-512 BF16, AMX), fp16 (AVX-512 FP16, AMX-FP16),
# int8 dot products (VNNI), and the vector width below them
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16", "avx512_vnni",
             "avx_vnni", "f16c")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which bf16 runs natively
_ONEDNN_BF16 = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")
PROBE_VERSION = 1  # bump when the probe's workload changes: old cache entries are then ignored


class SlowDtypeWarning(UserWarning):
    """Half-precision compute asked for where it is slower than fp32 on this device."""


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """One device's relevant abilities; tests build them by hand for hardware they do not have."""

    kind: str  # "cpu" or "cuda"
    name: str  # CPU model name or GPU name
    capability: str  # CPU: the ISA level torch dispatches to (DEFAULT, AVX2, AVX512); CUDA: "sm80" etc.
    flags: tuple[str, ...] = ()  # the CPU_FLAGS present (CPU only)
    cores: int | None = None  # logical CPU cores (CPU) or streaming multiprocessors (CUDA)
    memory_mb: float | None = None  # RAM (CPU) or GPU memory, MiB
    cuda_capability: tuple[int, int] | None = None
    sdpa_backends: tuple[str, ...] = ()  # CUDA scaled-dot-product attention kernels usable here
    isa_limits: tuple[tuple[str, str], ...] = ()  # env caps in force: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA
    torch_version: str | None = None
    # time of each op in a half dtype divided by fp32's, e.g. {"bf16": {"matmul": 176.0, "conv": 140.0}};
    # None until probed
    measured: dict | None = None
    source: str = "detected"  # "detected" (flags), "probe" (measured now), "cache" (measured before), "injected"

    def __post_init__(self):
        if self.kind not in ("cpu", "cuda"):
            raise DiffspeedError(f"hardware.kind must be cpu or cuda, got {self.kind!r}", field="hardware.kind")

    def to_dict(self) -> dict:
        """Plain JSON for reports (results.json's ``hardware``)."""
        out = dataclasses.asdict(self)
        out["cuda_capability"] = list(self.cuda_capability) if self.cuda_capability else None
        out["flags"], out["sdpa_backends"] = list(self.flags), list(self.sdpa_backends)
        out["isa_limits"] = dict(self.isa_limits)
        return out

    def summary(self) -> str:
        """One line: what the machine is and what it computes fast."""
        if self.kind == "cuda":
            what = f"CUDA {self.name}, {self.capability}, {_mb(self.memory_mb)}, SDPA {', '.join(self.sdpa_backends)}"
        else:
            caps = "".join(f", {k}={v}" for k, v in self.isa_limits)
            what = (f"CPU {self.name}, {self.capability}{caps}, flags {' '.join(self.flags) or 'none'}, "
                    f"{self.cores} cores, {_mb(self.memory_mb)}")
        return f"{what}, torch {self.torch_version or 'not installed'}; {measured_text(self)}"


def _mb(value: float | None) -> str:
    return "memory unknown" if value is None else f"{value / 1024:.1f} GiB"


# ------------------------------------------------------------------------------------------------- CPU, no torch
def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(model name, the relevant flags present) from ``/proc/cpuinfo`` text; the first CPU speaks for all."""
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 calls them flags, ARM Features
            flags = set(value.split())
    return name, tuple(f for f in CPU_FLAGS if f in flags)


def parse_meminfo(text: str) -> float | None:
    """MemTotal in MiB from ``/proc/meminfo`` text."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # not Linux, or a sandbox without /proc
        return ""


def isa_limits(env=None) -> tuple[tuple[str, str], ...]:
    """The environment caps that change what torch dispatches to (set to emulate an older CPU)."""
    env = os.environ if env is None else env
    return tuple((k, env[k].upper()) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if env.get(k))


def cpu_capability(flags, limits=()) -> str:
    """torch's ISA level as ``torch.backends.cpu.get_cpu_capability()`` names it, from the flags and caps."""
    levels = ["DEFAULT"] + (["AVX2"] if "avx2" in flags else []) + (["AVX512"] if "avx512f" in flags else [])
    cap = dict(limits).get("ATEN_CPU_CAPABILITY")
    if cap in levels:
        return cap
    return levels[-1]


def detect_cpu(cpuinfo: str | None = None, meminfo: str | None = None, env=None) -> HardwareProfile:
    """This machine's CPU profile, without torch (the cached probe attached if there is one)."""
    name, flags = parse_cpuinfo(_read("/proc/cpuinfo") if cpuinfo is None else cpuinfo)
    limits = isa_limits(env)
    profile = HardwareProfile("cpu", name or platform.processor() or platform.machine(),
                              cpu_capability(flags, limits), flags, os.cpu_count(),
                              parse_meminfo(_read("/proc/meminfo") if meminfo is None else meminfo),
                              isa_limits=limits, torch_version=torch_version())
    return with_cached_probe(profile)


def torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------- CUDA
def detect_cuda(device: str = "cuda") -> HardwareProfile:
    if not torch.cuda.is_available():
        raise DiffspeedError(f"device: {device!r} asked for, but torch sees no CUDA device", field="device")
    props = torch.cuda.get_device_properties(torch.device(device))
    cc = (props.major, props.minor)
    profile = HardwareProfile("cuda", props.name, f"sm{cc[0]}{cc[1]}", cores=props.multi_processor_count,
                              memory_mb=props.total_memory / (1 << 20), cuda_capability=cc,
                              sdpa_backends=_sdpa_backends(cc), torch_version=torch_version())
    return with_cached_probe(profile)


def _sdpa_backends(cc: tuple[int, int]) -> tuple[str, ...]:
    """The SDPA kernels enabled in torch and supported by the capability (flash: sm80+, cuDNN: sm90+)."""
    b = torch.backends.cuda
    found = [("flash", b.flash_sdp_enabled() and cc >= (8, 0)),
             ("efficient", b.mem_efficient_sdp_enabled() and cc >= (5, 0)),
             ("cudnn", getattr(b, "cudnn_sdp_enabled", lambda: False)() and cc >= (9, 0)),
             ("math", b.math_sdp_enabled())]
    return tuple(n for n, ok in found if ok)


def detect(device: str = "cpu") -> HardwareProfile:
    """The profile of ``device`` (``cpu``, ``cuda``, ``cuda:N``), with the cached probe when there is one."""
    return detect_cuda(str(device)) if str(device).startswith("cuda") else detect_cpu()


# ------------------------------------------------------------------------------------------------- probe
def cache_dir() -> Path:
    """``$DIFFSPEED_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffspeed``, else ``~/.cache/diffspeed``."""
    if os.environ.get("DIFFSPEED_CACHE_DIR"):
        return Path(os.environ["DIFFSPEED_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffspeed"


def profile_key(profile: HardwareProfile) -> str:
    """Names the probe's cache file: machine (model, flags, cores, caps, GPU capability) + torch version."""
    machine = [profile.kind, profile.name, profile.flags, profile.cores, profile.isa_limits, profile.capability]
    digest = hashlib.sha256(json.dumps([machine, profile.torch_version, PROBE_VERSION]).encode()).hexdigest()
    return f"{profile.kind}-{digest[:16]}"


def _cache_file(profile: HardwareProfile) -> Path:
    return cache_dir() / f"probe-{profile_key(profile)}.json"


def with_cached_probe(profile: HardwareProfile) -> HardwareProfile:
    """``profile`` with the ratios measured before on this machine and torch version, if any."""
    try:
        data = json.loads(_cache_file(profile).read_text())
    except (OSError, ValueError):
        return profile
    if data.get("key") != profile_key(profile) or not isinstance(data.get("measured"), dict):
        return profile
    return dataclasses.replace(profile, measured=data["measured"], source="cache")


def probe(profile: HardwareProfile | None = None, *, device: str = "cpu", refresh: bool = False) -> HardwareProfile:
    """``profile`` (default: :func:`detect`) with measured half/fp32 time ratios: from the cache, or timed now
    (a few seconds) and cached. ``refresh`` measures again."""
    profile = detect(device) if profile is None else profile
    if profile.measured is not None and not refresh:
        return profile
    if not refresh:
        cached = with_cached_probe(profile)
        if cached.measured is not None:
            return cached
    measured = measure(device if profile.kind == "cuda" else "cpu")
    path = _cache_file(profile)
    try:  # two processes probing at once each write a whole file
        write_text_beside(path, json.dumps({"key": profile_key(profile), "profile": profile.name,
                                            "torch": profile.torch_version, "measured": measured}, indent=2) + "\n",
                          field="cache")
    except DiffspeedRuntimeError:
        pass  # a read-only home still gets its answer, measured again next time
    return dataclasses.replace(profile, measured=measured, source="probe")


def measure(device: str = "cpu", repeats: int = 5) -> dict:
    """Median time of a 256x256 matmul and a 64-channel 3x3 conv in bf16 and fp16, divided by fp32's."""
    dev = torch.device(device)
    times = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(256, 256, generator=gen).to(dev, dtype) for _ in range(2))
        x = torch.randn(1, 64, 32, 32, generator=gen).to(dev, dtype)
        w = torch.randn(64, 64, 3, 3, generator=gen).to(dev, dtype)
        times[name] = {"matmul": _median_time(lambda a=a, b=b: a @ b, dev, repeats),
                       "conv": _median_time(lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1), dev,
                                            repeats)}
    return {d: {op: times[d][op] / times["fp32"][op] for op in ("matmul", "conv")} for d in ("bf16", "fp16")}


def _median_time(fn, dev, repeats: int) -> float:
    cuda = dev.type == "cuda"
    fn()  # first call: kernel selection, allocation
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        samples.append(time.perf_counter() - t0)
    return max(statistics.median(samples), 1e-9)


# ------------------------------------------------------------------------------------------------- verdicts
def dtype_ratio(profile: HardwareProfile, dtype: str) -> float | None:
    """Measured time of ``dtype`` compute over fp32's (geometric mean of matmul and conv); None if not probed."""
    ops = (profile.measured or {}).get(dtype)
    if not ops:
        return None
    return math.exp(statistics.fmean(math.log(max(v, 1e-9)) for v in ops.values()))


def native_bf16(profile: HardwareProfile) -> bool:
    """What the flags say, before any measurement: bf16 matmuls in hardware and nothing capping them."""
    if profile.kind == "cuda":
        return profile.cuda_capability is not None and profile.cuda_capability >= (8, 0)
    limits = dict(profile.isa_limits)
    return (("avx512_bf16" in profile.flags or "amx_bf16" in profile.flags) and profile.capability == "AVX512"
            and limits.get("ONEDNN_MAX_CPU_ISA", "ALL") in _ONEDNN_BF16)


def _native(profile: HardwareProfile, dtype: str) -> bool:
    if dtype == "bf16":
        return native_bf16(profile)
    if profile.kind == "cuda":  # tensor cores from Volta on
        return profile.cuda_capability is not None and profile.cuda_capability >= (7, 0)
    return ("avx512_fp16" in profile.flags or "amx_fp16" in profile.flags) and profile.capability == "AVX512"


def is_fast(profile: HardwareProfile, dtype: str) -> tuple[bool, str]:
    """Whether ``dtype`` compute is faster than fp32 here, and the evidence: the probe if run, else the flags."""
    if dtype == "fp32":
        return True, "fp32 is the reference"
    ratio = dtype_ratio(profile, dtype)
    if ratio is not None:
        return ratio < 1.0, f"measured: {measured_dtype_text(profile, dtype)}"
    native = _native(profile, dtype)
    return native, f"resolved from {'GPU capability' if profile.kind == 'cuda' else 'CPU flags'}: " + (
        f"native {dtype}" if native else f"no native {dtype}") + (
        "; run `diffspeed presets --probe` to measure" if profile.kind == "cpu" else "")


def fast_dtypes(profile: HardwareProfile) -> tuple[str, ...]:
    """The compute dtypes at least as fast as fp32 here, fp32 first."""
    return ("fp32",) + tuple(d for d in ("bf16", "fp16") if is_fast(profile, d)[0])


def _times(r: float) -> str:
    return f"{r:.3g}x slower than" if r >= 1 else f"{1 / r:.3g}x faster than"


def measured_dtype_text(profile: HardwareProfile, dtype: str) -> str:
    ops = profile.measured[dtype]
    return ", ".join(f"{dtype} {op} {_times(r)} fp32" for op, r in ops.items())


def measured_text(profile: HardwareProfile) -> str:
    if not profile.measured:
        return "not probed (run `diffspeed presets --probe` to measure)"
    return f"measured ({profile.source}): " + "; ".join(measured_dtype_text(profile, d) for d in profile.measured)

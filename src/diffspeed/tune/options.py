"""What ``diffspeed tune`` was asked: one validated, pure-data record, checked before anything loads (no torch).

Every problem is one :class:`~diffspeed.errors.DiffspeedError` naming the field (``min_ssim``, ``max_memory``,
``include`` ...), the value and what is allowed; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from diffspeed.errors import DiffspeedError, check_range, check_side

STRATEGIES = ("model", "random")
_UNITS_MB = {"": 1024.0, "b": 1 / (1 << 20), "k": 1 / 1024, "kb": 1 / 1024, "kib": 1 / 1024, "m": 1.0, "mb": 1.0,
             "mib": 1.0, "g": 1024.0, "gb": 1024.0, "gib": 1024.0, "t": 1 << 20, "tb": 1 << 20, "tib": 1 << 20}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|min|s|sec)?", re.IGNORECASE)
MAX_BUDGET_S = 7 * 24 * 3600.0


def parse_memory(text, field: str = "max_memory") -> float | None:
    """``6GB`` / ``6144MB`` / ``5.5GiB`` / ``6`` (GB) -> MiB. GB and GiB both mean 1024 MiB, as GPU memory is
    quoted; None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        mb = float(text)
    else:
        m = _SIZE.fullmatch(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS_MB:
            raise DiffspeedError(f"{field}: {text!r} is not a memory size; give e.g. 6GB, 6144MB or 5.5GiB "
                                 f"(a bare number is GB)", field=field)
        mb = float(m.group(1)) * _UNITS_MB[unit]
    if not 1.0 <= mb <= 1 << 24:
        raise DiffspeedError(f"{field}: {text!r} is outside 1 MB .. 16 TB", field=field)
    return mb


def parse_duration(text, field: str = "time_budget") -> float:
    """``10m`` / ``90s`` / ``1h30m`` / ``600`` (seconds) -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip()
        parts = _DURATION.findall(raw)
        if not raw or _DURATION.sub("", raw).strip() or not parts:
            raise DiffspeedError(f"{field}: {text!r} is not a duration; give e.g. 10m, 90s, 1h30m or seconds",
                                 field=field)
        scale = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "sec": 1.0, "": 1.0}
        seconds = sum(float(v) * scale[u.lower()] for v, u in parts)
    if not 1.0 <= seconds <= MAX_BUDGET_S:
        raise DiffspeedError(f"{field}: {text!r} must be between 1 s and 7 days", field=field)
    return seconds


def parse_size(text, field: str = "size") -> tuple[int, int] | None:
    """``512`` or ``768x512`` (width x height) -> (width, height); multiples of 8 in 64..2048."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        w = h = text
    elif isinstance(text, (tuple, list)) and len(text) == 2:
        w, h = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
        if m is None:
            raise DiffspeedError(f"{field}: {text!r} is not a size; give WIDTHxHEIGHT (e.g. 768x512) or one edge",
                                 field=field)
        w, h = int(m.group(1)), int(m.group(2) or m.group(1))
    check_side(field, w)
    check_side(field, h)
    return int(w), int(h)


def parse_names(values, field: str) -> tuple[str, ...]:
    """Optimization names from repeated and/or comma-separated values, each checked against the registry."""
    from diffspeed.core.optimization import all_optimizations  # registers them; no torch

    if isinstance(values, str):
        values = [values]
    names = [n.strip() for v in values or () for n in str(v).split(",") if n.strip()]
    known = all_optimizations()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DiffspeedError(f"{field}: unknown optimization {unknown[0]!r}; known: {', '.join(sorted(known))}",
                             field=field)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, kw_only=True)
class TuneOptions:
    """A tune run's settings. ``workload()`` is the part that decides what a measurement means (a resumed run
    reuses a log only when it matches); the rest steers the search."""

    model: str = "tiny-sd"
    size: tuple[int, int] | None = None  # (width, height); None: the model's native size (random: 256)
    steps: int = 20
    sampler: str | None = "DPM++ 2M"
    cfg: float | None = None  # None: the model card's scale (tiny-sd 3), else 7
    max_memory_mb: float | None = None  # peak RSS on the CPU, max allocated on CUDA
    min_ssim: float | None = None
    min_psnr: float | None = None
    min_adherence: float | None = None  # mean of the colour check's background and shape accuracy, 0..1
    time_budget_s: float = 1800.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    out: str | None = None
    seed: int = 0
    runs: int = 3  # timed passes of a full measurement (screening: one pass over one prompt)
    batch: int = 4  # candidates per bench run (each run measures its own baseline too)
    promote: int = 4  # screened candidates measured in full
    presets: bool = True
    strategy: str = "model"
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    timeout_s: float = 1800.0

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise DiffspeedError("model: give a shipped name, a folder, a .safetensors file or random:sd15",
                                 field="model")
        object.__setattr__(self, "size", parse_size(self.size))
        check_range("steps", self.steps, 1, 1000)
        if self.sampler is not None:
            from diffspeed.pipelines.samplers import get_sampler

            get_sampler(self.sampler)
        if self.cfg is not None:
            check_range("cfg_scale", self.cfg, 0.0, 50.0, kind=float)
        object.__setattr__(self, "max_memory_mb", parse_memory(self.max_memory_mb))
        for name, hi in (("min_ssim", 1.0), ("min_psnr", 100.0), ("min_adherence", 1.0)):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 0.0, hi, kind=float)
        object.__setattr__(self, "time_budget_s", parse_duration(self.time_budget_s))
        include, exclude = parse_names(self.include, "include"), parse_names(self.exclude, "exclude")
        both = sorted(set(include) & set(exclude))
        if both:
            raise DiffspeedError(f"exclude: {both[0]!r} is also in include; name it in one of them", field="exclude")
        object.__setattr__(self, "include", include)
        object.__setattr__(self, "exclude", exclude)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_range("runs", self.runs, 1, 100)
        check_range("batch", self.batch, 1, 64)
        check_range("promote", self.promote, 0, 64)
        if self.strategy not in STRATEGIES:
            raise DiffspeedError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}",
                                 field="strategy")
        if self.device is not None:
            from diffspeed.pipelines.load import check_device

            check_device(self.device)
        if self.dtype is not None and self.dtype not in ("fp32", "fp16", "bf16"):
            raise DiffspeedError(f"dtype must be fp32, fp16 or bf16, got {self.dtype!r}", field="dtype")
        if self.threads is not None:
            check_range("threads", self.threads, 1, 1024)
        check_range("timeout", self.timeout_s, 1.0, MAX_BUDGET_S, kind=float)
        if self.min_adherence is not None and not self.model.startswith("tiny-"):
            raise DiffspeedError(f"min_adherence: prompt adherence is the colour check of the shipped tiny models' "
                                 f"captions; {self.model} has none (use --min-ssim or --min-psnr)",
                                 field="min_adherence")

    @property
    def random_weights(self) -> bool:
        return self.model.startswith("random:")

    @property
    def floors(self) -> dict:
        return {k: v for k, v in (("ssim", self.min_ssim), ("psnr_db", self.min_psnr),
                                  ("adherence", self.min_adherence)) if v is not None}

    def out_dir(self) -> str:
        return self.out or f"tune-results/{self.model.replace(':', '-').replace('/', '_')}"

    def workload(self) -> dict:
        """What a measurement depends on: a log written under other values is not reused."""
        keys = ("model", "size", "steps", "sampler", "cfg", "runs", "device", "dtype", "threads")
        data = {k: v for k, v in asdict(self).items() if k in keys}
        data["size"] = list(self.size) if self.size else None
        return data

    def to_dict(self) -> dict:
        data = asdict(self)
        data["size"] = list(self.size) if self.size else None
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data

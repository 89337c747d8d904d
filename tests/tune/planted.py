"""A planted world for the tuner's tests: speed, memory and SSIM computed from a candidate's settings, with noise
drawn from the seed (more at the screening level), and a fake clock that each measurement advances by what it
would cost (process overhead + images x seconds per image). Nothing is run."""

from __future__ import annotations

import hashlib
import math
import random

from diffspeed.hardware import HardwareProfile

BASE_SECONDS, BASE_MB, OVERHEAD_S = 1.0, 1000.0, 5.0
SIGMA = {"screen": 0.08, "full": 0.02}  # log-normal timing noise per level
# CPU with native bf16 (injected, so the space is the same on every machine)
PROFILE = HardwareProfile(kind="cpu", name="planted", capability="AVX512", flags=("avx512f", "avx512_bf16"),
                          cores=2, memory_mb=8192, torch_version="test", source="injected")


def effect(table: dict) -> tuple[float, float, float]:
    """(time factor, memory factor, SSIM loss) of one recipe table. The numbers are chosen so that one recipe is
    clearly best under the tests' goal (bf16 + channels_last + DeepCache interval 4: 3.37x at SSIM 0.915, the
    runner-up 5 % slower)."""
    name, get = table["name"], table.get
    if name == "precision":
        return (1.15, 0.7, 0.002) if get("compute") == "fp32" else (0.75, 0.7, 0.01)
    if name == "quantize":
        return (1.1, 0.75, 0.01) if get("method", "fp8") == "fp8" else (1.3, 0.8, 0.015)
    if name == "deepcache":
        k = get("interval", 3)
        return 1 / (1 + 0.45 * (k - 1)), 1.02, 0.025 * (k - 1)
    if name == "cfg_cutoff":
        return {0.5: (0.75, 1.0, 0.045), 0.7: (0.85, 1.0, 0.027)}.get(get("fraction", 0.5), (0.95, 1.0, 0.009))
    if name == "tgate":
        return (0.85, 1.0, 0.035) if get("gate_fraction", 0.4) <= 0.4 else (0.9, 1.0, 0.022)
    if name == "tome":
        return (0.97, 1.0, 0.012) if get("ratio", 0.5) <= 0.3 else (0.93, 1.0, 0.03)
    if name == "hypertile":
        return (0.92, 1.0, 0.035) if get("tile_size", 256) <= 16 else (0.97, 1.0, 0.012)
    return {"attention": (1.1, 0.95, 0.0), "channels_last": (0.93, 1.0, 0.0), "vae_tiling": (1.1, 0.85, 0.0),
            "tiny_vae": (0.9, 0.97, 0.04), "staged": (1.2, 0.75, 0.0)}.get(name, (1.0, 1.0, 0.0))


def truth(tables) -> dict:
    """The noise-free speed ratio, peak MB and SSIM of a recipe."""
    t, m, loss = BASE_SECONDS, BASE_MB, 0.0
    names = {tb["name"] for tb in tables}
    for tb in tables:
        dt, dm, dl = effect(tb)
        if tb["name"] == "tgate" and "deepcache" in names:  # an interaction: cached calls gain less from T-GATE
            dt = math.sqrt(dt)
        t, m, loss = t * dt, m * dm, loss + dl
    return {"speed": BASE_SECONDS / t, "seconds_per_image": t, "memory_mb": m, "ssim": max(0.0, 1 - loss)}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class PlantedMeasure:
    """``measure(candidates, level)``: the planted truth with seeded noise; advances ``clock``; counts calls and
    remembers every (key, level) it measured. ``fail_after``: raise KeyboardInterrupt on that call (a kill)."""

    batch_baseline = False

    def __init__(self, seed: int = 0, clock: Clock | None = None, fail_after: int | None = None):
        self.seed, self.clock, self.fail_after = seed, clock or Clock(), fail_after
        self.calls = 0
        self.measured: list[tuple[str, str]] = []

    def noise(self, key: str, level: str) -> float:
        digest = hashlib.sha256(f"{self.seed}|{key}|{level}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big")).gauss(0.0, SIGMA[level])

    def __call__(self, candidates, level):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        out = []
        for c in candidates:
            true = truth(c.tables)
            eps = 0.0 if c.key == "[]" else self.noise(c.key, level.name)  # the baseline is 1.0x of itself
            spi = true["seconds_per_image"] * math.exp(eps)
            out.append({"status": "ok", "error": None, "speed": BASE_SECONDS / spi, "seconds_per_image": spi,
                        "memory_mb": true["memory_mb"], "memory_ratio": true["memory_mb"] / BASE_MB,
                        "ssim": min(1.0, true["ssim"] + eps / 10), "psnr_db": None,
                        "adherence": None, "overhead_s": OVERHEAD_S, "images": level.images})
            self.clock.now += OVERHEAD_S + level.images * true["seconds_per_image"]
            self.measured.append((c.key, level.name))
        return out


def optimum(space, max_memory_mb: float, min_ssim: float):
    """The best valid grid point by the noise-free truth (brute force) and its speed."""
    best = (0.0, None)
    for idx in space.enumerate():
        cand = space.of_indices(idx)
        t = truth(cand.tables)
        if t["memory_mb"] <= max_memory_mb and t["ssim"] >= min_ssim and t["speed"] > best[0]:
            best = (t["speed"], cand.key)
    return best


GOAL = {"max_memory": "800MB", "min_ssim": 0.9}


def run(seed: int = 0, out=None, measure: PlantedMeasure | None = None, **settings):
    """``diffspeed.tune`` on the planted world (tiny-sd's space, the injected profile, the fake clock)."""
    from diffspeed.tune.run import tune

    measure = measure or PlantedMeasure(seed)
    settings = {"time_budget": 600, **GOAL, **settings}
    result = tune("tiny-sd", measure=measure, clock=measure.clock, profile=PROFILE, progress=False,
                  write=out is not None, out=str(out) if out is not None else None, seed=seed, **settings)
    return result, measure


def regret(result, best_speed: float, max_memory_mb: float = 800, min_ssim: float = 0.9) -> float:
    """log(optimum / chosen) by the noise-free truth; log(optimum) when nothing (truly) feasible was chosen."""
    if result.choice is None:
        return math.log(best_speed)
    t = truth(result.choice.tables)
    if t["memory_mb"] > max_memory_mb or t["ssim"] < min_ssim:
        return math.log(best_speed)
    return math.log(best_speed / t["speed"])

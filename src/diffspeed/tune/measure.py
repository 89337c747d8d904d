"""The real ``measure``: a batch of candidates is one ``diffspeed bench`` run (each entry in a fresh process, the
same prompts and seeds as the baseline, which every run measures first), at the level's prompts and passes.

A screening run times one pass over the queue's first prompt; a full run every prompt ``runs`` times. Speed and
memory ratios are to that run's own baseline, so a machine that drifts between runs shifts both alike. On random
weights the bench computes no fidelity (the images are noise): only speed and memory count there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffspeed.errors import DiffspeedRuntimeError
from diffspeed.tune.search import Level
from diffspeed.tune.space import BASELINE, Candidate

STARTUP_S = 3.0  # a worker process's interpreter start and imports, which the worker does not time itself


class BenchMeasure:
    """``measure(candidates, level) -> list[dict]`` over :func:`diffspeed.bench.runner.bench`."""

    batch_baseline = True  # every bench run measures the baseline too: the search counts its cost

    def __init__(self, options, out: Path, queue=None, progress: bool = False):
        from diffspeed.bench.queue import default_queue

        self.options = options
        self.out = Path(out)
        self.queue = tuple(queue or default_queue(options.model))
        self.progress = progress

    def entries(self, candidates: list[Candidate]):
        """The bench entries of ``candidates`` (the baseline is the bench's own first entry, not one of these)."""
        from diffspeed.bench.runner import Entry
        from diffspeed.core import Recipe

        out = []
        for c in candidates:
            if c.key == BASELINE.key:
                continue
            recipe = Recipe.from_dict(c.recipe_dict(name=c.label), source=f"tune candidate {c.label}")
            out.append(Entry.of_recipe(recipe, name=c.label, source=f"tune {c.source}"))
        return out

    def folder(self, candidates: list[Candidate], level: Level) -> Path:
        digest = hashlib.sha1("".join(c.key for c in candidates).encode()).hexdigest()[:10]
        return self.out / "bench" / f"{level.name}-{digest}"

    def bench_kwargs(self, level: Level) -> dict:
        o = self.options
        return {"presets": (), "peers": False, "queue": self.queue, "prompts": level.prompts, "steps": o.steps,
                "size": o.size, "sampler": o.sampler, "cfg": o.cfg, "runs": level.runs, "warmup": level.warmup,
                "device": o.device, "dtype": o.dtype, "timeout": o.timeout_s, "threads": o.threads,
                "progress": self.progress, "noise_check": False, "command": "diffspeed tune"}

    def __call__(self, candidates: list[Candidate], level: Level) -> list[dict]:
        from diffspeed.bench.runner import bench

        entries = self.entries(candidates)
        data = bench(self.options.model, entries=entries, out=self.folder(candidates, level),
                     **self.bench_kwargs(level))
        rows = data["entries"]
        base = rows[0]
        if base["status"] != "ok":
            raise DiffspeedRuntimeError(f"tune: the baseline failed, so nothing can be compared: {base['error']}",
                                        field="model")
        by_entry = iter(rows[1:])
        return [row_result(base if c.key == BASELINE.key else next(by_entry), data.get("fidelity_note") is None)
                for c in candidates]


def row_result(row: dict, fidelity: bool = True) -> dict:
    """One bench row as the search's measurement (see :mod:`diffspeed.tune.search`)."""
    if row["status"] != "ok" or not row.get("ratios"):
        return {"status": row["status"] if row["status"] != "ok" else "failed", "error": row.get("error")}
    f, a, t = row.get("fidelity") or {}, row.get("adherence"), row["timing"]
    idle = sorted(k.split(":", 1)[1] for k, v in (row.get("stats") or {}).items() if k.startswith("no_effect:") and v)
    return {"status": "ok", "error": None, "speed": row["ratios"]["speed"], "seconds_per_image": t["median_s"],
            "memory_mb": row["memory"]["peak_mb"], "memory_ratio": row["ratios"]["memory"],
            "ssim": f.get("ssim") if fidelity else None, "psnr_db": f.get("psnr_db") if fidelity else None,
            "adherence": (a["background"] + a["shape"]) / 2 if a else None,
            "overhead_s": STARTUP_S + sum(row.get(k) or 0.0 for k in ("load_s", "setup_s", "first_call_s")),
            "images": t["n"], "no_effect": idle}

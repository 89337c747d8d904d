"""``diffspeed.tune(...)``: options -> space -> search -> the front, the choice, the files.

See :mod:`diffspeed.tune.space` (what is searched and what is pruned), :mod:`diffspeed.tune.search` (the strategy,
the budget, the resume log) and :mod:`diffspeed.tune.measure` (the bench runs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffspeed.tune.options import TuneOptions
from diffspeed.tune.search import Goal, Ledger, Level, Search, Trial
from diffspeed.tune.space import BASELINE, Candidate, Context, build_space, candidate_from_tables

AXES = ("ssim", "psnr_db", "adherence")


@dataclass(frozen=True)
class TuneResult:
    """What a tune run found, as pure data (``to_dict()`` is what ``results.json`` holds).

    ``choice``: the fastest measurement that meets the goal, at ``level`` (``full`` unless the budget ended before
    two full measurements), or None -- then ``closest`` is the one nearest to meeting it and ``message`` says so.
    ``front``: the measurements at ``level`` within the memory budget that no other beats on both speed and
    fidelity (``axis``; on random weights: speed and memory).
    """

    choice: Trial | None
    front: tuple[Trial, ...]
    baseline: Trial | None
    presets: tuple[Trial, ...]
    trials: tuple[Trial, ...]
    closest: Trial | None
    message: str
    stopped: str
    spent_s: float
    level: str
    axis: str
    measured: int
    replayed: int
    notes: tuple[str, ...] = ()
    pruned: tuple[dict, ...] = ()
    space: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    hardware_summary: str = ""
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        def t(x):
            return x.to_dict() if x is not None else None

        return {"schema": "diffspeed.tune/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "message": self.message, "choice": t(self.choice), "front": [t(x) for x in self.front],
                "baseline": t(self.baseline), "presets": [t(x) for x in self.presets],
                "closest": t(self.closest), "trials": [t(x) for x in self.trials], "stopped": self.stopped,
                "spent_s": self.spent_s, "level": self.level, "axis": self.axis, "measured": self.measured,
                "replayed": self.replayed, "notes": list(self.notes), "pruned": list(self.pruned),
                "space": self.space, "settings": self.settings, "hardware_summary": self.hardware_summary,
                "files": dict(self.files)}


def tune(model: str = "tiny-sd", *, options: TuneOptions | None = None, measure: Callable | None = None,
         clock: Callable[[], float] | None = None, profile=None, progress: bool = True, write: bool = True,
         **settings) -> TuneResult:
    """Search the registry's optimizations for the fastest recipe on ``model`` that fits the memory budget and
    the fidelity floor; write ``tuned.toml``, ``results.json``, ``report.md`` / ``report.html`` under ``out``.

    ``settings``: the fields of :class:`~diffspeed.tune.options.TuneOptions` (``size``, ``steps``, ``sampler``,
    ``max_memory`` ("6GB"), ``min_ssim`` / ``min_psnr`` / ``min_adherence``, ``time_budget`` ("10m"),
    ``include`` / ``exclude``, ``out``, ``seed``, ``runs``, ``batch``, ``promote``, ``presets``, ``strategy``,
    ``device``, ``dtype``, ``threads``, ``timeout``), or ``options`` made already (the CLI's). ``measure``
    replaces the bench runs (tests plant costs), ``clock`` the time source, ``profile`` the hardware profile;
    ``write`` False keeps everything in memory (no log, no files).
    """
    renames = {"max_memory": "max_memory_mb", "time_budget": "time_budget_s", "timeout": "timeout_s"}
    fields = {f.name for f in dataclasses.fields(TuneOptions)}
    unknown = sorted(k for k in settings if renames.get(k, k) not in fields)
    if unknown:
        from diffspeed.errors import DiffspeedError

        raise DiffspeedError(f"tune: unknown setting {unknown[0]!r}; settings: {', '.join(sorted(fields))}",
                             field=unknown[0])
    options = options or TuneOptions(model=model, **{renames.get(k, k): v for k, v in settings.items()})
    device = options.device or "cpu"
    if measure is None:
        from diffspeed.pipelines.load import resolve_device

        device = str(resolve_device(options.device))
    if profile is None:
        from diffspeed import hardware

        profile = hardware.probe(device=device) if measure is None else hardware.detect(device)
    out = Path(options.out_dir())
    setup = prepare(options, profile, device)
    if measure is None:
        from diffspeed.tune.measure import BenchMeasure

        measure = BenchMeasure(options, out, progress=False)
    goal = Goal(options.max_memory_mb, options.floors, fidelity=not options.random_weights)
    bar = _progress(options.time_budget_s) if progress else None
    search = Search(setup["space"], measure, goal, screen=setup["screen"], full=setup["full"],
                    budget_s=options.time_budget_s, clock=clock or time.monotonic, seed=options.seed,
                    ledger=Ledger(out / "measurements.jsonl" if write else None, options.workload()),
                    seeds=setup["seeds"], batch=options.batch, promote=options.promote, strategy=options.strategy,
                    memory_prior=setup["estimate"], progress=bar)
    try:
        outcome = search.run()
    except KeyboardInterrupt:
        if write:  # what was measured is reported; the log lets the next run continue
            finish(options, search.outcome(), goal, setup, profile, out, stopped="interrupted")
        raise
    return finish(options, outcome, goal, setup, profile, out) if write else \
        summarise(options, outcome, goal, setup, profile)


def prepare(options: TuneOptions, profile, device: str) -> dict:
    """The space, the levels, the seeds (presets) and the memory estimate for ``options`` on ``profile``."""
    from diffspeed import hardware
    from diffspeed.bench.queue import default_queue
    from diffspeed.tune.estimate import footprint

    fp = footprint(options.model)
    edge = 256 if options.random_weights else fp.native_size()
    width, height = options.size or (edge, edge)
    load_dtype = options.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    ctx = Context(device=device, fast_dtypes=hardware.fast_dtypes(profile), load_dtype=load_dtype, width=width,
                  height=height, steps=options.steps, sampler=options.sampler, cfg=options.cfg, model=options.model)
    space = build_space(ctx, options.include, options.exclude)
    queue = len(default_queue(options.model))
    seeds, notes = ([], []) if not options.presets else preset_seeds(profile, options)
    return {"space": space, "context": ctx, "seeds": seeds, "notes": notes, "footprint": fp,
            "screen": Level("screen", 1, 1, 1, queue),
            # random weights: no fidelity, so more prompts only add timing samples, which --runs gives cheaper
            "full": Level("full", 1 if options.random_weights else None, options.runs, 1, queue),
            "estimate": lambda tables: fp.estimate_mb(tables, width=width, height=height, device=device,
                                                      load_dtype=load_dtype)}


def preset_seeds(profile, options: TuneOptions) -> tuple[list[Candidate], list[str]]:
    """Each preset's recipe for this hardware class, as a seed of the search and a point to compare with; those
    naming an optimization outside ``--include`` / inside ``--exclude`` are left out (said in a note)."""
    from diffspeed.presets import PRESETS, load_preset, profile_class

    seeds, notes = [], []
    cls, _ = profile_class(profile)
    for name in PRESETS:
        tables = load_preset(name).entries[cls]
        try:
            recipe = load_preset(name).resolve(profile)[0]  # validated for this machine (a CUDA one fails here)
            cand = candidate_from_tables(tables, f"preset {name}")
        except Exception as err:  # noqa: BLE001 -- a preset that cannot resolve here is noted, not fatal
            notes.append(f"preset {name} not compared: {err}")
            continue
        names = {c.name for c in recipe.optimizations}
        outside = sorted(n for n in names if n in options.exclude or (options.include and n not in options.include))
        if outside:
            notes.append(f"preset {name} not compared: it uses {', '.join(outside)} (--include/--exclude)")
        elif names:
            seeds.append(cand)
    unique = {c.key: c for c in reversed(seeds)}  # two presets with one recipe: measured once, under the first
    return [c for c in seeds if unique[c.key] is c], notes


def _progress(total: float):
    from tqdm.auto import tqdm

    return tqdm(total=round(total), unit="s", desc="tune", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}")


# ------------------------------------------------------------------------------------------------- results
def axis_of(goal: Goal) -> str:
    """The fidelity the front is drawn on: the floor's metric (SSIM when none), or memory on random weights."""
    if not goal.fidelity:
        return "memory"
    return next((m for m in AXES if m in goal.floors), "ssim")


def pareto(trials: list[Trial], goal: Goal, axis: str) -> list[Trial]:
    """Trials within the memory budget that no other beats on both speed and ``axis``."""
    def y(t):
        return -t.result["memory_mb"] if axis == "memory" else t.result.get(axis)

    from diffspeed.bench.runner import nondominated

    pts = [t for t in trials if t.ok and y(t) is not None and
           (goal.max_memory_mb is None or t.result["memory_mb"] <= goal.max_memory_mb)]
    return sorted(nondominated(pts, lambda t: (t.speed, y(t))), key=lambda t: -t.speed)


def summarise(options: TuneOptions, outcome, goal: Goal, setup: dict, profile, stopped: str | None = None) \
        -> TuneResult:
    trials = outcome.trials
    full = [t for t in trials if t.level == "full" and t.ok]
    level = "full" if len(full) >= 2 or (full and options.strategy == "random") else "screen"
    at = [t for t in trials if t.level == level]
    axis = axis_of(goal)
    feasible = [t for t in at if t.feasible]
    choice = max(feasible, key=lambda t: (t.speed, _y(t, axis), t.key), default=None)
    closest = None
    notes = list(setup["notes"])
    if goal.floors and not goal.fidelity:
        notes.append(f"random weights: fidelity is not computed (the images are noise), so "
                     f"{', '.join('--min-' + k.replace('_db', '') for k in goal.floors)} cannot apply; the search "
                     f"optimised speed within the memory budget")
    elif not goal.floors and goal.fidelity:
        notes.append("no fidelity floor given: the choice is the fastest within the memory budget, whatever its "
                     "fidelity; read the front, or give --min-ssim / --min-psnr / --min-adherence")
    if level == "screen" and trials:
        notes.append("the budget ended before full measurements: the front and the choice come from screening runs "
                     "(one prompt, one pass), noisier than full ones")
    constraints = _constraints(options, goal)
    if choice is not None:
        r = choice.result
        fid = "" if axis == "memory" else f", {axis.replace('_db', '').upper()} {_fmt_axis(r.get(axis), axis)}"
        message = (f"chosen: {choice.label} -- {r['speed']:.2f}x the baseline{fid}, peak {r['memory_mb']:.0f} MB "
                   f"({level} level)")
    else:
        ran = [t for t in trials if t.ok]
        closest = min(ran, key=lambda t: (goal.shortfall(t.result), -t.speed, t.key), default=None)
        message = f"no candidate meets {constraints}"
        if closest is not None:
            message += f"; closest: {closest.label} ({closest.level} level): {'; '.join(closest.problems)}"
        else:
            message += "; nothing was measured" + (" (the time budget is too short)" if trials == [] else "")
    base = next((t for t in trials if t.key == BASELINE.key and t.level == level), None)
    presets = tuple(t for t in at if t.source.startswith("preset "))
    return TuneResult(choice, tuple(pareto(at, goal, axis)), base, presets, tuple(trials), closest, message,
                      stopped or outcome.stopped, outcome.spent_s, level, axis, outcome.measured, outcome.replayed,
                      tuple(notes), tuple(outcome.pruned), setup["space"].describe(), options.to_dict(),
                      profile.summary() if hasattr(profile, "summary") else "")


def _y(t: Trial, axis: str) -> float:
    v = -t.result.get("memory_mb", 0) if axis == "memory" else t.result.get(axis)
    return -math.inf if v is None else v


def _fmt_axis(v, axis: str) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "exact"
    return f"{v:.1f} dB" if axis == "psnr_db" else f"{v:.3f}" if axis == "ssim" else f"{v:.0%}"


def _constraints(options: TuneOptions, goal: Goal) -> str:
    parts = [f"--max-memory {options.max_memory_mb:.0f}MB"] if options.max_memory_mb else []
    parts += [f"--min-{k.replace('_db', '')} {v:g}" for k, v in goal.active_floors.items()]
    return " and ".join(parts) or "the goal"


def finish(options: TuneOptions, outcome, goal: Goal, setup: dict, profile, out: Path,
           stopped: str | None = None) -> TuneResult:
    """Summarise and write ``tuned.toml`` (when something was chosen) and the reports."""
    from diffspeed.tune.report import write_reports

    result = summarise(options, outcome, goal, setup, profile, stopped)
    files = {}
    if result.choice is not None:
        files["recipe"] = "tuned.toml"
        recipe_of(result, options).save(out / "tuned.toml")
    files = write_reports(result.to_dict(), out, files)
    return dataclasses.replace(result, files={k: str(out / v) for k, v in files.items()})


def recipe_of(result: TuneResult, options: TuneOptions):
    """The chosen recipe as a :class:`~diffspeed.core.Recipe` named ``tuned``, its numbers in the description."""
    from diffspeed.core import Recipe

    c, r = result.choice, result.choice.result
    size = "x".join(map(str, options.size)) if options.size else "native size"
    fid = "" if result.axis == "memory" else f", {result.axis} {_fmt_axis(r.get(result.axis), result.axis)}"
    description = (f"diffspeed tune on {options.model} ({size}, {options.steps} steps, {options.sampler}): "
                   f"{r['speed']:.2f}x the baseline{fid}, peak {r['memory_mb']:.0f} MB ({result.level} level, "
                   f"seed {options.seed})")
    return Recipe.from_dict({"name": "tuned", "description": description, "optimization": [dict(t) for t in c.tables]},
                            source="tuned recipe")


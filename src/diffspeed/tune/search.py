"""The search: which candidates to measure, at which level, within the time budget; apart from measuring them.

``measure(candidates, level) -> list[dict]`` is injected (:class:`~diffspeed.tune.measure.BenchMeasure` drives
``diffspeed bench``; the tests plant costs). One dict per candidate, in order: ``status`` (ok / failed /
skipped), ``error``, ``speed`` (baseline time / its time, both measured in the same run), ``seconds_per_image``,
``memory_mb`` (peak), ``memory_ratio``, ``ssim``, ``psnr_db`` and ``adherence`` (None where not computed),
``overhead_s`` (process start, load and setup: what a measurement costs beyond its images).

Strategy ``model`` (default), in three phases:

1. **screen** the baseline alone (it prices everything after it), then the presets and every choice alone (the
   main effects) at the cheap level (one prompt, one pass);
2. fit an **additive surrogate** per metric (ridge regression on one-hot choices: log speed, log memory, SSIM
   loss, PSNR's MSE, adherence drop; optimizations combine roughly so -- DeepCache and CFG cut-off each remove a
   share of the UNet calls) and screen, batch after batch, the unmeasured grid points it predicts fastest within
   the memory budget and the fidelity floor (plus one random feasible point per batch, to explore), until its
   best prediction stops beating the best screened by more than the noise for a few batches, or the budget
   minus the reserve for phase 3 is spent;
3. **promote**: the baseline, the best screened candidates that met the constraints there (ranked by measurement
   and prediction together) and the presets are measured at the full level (every prompt, ``runs`` passes);
   the front and the choice come from these only.

Strategy ``random`` measures random grid points at the full level, for comparison (tests/tune shows the model
strategy beats it on the same budget). Every measurement is appended to the :class:`Ledger` as it completes;
the search is a deterministic function of the seed and the measurements, so a rerun replays the log and measures
only what it had not. The budget counts measuring time (a resumed run counts the logged time too); each batch's
cost is estimated first (overhead + images x predicted seconds per image, scaled by how far past estimates
were off), and a batch that would overrun is cut or not started.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffspeed.errors import DiffspeedError
from diffspeed.tune.space import BASELINE, Candidate, Space

LOG_SCHEMA = "diffspeed.tune-log/1"
METRICS = ("speed", "memory", "ssim", "psnr_db", "adherence")


@dataclass(frozen=True)
class Level:
    """How thoroughly one measurement runs: ``prompts`` of the queue (None: all), ``runs`` passes, ``warmup``."""

    name: str
    prompts: int | None
    runs: int
    warmup: int = 1
    queue: int = 4  # prompts in the queue

    @property
    def images(self) -> int:
        return self.warmup + self.runs * min(self.prompts or self.queue, self.queue)


@dataclass(frozen=True)
class Goal:
    """The constraints: peak memory at most ``max_memory_mb``; each floor (``ssim``, ``psnr_db``, ``adherence``)
    at least its value. ``fidelity`` False (random weights): the floors cannot apply and are ignored."""

    max_memory_mb: float | None = None
    floors: dict = field(default_factory=dict)
    fidelity: bool = True

    @property
    def active_floors(self) -> dict:
        return self.floors if self.fidelity else {}

    def problems(self, result: dict) -> list[str]:
        """Why ``result`` does not meet the goal; empty when it does."""
        if result.get("status") != "ok":
            return [f"{result.get('status')}: {result.get('error')}"]
        out = []
        if self.max_memory_mb is not None and result["memory_mb"] > self.max_memory_mb:
            out.append(f"peak {result['memory_mb']:.0f} MB > {self.max_memory_mb:.0f} MB")
        for metric, floor in self.active_floors.items():
            value = result.get(metric)
            if value is None:
                out.append(f"{metric} not measured")
            elif value < floor:
                out.append(f"{metric} {value:.3g} < {floor:g}")
        return out

    def shortfall(self, result: dict) -> float:
        """How far ``result`` is from meeting the goal, each constraint as a fraction of its limit (0: meets it)."""
        if result.get("status") != "ok":
            return math.inf
        out = 0.0
        if self.max_memory_mb is not None:
            out += max(0.0, result["memory_mb"] / self.max_memory_mb - 1)
        for metric, floor in self.active_floors.items():
            value = result.get(metric)
            out += 1.0 if value is None else max(0.0, (floor - value) / max(floor, 1e-9))
        return out


@dataclass(frozen=True)
class Trial:
    """One measurement of one candidate at one level."""

    key: str
    label: str
    source: str
    level: str
    tables: tuple
    result: dict
    seconds: float
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.result.get("status") == "ok"

    @property
    def feasible(self) -> bool:
        return self.ok and not self.problems

    @property
    def speed(self) -> float:
        return float(self.result.get("speed") or 0.0) if self.ok else 0.0

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "source": self.source, "level": self.level,
                "recipe": [dict(t) for t in self.tables], "result": dict(self.result), "seconds": self.seconds,
                "feasible": self.feasible, "problems": list(self.problems)}


# ------------------------------------------------------------------------------------------------------ log
def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def _float_back(result: dict) -> dict:
    return {k: (float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v) for k, v in result.items()}


class Ledger:
    """The append-only measurement log (JSON lines), keyed by (candidate key, level).

    The first line is a header with the workload (model, size, steps, sampler, ...); a log written for another
    workload is refused rather than mixed in. Each later line is one measurement: ``key``, ``level``, ``label``,
    ``recipe``, ``result``, ``seconds`` (its share of its batch's time) and ``batch`` (id, seconds, estimate), so a
    replayed batch counts exactly the time it took. A line cut short by a kill is ignored.
    """

    def __init__(self, path: Path | None, workload: dict):
        self.path = path
        self.records: dict[tuple[str, str], dict] = {}
        self.workload = json.loads(json.dumps(workload))
        if path is None:
            return
        if path.is_file():
            self._read(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "header", "schema": LOG_SCHEMA, "workload": self.workload})

    def _read(self, path: Path) -> None:
        text = path.read_text()
        if text and not text.endswith("\n"):  # a line cut by a kill: end it, so the next record starts afresh
            with open(path, "a") as f:
                f.write("\n")
        lines = text.splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except ValueError:
            header = {}
        if header.get("schema") != LOG_SCHEMA:
            raise DiffspeedError(f"out: {path} is not a diffspeed tune log; give another --out", field="out")
        if header.get("workload") != self.workload:
            diff = sorted(k for k in set(self.workload) | set(header.get("workload", {}))
                          if self.workload.get(k) != header.get("workload", {}).get(k))
            raise DiffspeedError(f"out: {path} holds measurements of another workload (differs in "
                                 f"{', '.join(diff)}); give another --out, or the same settings to resume",
                                 field="out")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run may be cut short
            if rec.get("type") == "measurement":
                rec["result"] = _float_back(rec["result"])
                self.records[(rec["key"], rec["level"])] = rec

    def _append(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_json_value(record), separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: str, level: str) -> dict | None:
        return self.records.get((key, level))

    def add(self, record: dict) -> None:
        record = {"type": "measurement", **record}
        self.records[(record["key"], record["level"])] = record
        self._append(record)


# ------------------------------------------------------------------------------------------------ surrogate
class Additive:
    """Ridge regression of one metric on one-hot choices, shrunk towards a prior per choice (0, or the memory
    estimate's); the baseline is 0 by construction (every metric is relative to it)."""

    def __init__(self, ridge: float = 0.5):
        self.ridge = ridge
        self.weights: dict[str, float] = {}
        self.prior: dict[str, float] = {}

    def fit(self, rows: list[tuple[tuple[str, ...], float, float]], prior: dict[str, float] | None = None):
        """``rows``: (features, target, weight)."""
        self.prior = dict(prior or {})
        feats = sorted({f for fs, _, _ in rows for f in fs})
        self.weights = {}
        if not feats:
            return self
        index = {f: i for i, f in enumerate(feats)}
        x = np.zeros((len(rows), len(feats)))
        y = np.zeros(len(rows))
        w = np.zeros(len(rows))
        mu = np.array([self.prior.get(f, 0.0) for f in feats])
        for r, (fs, target, weight) in enumerate(rows):
            for f in fs:
                x[r, index[f]] = 1.0
            y[r], w[r] = target, weight
        sw = np.sqrt(w)[:, None]
        a = np.vstack([x * sw, math.sqrt(self.ridge) * np.eye(len(feats))])
        b = np.concatenate([(y - x @ mu) * sw[:, 0], np.zeros(len(feats))])
        beta = np.linalg.lstsq(a, b, rcond=None)[0] + mu
        self.weights = dict(zip(feats, beta.tolist()))
        return self

    def weight(self, feature: str) -> float:
        return self.weights.get(feature, self.prior.get(feature, 0.0))

    def predict(self, features) -> float:
        return sum(self.weight(f) for f in features)


def _targets(result: dict, base: dict | None) -> dict:
    """The additive targets of one measurement (see :class:`Additive`)."""
    out = {"speed": math.log(max(result["speed"], 1e-6)), "memory": math.log(max(result["memory_ratio"], 1e-6))}
    if result.get("ssim") is not None:
        out["ssim"] = 1.0 - result["ssim"]
    if result.get("psnr_db") is not None:
        out["psnr_db"] = 0.0 if math.isinf(result["psnr_db"]) else 10 ** (-result["psnr_db"] / 10)
    if result.get("adherence") is not None and base and base.get("adherence") is not None:
        out["adherence"] = base["adherence"] - result["adherence"]
    return out


# ------------------------------------------------------------------------------------------------------ search
@dataclass
class Outcome:
    trials: list[Trial]
    stopped: str
    spent_s: float
    pruned: list[dict]
    measured: int  # measurements made in this run (not replayed from the log)
    replayed: int


class Search:
    TOLERANCE = {"ssim": 0.005, "psnr_db": 0.5, "adherence": 0.03}  # slack on the floors when screening
    PATIENCE = 3  # screening batches without a predicted gain of MIN_GAIN before phase 3
    MIN_GAIN = 0.01  # in log speed: 1 %
    POOL_ENUMERATE = 200_000  # valid grid points scored exhaustively up to this many; sampled above
    MAX_SCREEN = 240

    def __init__(self, space: Space, measure: Callable, goal: Goal, *, screen: Level, full: Level,
                 budget_s: float, ledger: Ledger, seed: int = 0, seeds: list[Candidate] = (), batch: int = 4,
                 promote: int = 4, strategy: str = "model", clock: Callable[[], float] = time.monotonic,
                 memory_prior: Callable[[list[dict]], float] | None = None, progress=None,
                 batch_baseline: bool | None = None):
        self.space, self.measure, self.goal = space, measure, goal
        self.levels = {"screen": screen, "full": full}
        self.budget, self.ledger, self.seed = float(budget_s), ledger, seed
        self.seeds = [s for s in seeds if s.key != BASELINE.key]
        self.batch, self.promote, self.strategy, self.clock = batch, promote, strategy, clock
        self.memory_prior = memory_prior  # tables -> estimated MB (calibrated by the caller), or None
        self.progress = progress
        self.batch_baseline = (getattr(measure, "batch_baseline", False) if batch_baseline is None
                               else batch_baseline)
        self.rng = random.Random(seed)
        self.trials: dict[tuple[str, str], Trial] = {}
        self.cands: dict[str, Candidate] = {BASELINE.key: BASELINE}
        self.spent = 0.0
        self.ratios: list[float] = []  # actual / estimated time of past batches
        self.pruned: list[dict] = []
        self.measured = self.replayed = 0
        self.stopped = ""
        self.models: dict[str, Additive] = {}
        self._pool: np.ndarray | None = None
        self._exhaustive = True

    # ---------------------------------------------------------------------------------------------- public
    def run(self) -> Outcome:
        try:
            if self.strategy == "random":
                self._random()
            else:
                self._model_based()
        except KeyboardInterrupt:
            self.stopped = "interrupted"
            raise
        finally:
            if self.progress is not None:
                self.progress.close()
        return self.outcome()

    def outcome(self) -> Outcome:
        """What was measured so far (also after an interrupt)."""
        return Outcome(sorted(self.trials.values(), key=lambda t: (t.level != "full", -t.speed, t.key)),
                       self.stopped or "done", self.spent, self.pruned, self.measured, self.replayed)

    # ---------------------------------------------------------------------------------------------- strategies
    def _model_based(self):
        screen, full = self.levels["screen"], self.levels["full"]
        first = [[BASELINE]] + _chunks(self.seeds, self.batch)  # the baseline alone first: it prices the rest
        if all(self._run_batch(chunk, screen, reserve=True) for chunk in first) and \
                all(self._run_batch(chunk, screen, reserve=True) for chunk in _chunks(self._singles(), self.batch)):
            calm = 0
            while len(self._done("screen")) < self.MAX_SCREEN:
                proposals, gain = self._propose(self.batch)
                if not proposals:
                    self.stopped = "every promising grid point screened"
                    break
                calm = calm + 1 if gain < self.MIN_GAIN else 0
                if calm > self.PATIENCE:
                    self.stopped = f"converged: for {self.PATIENCE} batches no prediction beat the best screened"
                    break
                if not self._run_batch(proposals, screen, reserve=True):
                    break
        self._promote(full)

    def _random(self):
        full = self.levels["full"]
        if not self._run_batch([BASELINE], full):
            return
        seen = {BASELINE.key}
        misses = 0
        while misses < 50:
            batch = []
            for idx in self.space.sample(self.rng, self.batch * 4):
                cand = self.space.of_indices(idx)
                if cand.key not in seen and len(batch) < self.batch:
                    seen.add(cand.key)
                    batch.append(cand)
            if not batch:
                misses += 1
                continue
            if not self._run_batch(batch, full):
                return
        self.stopped = "every grid point measured"

    def _promote(self, full: Level):
        """Phase 3: the baseline with the best screened candidates, until ``promote`` of them meet the goal in
        full, then the presets, at the full level."""
        ranked, good, first = self._promotion_order(), 0, True
        while first or (ranked and good < self.promote):
            take = min(self.batch, self.promote - good) if self.promote else 0
            chunk, ranked = ([BASELINE] if first else []) + ranked[:take], ranked[take:]
            first = False
            if not self._run_batch(chunk, full):
                return
            good += sum(1 for c in chunk if c.key != BASELINE.key and (t := self.trials.get((c.key, "full")))
                        and t.feasible)
        for chunk in _chunks(self.seeds, self.batch):
            if not self._run_batch(chunk, full):
                return

    # ---------------------------------------------------------------------------------------------- pieces
    def _singles(self) -> list[Candidate]:
        """Every choice alone, except those estimated to add memory and to exceed the budget alone by 20 %
        (pruned, with why): the rest are measured even over the budget, for their effect on speed."""
        out = []
        for cand in self.space.singles():
            if self.memory_prior is not None and self.goal.max_memory_mb is not None:
                est, base = self.estimate_mb(cand.tables), self.estimate_mb([])
                if est > 1.02 * base and est > 1.2 * self.goal.max_memory_mb:
                    self.pruned.append({"label": cand.label, "why": f"estimated peak {est:.0f} MB (baseline "
                                        f"{base:.0f} MB), over the budget: not measured"})
                    continue
            out.append(cand)
        return out

    def estimate_mb(self, tables: list[dict]) -> float:
        """The memory estimate of ``tables``, calibrated on the measured baseline (its error is mostly the
        runtime's footprint, the same for every candidate: an offset)."""
        raw = self.memory_prior(tables)
        base = self._base("screen") or self._base("full")
        return raw + (base["memory_mb"] - self.memory_prior([]) if base else 0.0)

    def _done(self, level: str) -> list[Trial]:
        return [t for (k, lv), t in self.trials.items() if lv == level]

    def _base(self, level: str) -> dict | None:
        t = self.trials.get((BASELINE.key, level)) or self.trials.get((BASELINE.key, "screen")) or \
            self.trials.get((BASELINE.key, "full"))
        return t.result if t and t.ok else None

    def _fit(self):
        rows: dict[str, list] = {m: [] for m in METRICS}
        for t in self.trials.values():
            if not t.ok or t.result.get("speed") is None:
                continue
            weight = 3.0 if t.level == "full" else 1.0
            for metric, y in _targets(t.result, self._base(t.level)).items():
                rows[metric].append((self.cands[t.key].features, y, weight))
        prior = {}
        if self.memory_prior is not None:
            base = self.estimate_mb([])
            for d in self.space.dimensions:
                for c in d.choices:
                    prior[c.key] = math.log(max(self.estimate_mb([dict(c.table)]), 1e-3) / max(base, 1e-3))
        self.models = {m: Additive().fit(r, prior if m == "memory" else None) for m, r in rows.items()}

    def predict(self, features) -> dict:
        """Predicted speed, memory (MB), SSIM, PSNR and adherence of a candidate with these choices."""
        base = self._base("screen") or {}
        m = self.models
        out = {"speed": math.exp(m["speed"].predict(features)) if "speed" in m else 1.0}
        mem = base.get("memory_mb")
        out["memory_mb"] = mem * math.exp(m["memory"].predict(features)) if mem and "memory" in m else None
        out["ssim"] = 1.0 - m["ssim"].predict(features) if "ssim" in m else None
        mse = m["psnr_db"].predict(features) if "psnr_db" in m else None
        out["psnr_db"] = None if mse is None else (math.inf if mse <= 1e-12 else -10 * math.log10(mse))
        adh = base.get("adherence")
        out["adherence"] = None if adh is None or "adherence" not in m else adh - m["adherence"].predict(features)
        return out

    def _pool_indices(self) -> np.ndarray:
        if self._pool is None:
            pts = list(self.space.enumerate(self.POOL_ENUMERATE + 1))
            self._exhaustive = len(pts) <= self.POOL_ENUMERATE
            if not self._exhaustive:
                pts = self.space.sample(random.Random(self.seed + 1), 20_000)
            self._pool = np.array(pts, dtype=np.int64).reshape(len(pts), len(self.space.dimensions))
        pool = self._pool
        if not self._exhaustive:  # around the best screened points too
            best = sorted((t for t in self._done("screen") if t.feasible), key=lambda t: -t.speed)[:8]
            extra = [n for t in best if (idx := self.space.indices(self.cands[t.key])) is not None
                     for n in self.space.neighbours(idx)]
            if extra:
                pool = np.unique(np.vstack([pool, np.array(extra, dtype=np.int64)]), axis=0)
        return pool

    def _score_pool(self, pool: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric's prediction for every grid point of ``pool``, vectorised over the additive weights."""
        dims = self.space.dimensions
        out = {}
        for metric, model in self.models.items():
            total = np.zeros(len(pool))
            for i, d in enumerate(dims):
                table = np.array([0.0] + [model.weight(c.key) for c in d.choices])
                total += table[pool[:, i]]
            out[metric] = total
        return out

    def _feasible_mask(self, scores: dict[str, np.ndarray], n: int, slack: float = 1.0) -> np.ndarray:
        ok = np.ones(n, dtype=bool)
        base = self._base("screen") or {}
        if self.goal.max_memory_mb is not None and base.get("memory_mb") and "memory" in scores:
            ok &= base["memory_mb"] * np.exp(scores["memory"]) <= self.goal.max_memory_mb * (1 + 0.05 * slack)
        for metric, floor in self.goal.active_floors.items():
            if metric not in scores:
                continue
            tol = self.TOLERANCE[metric] * slack
            if metric == "ssim":
                ok &= 1.0 - scores["ssim"] >= floor - tol
            elif metric == "psnr_db":
                ok &= -10 * np.log10(np.maximum(scores["psnr_db"], 1e-12)) >= floor - tol
            elif base.get("adherence") is not None:
                ok &= base["adherence"] - scores["adherence"] >= floor - tol
        return ok

    def _propose(self, n: int) -> tuple[list[Candidate], float]:
        """Up to ``n`` unscreened grid points: the fastest predicted within the constraints, one of them a
        random feasible one; and by how much (log speed) the best of them is predicted to beat the best screened
        (both as the surrogate predicts them: one lucky screening run does not set the bar)."""
        self._fit()
        pool = self._pool_indices()
        if not len(pool):
            return [], 0.0
        scores = self._score_pool(pool)
        ok = self._feasible_mask(scores, len(pool))
        speed = scores.get("speed", np.zeros(len(pool)))
        screened = {k for (k, lv) in self.trials if lv == "screen"}
        order = np.lexsort((np.arange(len(pool)), -speed))
        picks, best_pred, rest = [], None, []
        for i in order:
            if not ok[i]:
                continue
            cand = self.space.of_indices(tuple(int(v) for v in pool[i]))
            if cand.key in screened:
                continue
            if best_pred is None:
                best_pred = float(speed[i])
            if len(picks) < max(1, n - 1):
                picks.append(cand)
            else:
                rest.append(cand)
                if len(rest) >= 200:
                    break
        if n > 1 and rest:
            picks.append(rest[self.rng.randrange(len(rest))])
        bar = max((math.log(max(self._smoothed(t)["speed"], 1e-6)) for t in self._done("screen")
                   if self._meets(self._smoothed(t), slack=1.0)), default=0.0)
        for c in picks:
            self.cands[c.key] = c
        return picks, (best_pred - bar) if best_pred is not None else 0.0

    def _smoothed(self, t: Trial) -> dict:
        """A screening measurement averaged with the surrogate's prediction for it (in the additive targets)."""
        if not t.ok or not self.models:
            return t.result
        pred, r = self.predict(self.cands[t.key].features), dict(t.result)
        r["speed"] = math.sqrt(max(r["speed"], 1e-6) * pred["speed"])
        for m in ("ssim", "adherence"):
            if r.get(m) is not None and pred.get(m) is not None:
                r[m] = (r[m] + pred[m]) / 2
        if r.get("psnr_db") is not None and pred.get("psnr_db") is not None:
            mse = (10 ** (-min(r["psnr_db"], 200) / 10) + 10 ** (-min(pred["psnr_db"], 200) / 10)) / 2
            r["psnr_db"] = math.inf if mse <= 1e-20 else -10 * math.log10(mse)
        return r

    def _meets(self, r: dict, slack: float = 0.0) -> bool:
        """The result ``r`` meets the goal, with the screening tolerance times ``slack`` on each floor."""
        if r.get("status") != "ok":
            return False
        if self.goal.max_memory_mb is not None and r["memory_mb"] > self.goal.max_memory_mb * (1 + 0.05 * slack):
            return False
        for metric, floor in self.goal.active_floors.items():
            value = r.get(metric)
            if value is None or value < floor - self.TOLERANCE[metric] * slack:
                return False
        return True

    def _promotion_order(self) -> list[Candidate]:
        """Screened candidates that meet the goal (screening tolerance) once measurement and prediction are
        averaged, fastest first by the same average."""
        self._fit()
        seeds = {s.key for s in self.seeds}
        rows = []
        for t in self._done("screen"):
            if t.key == BASELINE.key or t.key in seeds or (t.key, "full") in self.trials:
                continue
            r = self._smoothed(t)
            if self._meets(r, slack=1.0):
                rows.append((-r["speed"], t.key))
        return [self.cands[k] for _, k in sorted(rows)]

    # ---------------------------------------------------------------------------------------------- measuring
    def _estimate(self, cand: Candidate, level: Level) -> float:
        """Seconds ``cand`` takes at ``level``: overhead + images x predicted seconds per image."""
        done = [t for t in self.trials.values() if t.ok and t.result.get("seconds_per_image")]
        if not done:
            return 0.0  # nothing known yet: the first batch runs
        overhead = float(np.median([t.result.get("overhead_s") or 0.0 for t in done]))
        base = self._base(level.name) or {}
        spi = base.get("seconds_per_image") or float(np.median([t.result["seconds_per_image"] for t in done]))
        speed = math.exp(self.models["speed"].predict(cand.features)) if "speed" in self.models else 1.0
        return overhead + level.images * spi / max(speed, 0.05)

    def _batch_cost(self, cands: list[Candidate], level: Level) -> float:
        est = sum(self._estimate(c, level) for c in cands)
        if self.batch_baseline and all(c.key != BASELINE.key for c in cands):
            est += self._estimate(BASELINE, level)
        scale = min(3.0, max(0.5, float(np.median(self.ratios)))) if self.ratios else 1.0
        return est * scale

    def _reserve(self) -> float:
        """Time kept for phase 3: the baseline and ``promote`` candidates at the full level, but never more than
        half the budget -- on a slow model a full reserve would leave nothing to screen (phase 3 then promotes
        as many as the rest of the budget holds)."""
        full = self.levels["full"]
        one = self._batch_cost([BASELINE], full)
        return min(one * (1 + self.promote), 0.5 * self.budget) if self.strategy == "model" else 0.0

    def _run_batch(self, cands: list[Candidate], level: Level, reserve: bool = False) -> bool:
        """Measure ``cands`` at ``level`` if the budget allows, replaying what the log already holds; False when
        the budget stops the phase. The decision does not depend on the log, so a resumed run takes the same
        path as the run it resumes."""
        for c in cands:
            self.cands.setdefault(c.key, c)
        pending = [c for c in cands if (c.key, level.name) not in self.trials]
        if not pending:
            return True
        limit = self.budget - (self._reserve() if reserve else 0.0)
        while pending and self.trials and self.spent + self._batch_cost(pending, level) > limit:
            pending.pop()  # the batch's tail waits: it would overrun the budget
        if not pending:
            self.stopped = "time budget"
            return False
        est = self._batch_cost(pending, level)
        new, replayed_batches, replayed_seconds = [], {}, 0.0
        for c in pending:
            rec = self.ledger.get(c.key, level.name)
            if rec is None:
                new.append(c)
                continue
            self._add(c, level, rec["result"], rec["seconds"])
            self.replayed += 1
            b = rec.get("batch")
            if b:
                replayed_batches[b["id"]] = b
            replayed_seconds += rec["seconds"]
        if replayed_batches and not new and len(replayed_batches) == 1:
            (b,) = replayed_batches.values()  # the same batch as before: its exact time and estimate
            self._account(b["seconds"], b.get("estimate") or 0.0)
        elif replayed_seconds:
            self._account(replayed_seconds, 0.0)
        new = self._validated(new, level)
        if not new:
            return True
        start = self.clock()
        results = self.measure(new, level)
        seconds = max(0.0, self.clock() - start)
        if len(results) != len(new):
            raise RuntimeError(f"measure returned {len(results)} results for {len(new)} candidates")
        batch = {"id": hashlib.sha1((level.name + "".join(c.key for c in new)).encode()).hexdigest()[:12],
                 "seconds": seconds, "estimate": est}
        for c, result in zip(new, results):
            share = seconds / len(new)
            self.ledger.add({"key": c.key, "level": level.name, "label": c.label, "source": c.source,
                             "recipe": c.tables, "result": result, "seconds": share, "batch": batch})
            self._add(c, level, _float_back(_json_value(result)), share)
            self.measured += 1
        self._account(seconds, est)
        return True

    def _account(self, seconds: float, estimate: float) -> None:
        self.spent += seconds
        if estimate > 0:
            self.ratios.append(seconds / estimate)
        self._tick(seconds)

    def _validated(self, cands: list[Candidate], level: Level) -> list[Candidate]:
        """Candidates that recipe validation accepts as a whole; the others are logged as skipped, unmeasured."""
        from diffspeed.core import Recipe
        from diffspeed.tune.space import WORKFLOW

        out = []
        for c in cands:
            if c.key == BASELINE.key:
                out.append(c)
                continue
            try:
                problems = Recipe.from_dict(c.recipe_dict()).check(workflow=WORKFLOW)
            except DiffspeedError as err:
                problems = [str(err)]
            if problems:
                result = {"status": "skipped", "error": "; ".join(problems)}
                self.ledger.add({"key": c.key, "level": level.name, "label": c.label, "source": c.source,
                                 "recipe": c.tables, "result": result, "seconds": 0.0, "batch": None})
                self._add(c, level, result, 0.0)
            else:
                out.append(c)
        return out

    def _add(self, cand: Candidate, level: Level, result: dict, seconds: float) -> None:
        t = Trial(cand.key, cand.label, cand.source, level.name, tuple(cand.tables), result, seconds,
                  tuple(self.goal.problems(result)))
        self.trials[(cand.key, level.name)] = t

    def best(self) -> Trial | None:
        """The fastest trial that meets the goal (full level first)."""
        for level in ("full", "screen"):
            ok = [t for t in self._done(level) if t.feasible]
            if ok:
                return max(ok, key=lambda t: (t.speed, t.key))
        return None

    def _tick(self, seconds: float) -> None:
        if self.progress is None:
            return
        self.progress.update(min(seconds, max(0.0, self.progress.total - self.progress.n)))
        best = self.best()
        if best is not None:
            self.progress.set_postfix_str(f"best {best.speed:.2f}x ({best.level}) {best.label[:50]}")


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


"""The real ``measure``: bench entries built from candidates, bench rows mapped back; checked without running."""

from __future__ import annotations

import sys

import pytest

from diffspeed.errors import DiffspeedRuntimeError
from diffspeed.tune.measure import BenchMeasure, row_result
from diffspeed.tune.options import TuneOptions
from diffspeed.tune.search import Level
from diffspeed.tune.space import BASELINE, candidate_from_tables, candidate_of, choice

SCREEN, FULL = Level("screen", 1, 1, 1, 4), Level("full", None, 3, 1, 4)


def _candidates():
    cache = candidate_of([choice("cfg_cutoff", fraction=0.7), choice("deepcache", interval=4)])
    preset = candidate_from_tables([{"name": "deepcache", "interval": 3}, {"name": "cfg_cutoff", "fraction": 0.75}],
                                   "preset fastest")
    return [BASELINE, cache, preset]


def _row(speed, status="ok"):
    if status != "ok":
        return {"status": status, "error": "boom", "ratios": {}}
    return {"status": "ok", "ratios": {"speed": speed, "memory": 1.1}, "timing": {"median_s": 0.5 / speed, "n": 4},
            "memory": {"peak_mb": 600.0}, "fidelity": {"ssim": 0.9, "psnr_db": 25.0},
            "adherence": {"background": 0.8, "shape": 0.6}, "load_s": 1.0, "setup_s": 0.5, "first_call_s": 0.7,
            "stats": {"no_effect:deepcache": 1}}


def test_entries_are_proper_bench_entries(tmp_path):
    from diffspeed.bench.runner import Entry, where_to_run
    from diffspeed.core import Recipe

    m = BenchMeasure(TuneOptions(model="tiny-sd", steps=12), tmp_path)
    base, cache, preset = _candidates()
    entries = m.entries([base, cache, preset])
    assert len(entries) == 2 and all(isinstance(e, Entry) and e.kind == "recipe" for e in entries)
    assert entries[0].name == "deepcache(interval=4) + cfg_cutoff(fraction=0.7)" and entries[0].source == "tune search"
    assert entries[1].source == "tune preset fastest"
    assert entries[0].recipe["optimization"] == Recipe.from_dict(cache.recipe_dict()).to_dict()["optimization"]
    assert [t["name"] for t in entries[1].recipe["optimization"]] == ["deepcache", "cfg_cutoff"]  # its own order
    for e in entries:  # what the bench checks before starting a worker: valid here, runs in this interpreter
        assert where_to_run(e, "cpu") == (sys.executable, None)


def test_a_batch_is_one_bench_run_at_the_level(tmp_path, monkeypatch):
    import diffspeed.bench.runner as runner

    calls = []

    def fake_bench(model, **kwargs):
        calls.append((model, kwargs))
        return {"entries": [_row(1.0), _row(2.0), _row(1.5, "failed")], "fidelity_note": None}

    monkeypatch.setattr(runner, "bench", fake_bench)
    m = BenchMeasure(TuneOptions(model="tiny-sd", steps=12, runs=3), tmp_path)
    base, cache, preset = _candidates()
    out = m([cache, base, preset], SCREEN)
    (model, kw), = calls
    assert model == "tiny-sd" and [e.name for e in kw["entries"]] == [cache.label, preset.label]
    assert (kw["prompts"], kw["runs"], kw["warmup"], kw["steps"]) == (1, 1, 1, 12)
    assert kw["noise_check"] is False and kw["peers"] is False and kw["presets"] == ()
    assert kw["out"].parent == tmp_path / "bench" and kw["out"].name.startswith("screen-")
    assert out[0]["speed"] == 2.0 and out[1]["speed"] == 1.0 and out[2]["status"] == "failed"  # by position
    assert out[0]["adherence"] == pytest.approx(0.7) and out[0]["no_effect"] == ["deepcache"]
    assert out[0]["overhead_s"] == pytest.approx(3.0 + 1.0 + 0.5 + 0.7)
    m([cache], FULL)
    assert calls[-1][1]["prompts"] is None and calls[-1][1]["runs"] == 3


def test_a_failed_baseline_stops_the_search(tmp_path, monkeypatch):
    import diffspeed.bench.runner as runner

    monkeypatch.setattr(runner, "bench", lambda model, **kw: {"entries": [_row(1, "failed"), _row(2.0)]})
    with pytest.raises(DiffspeedRuntimeError, match="baseline failed"):
        BenchMeasure(TuneOptions(model="tiny-sd"), tmp_path)(_candidates()[1:2], SCREEN)


def test_random_weights_have_no_fidelity():
    r = row_result(_row(2.0), fidelity=False)
    assert r["ssim"] is None and r["psnr_db"] is None and r["speed"] == 2.0


@pytest.mark.slow
def test_a_real_tune_on_tiny_sd(tmp_path):
    """One short real run (a few bench processes): the files exist and the recipe loads."""
    from diffspeed.core import Recipe
    from diffspeed.tune.run import tune

    result = tune("tiny-sd", include=("deepcache", "cfg_cutoff"), steps=10, runs=1, batch=4, promote=1,
                  presets=False, time_budget="6m", out=str(tmp_path), progress=False, min_ssim=0.3)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report.md").is_file()
    assert result.baseline is not None and result.measured > 2
    if result.choice is not None:
        assert Recipe.load(tmp_path / "tuned.toml").name == "tuned"


def test_through_the_real_bench_with_planted_workers(tmp_path, monkeypatch):
    """The adapter and the real ``bench()`` together (entries, ratios to the run's baseline, reports), with each
    worker process replaced by a planted result: no model is loaded."""
    import diffspeed.bench.runner as runner
    import diffspeed.hardware as hardware
    from diffspeed.bench.worker import _summarise, new_result

    jobs = []

    def worker(job, folder, timeout, tick, python=None):
        jobs.append(job)
        name = job["entry"]["name"]
        seconds = 0.25 if "deepcache" in name else 1.0
        row = new_result(name) | {"seconds_per_image": [seconds] * (job["runs"] * len(job["queue"])),
                                  "load_s": 2.0, "setup_s": 0.1, "first_call_s": seconds, "width": 256, "height": 256,
                                  "memory": {"peak_mb": 900.0 if "precision" in name else 1000.0}}
        _summarise(row, job["steps"])
        return row

    monkeypatch.setattr(runner, "_run_isolated", worker)
    monkeypatch.setattr(hardware, "probe", lambda profile=None, device="cpu", refresh=False: hardware.detect("cpu"))
    options = TuneOptions(model="random:sd15", steps=10, runs=2)
    m = BenchMeasure(options, tmp_path)
    base, cache, _ = _candidates()
    bf16 = candidate_of([choice("precision", unet="bf16", vae="bf16", originals="disk")])
    out = m([base, cache, bf16], SCREEN)
    assert [j["entry"]["name"] for j in jobs] == ["baseline", cache.label, bf16.label]
    assert all(len(j["queue"]) == 1 and j["runs"] == 1 and j["warmup"] == 1 for j in jobs)
    assert out[0]["speed"] == 1.0 and out[1]["speed"] == pytest.approx(4.0)
    assert out[2]["memory_ratio"] == pytest.approx(0.9) and out[2]["ssim"] is None  # random weights: no fidelity
    assert (m.folder([base, cache, bf16], SCREEN) / "results.json").is_file()
    jobs.clear()
    m([cache], FULL)
    assert [len(j["queue"]) for j in jobs] == [4, 4] and jobs[1]["runs"] == FULL.runs

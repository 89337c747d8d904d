"""The search on a planted world (tests/tune/planted.py): costs computed from the settings, noise from the seed, a
fake clock. Nothing is run; each test takes seconds."""

from __future__ import annotations

import json

import pytest

from diffspeed.tune.options import TuneOptions
from diffspeed.tune.run import prepare
from tests.tune.planted import PROFILE, Clock, PlantedMeasure, optimum, regret, run, truth


@pytest.fixture(scope="module")
def best():
    """(speed, key) of the planted optimum under the tests' goal, by brute force over the valid grid."""
    options = TuneOptions(model="tiny-sd", max_memory_mb="800MB", min_ssim=0.9)
    space = prepare(options, PROFILE, "cpu")["space"]
    speed, key = optimum(space, 800, 0.9)
    assert key is not None and speed > 3  # the world has a clear winner (bf16 + channels_last + DeepCache 4 + CFG)
    return speed, key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_the_known_optimum(best, seed):
    result, measure = run(seed)
    assert result.choice is not None and result.choice.key == best[1], result.message
    assert result.level == "full" and result.choice.level == "full"
    assert len(measure.measured) < 80  # of the ~8,000 valid grid points


def test_respects_the_memory_budget_and_the_floor():
    for mb, floor in ((800, 0.9), (600, 0.95), (2048, 0.97)):
        result, _ = run(0, max_memory=f"{mb}MB", min_ssim=floor)
        assert result.choice is not None, result.message
        true = truth(result.choice.tables)
        assert true["memory_mb"] <= mb and true["ssim"] >= floor, (mb, floor, result.choice.label, true)
        r = result.choice.result
        assert r["memory_mb"] <= mb and r["ssim"] >= floor
        assert all(t.result["memory_mb"] <= mb for t in result.front)  # the front lies within the budget
        # everything faster than the choice at the full level broke the goal, and says how
        faster = [t for t in result.trials if t.level == "full" and t.ok and t.speed > result.choice.speed]
        assert all(t.problems for t in faster)


def test_beats_random_search_on_the_same_budget(best):
    """20 seeds, the same measuring-time budget (the fake clock) for both strategies."""
    model = [regret(run(seed)[0], best[0]) for seed in range(20)]
    rand = [regret(run(seed, strategy="random")[0], best[0]) for seed in range(20)]
    hits = sum(r == 0 for r in model), sum(r == 0 for r in rand)
    assert sum(model) / 20 < 0.05 and sum(model) < sum(rand) / 5, (model, rand)
    assert hits[0] >= 12 and hits[0] > hits[1], hits


def test_deterministic_given_the_seed():
    a, ma = run(4)
    b, mb = run(4)
    assert ma.measured == mb.measured
    assert [t.to_dict() for t in a.trials] == [t.to_dict() for t in b.trials]
    assert a.choice.key == b.choice.key and a.message == b.message


def test_resumes_after_a_kill_without_measuring_again(tmp_path):
    whole, full_run = run(3, out=tmp_path / "whole")
    killed = PlantedMeasure(3, fail_after=6)  # the 7th bench run is interrupted
    with pytest.raises(KeyboardInterrupt):
        run(3, out=tmp_path / "resumed", measure=killed)
    log = tmp_path / "resumed" / "measurements.jsonl"
    assert json.loads(log.read_text().splitlines()[0])["type"] == "header"
    with open(log, "a") as f:
        f.write('{"type": "measurement", "key": "[cut sh')  # a kill while writing leaves a cut line: ignored
    assert (tmp_path / "resumed" / "report.md").is_file()  # the interrupted run still reports what it had
    again = PlantedMeasure(3)
    resumed, _ = run(3, out=tmp_path / "resumed", measure=again)
    assert not set(again.measured) & set(killed.measured)  # nothing logged is measured again
    assert killed.measured + again.measured == full_run.measured  # and the rest exactly as without the kill
    assert resumed.replayed == len(killed.measured) and resumed.measured == len(again.measured)
    assert resumed.choice.key == whole.choice.key and resumed.spent_s == pytest.approx(whole.spent_s)
    # a finished run resumed once more measures nothing
    idle = PlantedMeasure(3)
    run(3, out=tmp_path / "resumed", measure=idle)
    assert idle.calls == 0


def test_a_log_of_another_workload_is_refused(tmp_path):
    run(0, out=tmp_path, time_budget=60)
    from diffspeed.errors import DiffspeedError

    with pytest.raises(DiffspeedError, match="another workload .*steps") as err:
        run(0, out=tmp_path, steps=12)
    assert err.value.field == "out"


def test_stops_on_time_and_reports_the_best_so_far():
    unbounded, _ = run(0, time_budget=3600)
    for budget in (90, 200, 400):
        clock = Clock()
        result, measure = run(0, measure=PlantedMeasure(0, clock), time_budget=budget)
        assert result.stopped == "time budget" or budget >= 400, (budget, result.stopped)
        assert clock.now <= budget * 1.1, (budget, clock.now)  # each batch's cost is estimated before it starts
        assert result.spent_s == pytest.approx(clock.now)
        assert len(measure.measured) < len(unbounded.trials)
        if result.choice is not None:
            assert result.choice.feasible
        else:
            assert result.message.startswith("no candidate meets")


def test_a_tiny_budget_still_reports_without_a_traceback():
    result, measure = run(0, time_budget=10)
    assert measure.calls <= 2 and result.choice is None
    assert "no candidate meets --max-memory 800MB" in result.message and "closest" in result.message


def test_none_fits_says_what_came_closest(tmp_path):
    result, _ = run(0, out=tmp_path, max_memory="100MB", time_budget=300)
    assert result.choice is None and result.closest is not None
    assert result.message.startswith("no candidate meets --max-memory 100MB and --min-ssim 0.9; closest: ")
    assert "peak" in result.message and "> 100 MB" in result.message
    assert not (tmp_path / "tuned.toml").exists()
    assert result.message in (tmp_path / "report.md").read_text()


def test_random_weights_ignore_the_floor_and_say_so():
    from diffspeed.tune.run import tune

    m = PlantedMeasure(0)
    result = tune("random:sd15", measure=m, clock=m.clock, profile=PROFILE, progress=False, write=False,
                  max_memory="800MB", min_ssim=0.99, time_budget=300)
    assert any("random weights" in n and "--min-ssim cannot apply" in n for n in result.notes)
    assert result.axis == "memory" and result.choice is not None
    assert truth(result.choice.tables)["ssim"] < 0.99  # the floor did not constrain the choice


def test_outputs(tmp_path):
    result, _ = run(0, out=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema"] == "diffspeed.tune/1" and data["choice"]["key"] == result.choice.key
    assert len(data["trials"]) == len(result.trials) and data["front"]
    md = (tmp_path / "report.md").read_text()
    assert result.message in md and "## Front" in md and "Not searched:" in md
    assert all(t.label in md for t in result.trials)
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "front.png").stat().st_size > 1000
    assert any(t.source.startswith("preset ") for t in result.trials)  # the presets were compared
    assert result.baseline is not None and result.baseline.result["speed"] == 1.0


def test_a_slow_full_level_still_leaves_time_to_screen():
    """Five full measurements would outlast the budget (a large model): the reserve for them is capped at half the
    budget, so the singles are still screened and a feasible recipe is chosen rather than the baseline alone."""
    result, measure = run(0, runs=40, time_budget=600)  # one full measurement: ~165 s of the fake clock
    screened = [t for t in result.trials if t.level == "screen"]
    assert len(screened) > 20, len(screened)
    assert result.choice is not None and result.choice.key != "[]" and result.choice.feasible, result.message

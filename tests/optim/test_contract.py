"""The shared contract of every optimization, on tiny-sd and tiny-sdxl.

apply -> remove restores outputs and every piece of pipeline state exactly; a no-op config equals the
baseline exactly; applying twice raises; Accelerated resets per-call state; bad values name the field.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from diffspeed import DiffspeedError
from diffspeed.core import Accelerated, RunState, all_optimizations

from .contract import assert_same, run, snapshot

OPTS = all_optimizations()
RUNNABLE = [n for n, cls in OPTS.items() if not cls.requirements(cls.Config(**cls.example))]
MODELS = ["tiny_sd", "tiny_sdxl"]


def _marked(names):
    """Optimizations that declare ``contract_slow`` (compile: every run compiles) run only with -m slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if getattr(OPTS[n], "contract_slow", False) else n
            for n in names]


@pytest.fixture(params=MODELS)
def pipe(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def baseline(pipe):
    return run(pipe)


@pytest.mark.parametrize("name", _marked(RUNNABLE))
def test_apply_then_remove_restores_everything(pipe, baseline, name):
    cls = OPTS[name]
    if cls.requirements(cls.Config(**cls.example), pipe):  # e.g. accelerator: a LoRA shipped for tiny-sd only
        pytest.skip(f"{name} cannot run on this pipeline: {cls.requirements(cls.Config(**cls.example), pipe)}")
    before = snapshot(pipe)
    opt = cls(**cls.example).apply(pipe, RunState())
    run(pipe, steps=2)
    opt.remove()
    assert_same(before, snapshot(pipe))
    assert np.array_equal(run(pipe), baseline)


@pytest.mark.parametrize("name", _marked([n for n in RUNNABLE if OPTS[n].noop is not None]))
def test_noop_config_equals_baseline(pipe, baseline, name):
    config = OPTS[name].Config(**OPTS[name].noop)
    with Accelerated(pipe, [config], strict=False) as fast:
        assert np.array_equal(run(fast), baseline)
        # the effect check sees that a no-op config did nothing: noted here
        assert fast.stats[f"no_effect:{name}"] == 1
        notes = [e for e in fast.events if e.startswith(f"{name}: no effect")]
    assert notes
    if any("by design" not in n and "stood aside" not in n for n in notes):  # silent: strict raises
        with pytest.raises(DiffspeedError, match=f"{name}: no effect"):
            with Accelerated(pipe, [config]) as fast:
                run(fast)


@pytest.mark.parametrize("name", _marked(RUNNABLE))
def test_double_apply_raises(tiny_sd, name):
    cls = OPTS[name]
    opt = cls(**cls.example).apply(tiny_sd, RunState())
    try:
        with pytest.raises(DiffspeedError, match="already applied"):
            opt.apply(tiny_sd, RunState())
    finally:
        opt.remove()
    with pytest.raises(DiffspeedError, match="not applied"):
        opt.remove()


@pytest.mark.parametrize("name", _marked(RUNNABLE))
def test_per_call_state_is_reset_between_calls(tiny_sd, name):
    cls = OPTS[name]
    with Accelerated(tiny_sd, [cls.Config(**cls.example)]) as fast:
        if getattr(cls, "contract_slow", False):
            run(fast, steps=3)  # the first call compiles (and says so in stats): compare the calls after it
        first = run(fast, steps=3)
        stats = dict(fast.stats)
        second = run(fast, steps=3)
        # PNDM (the shipped scheduler, as in SD 1.5) makes one extra call: 3 steps -> 4 denoiser calls
        assert fast.stats == stats and stats["denoiser_calls"] == len(tiny_sd.scheduler.timesteps)
        assert np.array_equal(first, second)  # nothing carried over from the first call


def _bad_values(f: dataclasses.Field):
    m = f.metadata
    if m.get("choices"):
        yield "no-such-choice"
    if m.get("range"):
        lo, hi = m["range"]
        yield (hi + 1) if m["kind"] is int else hi + 0.5
        yield (lo - 1) if m["kind"] is int else lo - 0.5
    yield [] if m.get("kind") is not list else "x"  # wrong type


@pytest.mark.parametrize("name", list(OPTS))
def test_bad_values_fail_naming_the_field(name):
    config_cls = OPTS[name].Config
    for f in dataclasses.fields(config_cls):
        for bad in _bad_values(f):
            with pytest.raises(DiffspeedError) as err:
                config_cls(**{f.name: bad})
            assert err.value.field == f.name and f"{name}.{f.name}" in str(err.value), (f.name, bad)


def test_every_optimization_is_described():
    for name, cls in OPTS.items():
        assert cls.summary and cls.Config.name == name
        assert all(d["help"] for d in cls.Config.describe()), name

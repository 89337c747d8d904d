"""The effect check: planted optimizations that apply and do nothing are caught, strict or noted.

Two plants, registered for the test only: one whose apply changes nothing on the pipeline (it sets an attribute
to the value it already has), and one that hooks the UNet and declares a per-call statistic it never counts (a
"cache" that is never hit). A third plant that does count shows the check passes an optimization that acts.
"""

from __future__ import annotations

import dataclasses

import pytest

from diffspeed import DiffspeedError
from diffspeed.core import Accelerated, Edits, OptConfig, Optimization, RunState, param
from diffspeed.core.optimization import REGISTRY

PROMPT = "a red circle at top left on a blue background"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SameValueConfig(OptConfig):
    name = "planted_same_value"


class _SameValue(Optimization):
    Config = _SameValueConfig

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        edits.set_attr(pipe.unet, "training", pipe.unet.training)  # recorded, but nothing changes


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CacheConfig(OptConfig):
    name = "planted_cache"
    hits: bool = param(False, "count a hit on every UNet call")


class _Cache(Optimization):
    Config = _CacheConfig
    call_effect = ("planted_cache_hits",)

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        def hook(*_):
            if self.config.hits:
                self.state.stats["planted_cache_hits"] += 1

        edits.forward_hook(pipe.unet, hook)


@pytest.fixture
def planted(monkeypatch):
    for cls in (_SameValue, _Cache):
        monkeypatch.setitem(REGISTRY, cls.Config.name, cls)


def _call(fast):
    return fast(PROMPT, num_inference_steps=2, output_type="np")


def test_an_optimization_that_changes_nothing_is_refused_when_strict(tiny_sd, planted):
    with pytest.raises(DiffspeedError, match="planted_same_value: no effect: applying it changed nothing") as err:
        Accelerated(tiny_sd, [_SameValueConfig()])
    assert err.value.field == "planted_same_value"
    assert not tiny_sd.unet._forward_hooks and not tiny_sd.unet._forward_pre_hooks  # refused: nothing left on it
    with Accelerated(tiny_sd, [_SameValueConfig()], strict=False) as fast:
        assert fast.effects["planted_same_value"] == {}
        _call(fast)
        assert fast.stats["no_effect:planted_same_value"] == 1
        assert any(e.startswith("planted_same_value: no effect") for e in fast.events)


def test_a_cache_never_hit_is_caught_per_call(tiny_sd, planted):
    with Accelerated(tiny_sd, [_CacheConfig()]) as fast:
        assert fast.effects["planted_cache"] == {"hooks": 1}  # it did change the pipeline...
        with pytest.raises(DiffspeedError, match=r"planted_cache: no effect on this call \(planted_cache_hits"):
            _call(fast)  # ...but did nothing for the call
    with Accelerated(tiny_sd, [_CacheConfig()], strict=False) as fast:
        _call(fast)
        assert fast.stats["no_effect:planted_cache"] == 1
    with Accelerated(tiny_sd, [_CacheConfig(hits=True)]) as fast:  # one that acts passes, strict
        _call(fast)
        assert fast.stats["planted_cache_hits"] > 0 and not any(k.startswith("no_effect") for k in fast.stats)


def test_a_real_optimization_reports_what_it_changed(tiny_sd):
    from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
    from diffspeed.optim.precision import PrecisionConfig

    with Accelerated(tiny_sd, [PrecisionConfig(vae="bf16"), CfgCutoffConfig(fraction=0.5)]) as fast:
        assert fast.effects["precision"]["tensors changed"] > 0
        assert fast.effects["cfg_cutoff"] == {"methods wrapped": 1}
        fast(PROMPT, num_inference_steps=4, guidance_scale=3.0, output_type="np")
        assert fast.stats["cfg_skipped_calls"] == 2 and not any(k.startswith("no_effect") for k in fast.stats)
        # without guidance there is nothing to cut: noted as its own choice, never an error
        fast(PROMPT, num_inference_steps=4, guidance_scale=1.0, output_type="np")
        assert fast.stats["no_effect:cfg_cutoff"] == 1

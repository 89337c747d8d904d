"""The schedule length comes from public API only, and fraction-based optimizations refuse when it is unknown."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffspeed import DiffspeedError
from diffspeed.core import RunState
from diffspeed.core.state import schedule_length
from diffspeed.optim.cfg_cutoff import CfgCutoff
from diffspeed.optim.tgate import Tgate


class _NoProperty:
    """A pipeline that has not announced its schedule (no ``num_timesteps``) and a scheduler."""

    def __init__(self, timesteps=None, begin=None):
        self.scheduler = SimpleNamespace(timesteps=timesteps, begin_index=begin)


def test_public_num_timesteps_wins():
    pipe = SimpleNamespace(num_timesteps=7, scheduler=SimpleNamespace(timesteps=torch.arange(20)))
    assert schedule_length(pipe) == 7


def test_scheduler_timesteps_from_begin_index():
    assert schedule_length(_NoProperty(torch.arange(20))) == 20
    assert schedule_length(_NoProperty(torch.arange(20), begin=15)) == 5  # img2img starts late


def test_unknown_schedule_is_zero_and_refused():
    assert schedule_length(_NoProperty()) == 0
    state = RunState(step=0, total_steps=0, cfg=True, pipeline=_NoProperty())
    with pytest.raises(DiffspeedError, match="cfg_cutoff.fraction cannot be placed") as err:
        CfgCutoff(fraction=0.5).cutoff(state)
    assert err.value.field == "fraction"
    with pytest.raises(DiffspeedError, match="gate_fraction"):
        Tgate(gate_fraction=0.4).gate(state)


def test_step_indices_and_noop_fractions_need_no_schedule():
    state = RunState(step=0, total_steps=0, pipeline=_NoProperty())
    assert CfgCutoff(step=3).cutoff(state) == 3
    assert CfgCutoff(fraction=1.0).cutoff(state) > 10**6  # keeps guidance everywhere
    assert Tgate(gate_step=2).gate(state) == 2


def test_accelerated_counts_the_pipelines_schedule(tiny_sd):
    from diffspeed.core import Accelerated
    from diffspeed.optim.cfg_cutoff import CfgCutoffConfig

    with Accelerated(tiny_sd, [CfgCutoffConfig(fraction=0.5)]) as fast:
        fast("a red circle at center on a blue background", num_inference_steps=6, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        # PNDM makes 7 calls for 6 steps; guidance stops at ceil(0.5 * 7) = 4
        assert fast.stats["denoiser_calls"] == 7 and fast.stats["cfg_skipped_calls"] == 3

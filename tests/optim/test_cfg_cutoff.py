import numpy as np
import pytest

from diffspeed.core import Accelerated
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.sampler import SamplerConfig

from .contract import run


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_cutoff_one_is_exactly_the_baseline_and_half_halves_unconditional_evals(model, request):
    pipe = request.getfixturevalue(model)
    ddim = SamplerConfig(sampler="DDIM")  # one denoiser call per step (PNDM adds one)
    with Accelerated(pipe, [ddim]) as fast:
        baseline = run(fast, steps=10)
        assert fast.stats["unconditional_evals"] == 10
    with Accelerated(pipe, [ddim, CfgCutoffConfig(fraction=1.0)]) as fast:
        assert np.array_equal(run(fast, steps=10), baseline)
        assert fast.stats["unconditional_evals"] == 10
    with Accelerated(pipe, [ddim, CfgCutoffConfig(fraction=0.5)]) as fast:
        cut = run(fast, steps=10)
        assert fast.stats["unconditional_evals"] == 5 and fast.stats["cfg_skipped_calls"] == 5
    assert not np.array_equal(cut, baseline) and np.isfinite(cut).all()  # its fidelity cost: diffspeed bench


def test_step_overrides_fraction_and_batch_of_two_prompts(tiny_sd):
    with Accelerated(tiny_sd, [SamplerConfig(sampler="Euler"), CfgCutoffConfig(fraction=0.9, step=3)]) as fast:
        images = run(fast, steps=8)
    assert images.shape[0] == 2 and fast.stats["unconditional_evals"] == 3


def test_matches_a_pipeline_without_cfg_after_the_cutoff(tiny_sd):
    """Cutting at step 0 must equal running without guidance at all (guidance_scale 1)."""
    no_cfg = run(tiny_sd, steps=4, guidance_scale=1.0)
    with Accelerated(tiny_sd, [CfgCutoffConfig(fraction=0.0)]) as fast:
        cut = run(fast, steps=4)
    assert np.allclose(cut, no_cfg, atol=1e-5)


def test_second_order_sampler_counts_denoiser_calls(tiny_sd):
    """Heun calls the UNet twice per step; the cutoff works on calls, not on timestep lookups."""
    with Accelerated(tiny_sd, [SamplerConfig(sampler="Heun"), CfgCutoffConfig(fraction=0.5)]) as fast:
        run(fast, steps=4)
    calls = fast.stats["denoiser_calls"]
    assert calls == 7 and fast.stats["unconditional_evals"] == 4  # ceil(0.5 * 7)

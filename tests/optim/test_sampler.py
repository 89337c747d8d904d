import numpy as np
import pytest

from diffspeed.core import Accelerated
from diffspeed.optim.sampler import SamplerConfig
from diffspeed.pipelines.samplers import SAMPLERS

from .contract import run


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_name_runs(tiny_sd, name):
    with Accelerated(tiny_sd, [SamplerConfig(sampler=name, steps=3)]) as fast:
        assert type(tiny_sd.scheduler).__name__ == SAMPLERS[name].cls
        images = fast([ "a blue star at center on a white background"], output_type="np").images
    assert np.isfinite(images).all() and fast.stats["denoiser_calls"] >= 3


def test_default_steps_do_not_override_an_explicit_count(tiny_sd):
    with Accelerated(tiny_sd, [SamplerConfig(sampler="Euler", steps=3)]) as fast:
        run(fast, steps=5)
        assert fast.stats["denoiser_calls"] == 5

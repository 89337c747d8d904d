import numpy as np

from diffspeed.adapters import adapter_for
from diffspeed.core import Accelerated
from diffspeed.optim.freeu import FreeU, FreeUConfig

from .contract import run


def test_family_defaults(tiny_sd, tiny_sdxl):
    assert FreeU().values(tiny_sd) == {"s1": 0.9, "s2": 0.2, "b1": 1.5, "b2": 1.6}
    assert FreeU().values(tiny_sdxl) == {"s1": 0.9, "s2": 0.2, "b1": 1.3, "b2": 1.4}
    assert adapter_for(tiny_sdxl).family == "sdxl" and adapter_for(tiny_sd).family == "sd1"


def test_freeu_changes_the_image_and_sets_diffusers_attributes(tiny_sd):
    base = run(tiny_sd, steps=4)
    with Accelerated(tiny_sd, [FreeUConfig(b1=1.2)]) as fast:
        assert tiny_sd.unet.up_blocks[0].b1 == 1.2 and tiny_sd.unet.up_blocks[0].s2 == 0.2
        out = run(fast, steps=4)
    assert not hasattr(tiny_sd.unet.up_blocks[0], "b1")
    assert not np.array_equal(out, base)

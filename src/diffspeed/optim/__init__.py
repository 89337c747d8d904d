"""Every optimization, one file each; importing this package registers them all under their names."""

from diffspeed.optim import (  # noqa: F401
    attention,
    cfg_cutoff,
    channels_last,
    compile,
    deepcache,
    freeu,
    offload,
    precision,
    sampler,
    staged,
    tiny_vae,
    vae_slicing,
    vae_tiling,
)

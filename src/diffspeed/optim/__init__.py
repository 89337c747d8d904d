"""Every optimization, one file each; importing this package registers them all under their names."""

from diffspeed.optim import (  # noqa: F401
    accelerator,
    attention,
    cfg_cutoff,
    channels_last,
    compile,
    deepcache,
    freeu,
    hypertile,
    offload,
    openvino,
    precision,
    quantize,
    sampler,
    staged,
    tgate,
    tiny_vae,
    tome,
    vae_slicing,
    vae_tiling,
)

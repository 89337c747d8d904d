"""Bench plugin for ``tools/gpu_check.sh``: ``random:`` pipelines are built directly on the GPU.

:func:`diffspeed.bench.models.random_pipeline` initialises its random weights on the CPU, where torch's random
initialisers run on one core: about 16 ns per weight on the 2-core dev host (SD 1.5's UNet, 0.86 B weights, took
14 s with 1 and with 2 threads), so about a minute for SDXL's 3.5 B, and the bench pays it again in every entry's
process. Built under ``torch.device("cuda")`` the same initialisers run on the GPU in well under a second, which
is what lets ``gpu_check.sh`` bench SDXL at 1024² with every preset inside its 8 minutes.

What is measured does not change: the weights are as random either way (``random:`` reports only speed and
memory), the worker resets the CUDA peak after loading, and the entry's recipe or peer is applied to a pipeline
on the GPU, as the worker's ``pipe.to(device)`` leaves it. The scheduler is built again outside the device
context, so its tables are CPU tensors, as diffusers expects (it converts some with numpy).

Drop this file, and ``--plugin`` in gpu_check.sh, once ``random_pipeline`` builds on the target device itself.
"""

from __future__ import annotations

import functools

import torch

from diffspeed.bench import models

DEVICE = "cuda"  # where the weights are built (tests point it elsewhere)


def on_device(build):
    """``build`` (random_pipeline's signature) run under ``torch.device(DEVICE)`` when CUDA is there."""

    @functools.wraps(build)
    def random_pipeline(family: str, dtype=torch.float32, seed: int = 0):
        if not torch.cuda.is_available():
            return build(family, dtype, seed)
        with torch.device(DEVICE):
            pipe = build(family, dtype, seed)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        return pipe

    random_pipeline.built_on_device = True
    return random_pipeline


if not getattr(models.random_pipeline, "built_on_device", False):  # imported twice: wrapped once
    models.random_pipeline = on_device(models.random_pipeline)

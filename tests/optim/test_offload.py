"""offload: refused without CUDA; on a GPU the same images with less GPU memory, and remove() restores exactly.

The undo machinery is also checked here on the CPU, by running diffusers' model and group offloading with the
CPU as the execution device (pointless for speed, but the same hooks, slots and attributes get changed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffspeed import DiffspeedError
from diffspeed.core import Recipe, RecipeError
from diffspeed.optim.offload import MODES, NO_CUDA, Offload, OffloadConfig, Placement, enable

from .contract import assert_same, run, snapshot

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------------------ anywhere
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_refused_on_a_cpu_only_machine_with_a_clear_message(tiny_sd):
    assert Offload.requirements(OffloadConfig()) == [NO_CUDA]
    assert "CPU-only machine everything already lives in CPU memory" in NO_CUDA
    with pytest.raises(RecipeError, match="offload needs a CUDA device") as err:
        Recipe.of(OffloadConfig(mode="group")).validate(tiny_sd)
    assert err.value.problems == [f"offload: {NO_CUDA}"]
    with pytest.raises(DiffspeedError, match="offload needs a CUDA device"):
        Offload(mode="sequential").apply(tiny_sd)
    assert not any(hasattr(m, "_hf_hook") for m in tiny_sd.unet.modules())


def test_config_checks_name_the_field():
    with pytest.raises(DiffspeedError, match="cuda or cuda:N") as err:
        OffloadConfig(device="cpu")
    assert err.value.field == "device"
    with pytest.raises(DiffspeedError, match="only applies to mode 'group'") as err:
        OffloadConfig(mode="model", use_stream=True)
    assert err.value.field == "use_stream"
    assert OffloadConfig(mode="group", device="cuda:1", blocks_per_group=4, use_stream=True).blocks_per_group == 4
    assert "staged" in Offload.conflicts


@pytest.mark.parametrize("mode", ["model", "group"])
def test_undo_restores_every_slot_attribute_and_hook(tiny_sd, mode):
    before = snapshot(tiny_sd)
    baseline = run(tiny_sd, steps=2)
    placement = Placement(tiny_sd)
    enable(tiny_sd, mode, "cpu")
    try:
        hooked = [m for c in (tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder) for m in c.modules()
                  if hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook")]
        assert hooked
        assert np.array_equal(run(tiny_sd, steps=2), baseline)
    finally:
        placement.restore()
    assert_same(before, snapshot(tiny_sd))
    assert not any(hasattr(m, a) for c in tiny_sd.components.values() if isinstance(c, torch.nn.Module)
                   for m in c.modules() for a in ("_hf_hook", "_old_forward", "_diffusers_hook"))
    assert not any(k in vars(tiny_sd) for k in ("_offload_gpu_id", "_offload_device", "_all_hooks"))
    assert np.array_equal(run(tiny_sd, steps=2), baseline)


def test_undo_puts_back_parameters_that_sequential_offload_replaces():
    """accelerate's cpu_offload swaps every parameter for a new meta-device one (and edits the old ones'
    attributes); the original objects, values and attributes must come back."""
    from accelerate import cpu_offload

    class Pipe:  # the part of a pipeline Placement reads
        def __init__(self):
            self.components = {"net": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))}

    pipe = Pipe()
    net = pipe.components["net"]
    net[0].weight._is_hf_initialized = True
    params = list(net.parameters())
    values = [p.detach().clone() for p in params]
    placement = Placement(pipe)
    cpu_offload(net, execution_device="cpu")
    assert all(p.device.type == "meta" for p in net.parameters()) and hasattr(net, "_hf_hook")
    placement.restore()
    assert list(net.parameters()) == params and all(p.device.type == "cpu" for p in params)
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    assert net[0].weight._is_hf_initialized is True
    assert not hasattr(net, "_hf_hook") and "forward" not in vars(net) and "forward" not in vars(net[0])


# ---------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cuda_sd():
    import diffspeed

    pipe = diffspeed.load("tiny-sd", device="cuda", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cuda_peak(fn) -> tuple:
    from diffspeed.bench.memory import peak_memory

    torch.cuda.empty_cache()
    result = peak_memory(fn, device="cuda")
    return result["result"], result["peak_mb"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_gpu_same_images_less_memory_exact_restore(cuda_sd, mode):
    before = snapshot(cuda_sd)
    baseline, base_peak = _cuda_peak(lambda: run(cuda_sd))
    opt = Offload(mode=mode, use_stream=mode == "group").apply(cuda_sd)
    try:
        assert all(p.device.type != "cuda" for p in cuda_sd.unet.parameters())  # weights left the GPU
        images, peak = _cuda_peak(lambda: run(cuda_sd))
    finally:
        opt.remove()
    assert np.allclose(images, baseline, atol=1e-5), np.abs(images - baseline).max()
    assert peak < base_peak, (mode, peak, base_peak)
    assert all(p.device.type == "cuda" for p in cuda_sd.unet.parameters())
    assert_same(before, snapshot(cuda_sd))
    assert np.array_equal(run(cuda_sd), baseline)


@pytest.mark.gpu
@needs_cuda
def test_gpu_group_offload_blocks_per_group_and_requirements(cuda_sd):
    assert Offload.requirements(OffloadConfig(device=f"cuda:{torch.cuda.device_count()}"))
    assert Offload.requirements(OffloadConfig(), cuda_sd) == []
    opt = Offload(mode="group", blocks_per_group=2).apply(cuda_sd)
    try:
        assert Offload.requirements(OffloadConfig(), cuda_sd)  # already offloaded: refused
        run(cuda_sd, steps=2)
    finally:
        opt.remove()
    assert Offload.requirements(OffloadConfig(), cuda_sd) == []


import dataclasses
import warnings

import numpy as np
import pytest
import torch

from diffspeed import hardware
from diffspeed.core import Accelerated
from diffspeed.errors import DiffspeedError
from diffspeed.hardware import HardwareProfile, SlowDtypeWarning
from diffspeed.optim.precision import PrecisionConfig

from .contract import run


def test_bf16_everywhere_is_close_to_fp32(tiny_sd):
    base = run(tiny_sd, steps=6)
    with Accelerated(tiny_sd, [PrecisionConfig(unet="bf16", text_encoder="bf16", vae="bf16")]) as fast:
        assert tiny_sd.unet.dtype == torch.bfloat16
        low = run(fast, steps=6)
    assert tiny_sd.unet.dtype == torch.float32
    assert np.abs(low - base).mean() < 0.05


def test_mixed_dtypes_cross_component_boundaries(tiny_sdxl):
    """bf16 UNet with fp32 text encoders and VAE (the --no-half-vae set-up) runs and stays close."""
    base = run(tiny_sdxl, steps=4)
    with Accelerated(tiny_sdxl, [PrecisionConfig(unet="bf16")]) as fast:
        low = run(fast, steps=4)
    assert np.abs(low - base).mean() < 0.05


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_half_text_encoder_with_an_untouched_vae(fixture, request):
    """diffusers gives the latents the text encoder's dtype; the fp32 VAE must still decode them."""
    pipe = request.getfixturevalue(fixture)
    base = run(pipe, steps=4)
    with Accelerated(pipe, [PrecisionConfig(text_encoder="bf16")]) as fast:
        low = run(fast, steps=4)
        assert pipe.vae.dtype == torch.float32
    assert np.isfinite(low).all() and np.abs(low - base).mean() < 0.05


def test_originals_on_disk_restore_exactly_and_leave_no_file(tiny_sd, tmp_path):
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    config = PrecisionConfig(unet="bf16", vae="bf16", originals="disk", spill_dir=str(tmp_path))
    with Accelerated(tiny_sd, [config]) as fast:
        folders = list(tmp_path.glob("diffspeed-originals-*"))  # one per component, a file per tensor
        assert len(folders) == 2 and all(any(f.glob("*.pt")) for f in folders)
        assert tiny_sd.unet.dtype == torch.bfloat16
        assert np.isfinite(run(fast, steps=3)).all()
    after = tiny_sd.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].stride() == after[k].stride() for k in before)
    assert not list(tmp_path.iterdir())
    with pytest.raises(Exception, match="spill_dir"):
        Accelerated(tiny_sd, [PrecisionConfig(unet="bf16", originals="disk", spill_dir=str(tmp_path / "no"))])


def _plant_half_overflow(vae):
    """Make the VAE's decoder overflow only when it runs in half precision, like SD VAEs in fp16."""
    def hook(module, args, out):
        if out.dtype in (torch.float16, torch.bfloat16):
            return out * float("inf")
        return out
    return vae.decoder.mid_block.register_forward_hook(hook)


def test_nan_guard_redecodes_in_fp32(tiny_sd):
    handle = _plant_half_overflow(tiny_sd.vae)
    try:
        with Accelerated(tiny_sd, [PrecisionConfig(vae="bf16")]) as fast:
            images = run(fast, steps=3)
            assert fast.stats["vae_fp32_redecodes"] == 2
            assert any("re-decoded in fp32" in e for e in fast.events)
        assert np.isfinite(images).all()
        with Accelerated(tiny_sd, [PrecisionConfig(vae="bf16", nan_guard=False)]) as fast:
            unguarded = run(fast, steps=3)
        assert not np.isfinite(unguarded).all() or (unguarded == 0).mean() > 0.5
    finally:
        handle.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 flags matter on CUDA only")
@pytest.mark.gpu
def test_tf32_flags_restored():
    import diffspeed

    pipe = diffspeed.load("tiny-sd", device="cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    with Accelerated(pipe, [PrecisionConfig(tf32=not before)]):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    assert torch.backends.cuda.matmul.allow_tf32 is before


AVX2 = HardwareProfile("cpu", "AMD EPYC 7B12", "AVX2", ("avx2", "f16c"), cores=2, source="injected")


def test_bf16_weights_computed_in_fp32_halve_storage_and_restore(tiny_sd):
    """compute="fp32": the weights stay bf16 between layers (half the memory) while every layer runs in fp32."""
    base = run(tiny_sd, steps=4)
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    seen = []
    handle = tiny_sd.unet.conv_in.register_forward_hook(lambda m, a, out: seen.append((m.weight.dtype, out.dtype)))
    try:
        with Accelerated(tiny_sd, [PrecisionConfig(unet="bf16", vae="bf16", compute="fp32")]) as fast:
            low = run(fast, steps=4)
            for module in (tiny_sd.unet, tiny_sd.vae):  # the big weights are stored in bf16 between calls
                assert max(module.parameters(), key=lambda p: p.numel()).dtype == torch.bfloat16
    finally:
        handle.remove()
    assert seen and all(s == (torch.float32, torch.float32) for s in seen)  # upcast for the layer's forward
    after = tiny_sd.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert np.abs(low - base).mean() < 0.05


def test_compute_must_upcast_from_a_stored_dtype():
    with pytest.raises(DiffspeedError, match="precision.compute needs a stored dtype") as err:
        PrecisionConfig(compute="fp32")
    assert err.value.field == "compute"
    with pytest.raises(DiffspeedError, match="narrower"):
        PrecisionConfig(unet="fp32", compute="bf16")
    assert PrecisionConfig(unet="bf16", compute="fp32").compute_dtypes() == {"fp32"}
    assert PrecisionConfig(unet="bf16", vae="fp16").compute_dtypes() == {"bf16", "fp16"}


def test_explicit_bf16_where_it_is_slow_warns_once_with_the_ratio(tiny_sd, monkeypatch):
    measured = dataclasses.replace(AVX2, measured={"bf16": {"matmul": 176.0, "conv": 140.0}}, source="cache")
    monkeypatch.setattr(hardware, "detect", lambda device="cpu": measured)
    with pytest.warns(SlowDtypeWarning) as caught:
        with Accelerated(tiny_sd, [PrecisionConfig(unet="bf16", text_encoder="bf16", vae="bf16")]) as fast:
            assert tiny_sd.unet.dtype == torch.bfloat16  # applied all the same: it was asked for
            run(fast, steps=2)
    slow = [w for w in caught if issubclass(w.category, SlowDtypeWarning)]
    assert len(slow) == 1 and "\n" not in str(slow[0].message)
    assert "bf16 matmul 176x slower than fp32" in str(slow[0].message)
    monkeypatch.setattr(hardware, "detect", lambda device="cpu": AVX2)  # not probed: the flags speak
    with pytest.warns(SlowDtypeWarning, match="no native bf16"):
        Accelerated(tiny_sd, [PrecisionConfig(unet="bf16")]).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowDtypeWarning)  # fp32 compute of bf16 weights is not slow
        Accelerated(tiny_sd, [PrecisionConfig(unet="bf16", compute="fp32")]).remove()

"""tiny_vae: compatibility checks, exact undo, fewer decoder parameters; fidelity of the shipped model.

The fidelity tests use the shipped ``models/taesd-tiny`` (skipped until it is made by
``tools/train_tiny_taesd.py``), or the folder in ``DIFFSPEED_TAESD_DIR`` (to check a fresh training run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from diffspeed import DiffspeedError, Recipe
from diffspeed.core import Accelerated, RunState
from diffspeed.metrics import psnr
from diffspeed.optim import tiny_vae
from diffspeed.optim.tiny_vae import TinyVae, TinyVaeConfig
from diffspeed.tiny.data import training_batch

from .contract import assert_same, run, snapshot

TRAINED = Path(os.environ.get("DIFFSPEED_TAESD_DIR") or tiny_vae.DEFAULT_PATH)
# Floors from the shipped distillation (800 steps, tools/train_tiny_taesd.py), minus a margin; the card check
# below also holds the shipped model to its own numbers.
DECODER_PSNR_FLOOR = 27.0  # dB, tiny decode vs KL decode of the same latents (shipped: 29.85)
PIPELINE_PSNR_FLOOR = 13.0  # dB, images with the tiny VAE vs the baseline images, 10 steps (shipped: tiny-sd
# 14.7, tiny-sdxl 16.0): the UNets' latents lie off the encoder's posterior the decoder was distilled on

needs_trained = pytest.mark.skipif(not (TRAINED / "config.json").is_file(),
                                   reason=f"no distilled tiny VAE at {TRAINED} yet: run tools/train_tiny_taesd.py")


def _save_tiny(folder: Path, **overrides) -> str:
    """A small untrained AutoencoderTiny (4x, 4 latent channels unless overridden)."""
    cfg = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
               num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 0), latent_channels=4)
    torch.manual_seed(0)
    AutoencoderTiny(**{**cfg, **overrides}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("taesd-random"))


def _decoder_params(vae) -> int:
    return sum(p.numel() for p in vae.decoder.parameters()) + sum(
        p.numel() for p in getattr(vae, "post_quant_conv", torch.nn.Identity()).parameters())


# ------------------------------------------------------------------------------------- swap and undo
@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_swap_then_remove_restores_the_pipeline_exactly(model, request, random_tiny):
    pipe = request.getfixturevalue(model)
    vae, baseline = pipe.vae, run(pipe, steps=2)
    before = snapshot(pipe)
    opt = TinyVae(path=random_tiny).apply(pipe, RunState())
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.config["vae"][1] == "AutoencoderTiny"
    images = run(pipe, steps=2)
    assert images.shape == baseline.shape and np.isfinite(images).all()
    opt.remove()
    assert pipe.vae is vae
    assert_same(before, snapshot(pipe))
    assert np.array_equal(run(pipe, steps=2), baseline)


@needs_trained
def test_swap_cuts_the_decoder_parameters(tiny_sd):
    kl = _decoder_params(tiny_sd.vae)
    with Accelerated(tiny_sd, [TinyVaeConfig(path=str(TRAINED))]) as fast:
        assert _decoder_params(fast.vae) < 0.6 * kl


def test_img2img_encodes_with_the_tiny_encoder(tiny_sd, random_tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd)
    image = torch.rand(1, 3, 64, 64)
    with Accelerated(pipe, [TinyVaeConfig(path=random_tiny)]) as fast:
        out = fast("a red circle at center on a blue background", image=image, strength=0.5,
                   num_inference_steps=4, output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_half_precision_tiny_vae_takes_fp32_latents(tiny_sd, random_tiny):
    """precision(vae=...) applied first: the tiny VAE loads in that dtype and casts what it is handed."""
    from diffspeed.optim.precision import PrecisionConfig

    with Accelerated(tiny_sd, [PrecisionConfig(vae="bf16"), TinyVaeConfig(path=random_tiny)]) as fast:
        assert fast.vae.dtype == torch.bfloat16
        assert np.isfinite(run(fast, steps=2)).all()


# ------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize("overrides, says", [
    ({"latent_channels": 3}, "3 latent channels, the pipeline's VAE 4"),
    ({"decoder_block_out_channels": (8,) * 4, "num_decoder_blocks": (1, 1, 1, 0)}, "decoder upsamples 8x"),
    ({"encoder_block_out_channels": (8,) * 2, "num_encoder_blocks": (1, 1)}, "encoder downsamples 2x"),
])
def test_an_incompatible_tiny_vae_fails_naming_the_field(tiny_sd, tmp_path, overrides, says):
    path = _save_tiny(tmp_path / "bad", **overrides)
    before = snapshot(tiny_sd)
    with pytest.raises(DiffspeedError, match="tiny_vae.path") as err:
        TinyVae(path=path).apply(tiny_sd, RunState())
    assert says in str(err.value)
    assert any(says in p for p in Recipe.of(TinyVaeConfig(path=path)).check(tiny_sd))
    assert_same(before, snapshot(tiny_sd))


def test_a_kl_vae_folder_is_refused(tiny_sd):
    kl_folder = str(Path(tiny_sd.diffspeed_model.path) / "vae")
    with pytest.raises(DiffspeedError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        TinyVae(path=kl_folder).apply(tiny_sd, RunState())


def test_missing_folders_are_reported_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_vae, "DEFAULT_PATH", tmp_path / "not-shipped")
    assert "not shipped yet" in TinyVae.requirements(TinyVaeConfig())[0]
    assert "tiny_vae.path" in TinyVae.requirements(TinyVaeConfig(path=str(tmp_path)))[0]
    with pytest.raises(DiffspeedError, match="tiny_vae.path"):
        TinyVaeConfig(path=3)


def test_it_conflicts_with_vae_tiling():
    from diffspeed.optim.vae_tiling import VaeTilingConfig

    assert any("conflicts" in p for p in Recipe.of(VaeTilingConfig(), TinyVaeConfig(path="/x")).check())


# -------------------------------------------------------------------------------- fidelity (trained)
@needs_trained
def test_shipped_decoder_matches_its_card(tiny_sd):
    """Recompute the card's 'PSNR vs the KL decode' on the same 64 images (tools/train_tiny_taesd.py)."""
    info = json.loads((TRAINED / "training.json").read_text())
    card = info["evals"][-1]["psnr_vs_kl_decode"]
    tiny = AutoencoderTiny.from_pretrained(TRAINED, dtype=torch.float32)
    kl, sf = tiny_sd.vae, tiny_sd.vae.config.scaling_factor
    x = torch.from_numpy(training_batch(np.random.default_rng([info["config"]["seed"], 4]), 64, set())[0])
    with torch.no_grad():
        mean = kl.encode(x).latent_dist.mean
        got = psnr(tiny.decode(mean * sf).sample.clamp(-1, 1), kl.decode(mean).sample.clamp(-1, 1), data_range=2.0)
    assert got >= DECODER_PSNR_FLOOR
    assert abs(got - card) < 0.5, (got, card)  # fp16 weights vs the fp32 ones the card was measured with


@needs_trained
@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_images_stay_close_to_the_kl_decode(model, request):
    pipe = request.getfixturevalue(model)
    baseline = run(pipe, steps=10)
    with Accelerated(pipe, [TinyVaeConfig(path=str(TRAINED))]) as fast:
        images = run(fast, steps=10)
    assert psnr(images, baseline) >= PIPELINE_PSNR_FLOOR

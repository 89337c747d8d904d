"""The SDXL refiner pass with tiny-sdxl + tiny-sdxl-refiner: both modes run and count the refiner's UNet
calls, the refiner changes detail and not composition, and bad settings are clear errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffspeed
from diffspeed import DiffspeedError, GenerateRequest, accelerate, generate
from diffspeed.cli import main
from diffspeed.generate import _steps_after
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.pipelines.load import model_hash, shipped_path
from diffspeed.pipelines.samplers import get_sampler
from diffspeed.pipelines.workflows import load_refiner
from diffspeed.pngmeta import parse_parameters, read_parameters
from diffspeed.resolve import Resolver
from diffspeed.tiny.check import score_images, ssim
from diffspeed.tiny.data import held_out_scenes, training_batch

PROMPT = "a red circle at center on a blue background"
REFINER = "tiny-sdxl-refiner"
MIN_TRAINED_STEPS = 1000  # below this the shipped refiner is a smoke-trained stand-in

pytestmark = pytest.mark.skipif(not (shipped_path(REFINER) / "model_index.json").is_file(),
                                reason="tiny-sdxl-refiner comes from 'tools/train_tiny_extras.py refiner'")


def run(pipe, runner=None, resolver=None, **kw):
    kw.setdefault("steps", 10)
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("sampler", "Euler")
    return generate(pipe, GenerateRequest(**kw), progress=False, runner=runner, resolver=resolver)


def trained_steps() -> int:
    return json.loads((shipped_path(REFINER) / "training.json").read_text())["step"]


def needs_trained_refiner():
    if trained_steps() < MIN_TRAINED_STEPS:
        pytest.skip(f"{REFINER} has {trained_steps()} training steps (< {MIN_TRAINED_STEPS}): only a smoke-trained "
                    f"stand-in; the effect needs the real leg of tools/train_tiny_extras.py refiner")


@pytest.fixture(scope="module")
def base_only(tiny_sdxl):
    return run(tiny_sdxl, seed=1, batch_size=2).images


@pytest.mark.parametrize("mode", ["ensemble", "img2img"])
def test_refiner_modes_run_and_count_the_refiner_steps(tiny_sdxl, base_only, mode):
    with accelerate(tiny_sdxl, []) as fast:
        out = run(tiny_sdxl, runner=fast, seed=1, batch_size=2, refiner=REFINER, refiner_mode=mode)
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    sched = get_sampler("Euler").build(tiny_sdxl.scheduler.config)
    if mode == "ensemble":  # the base stops at the switch, the refiner does the remaining timesteps
        after = _steps_after(sched, 10, 0.8)
        assert after > 0
        assert out.stats["denoiser_calls"] == 10 - after and out.stats["refiner_denoiser_calls"] == after
    else:  # a full base image, then img2img at strength 1 - 0.8
        assert out.stats["denoiser_calls"] == 10 and out.stats["refiner_denoiser_calls"] == 2
    params = parse_parameters(out.parameters[0])
    assert params["Refiner"].startswith(f"{REFINER} [") and params["Refiner switch at"] == "0.8"
    assert ("Refiner mode" in params) == (mode == "img2img")


@pytest.mark.parametrize("mode", ["ensemble", "img2img"])
def test_refiner_changes_detail_not_composition(tiny_sdxl, base_only, mode):
    refined = run(tiny_sdxl, seed=1, batch_size=2, refiner=REFINER, refiner_mode=mode).images
    for a, b in zip(base_only, refined):
        assert not np.array_equal(np.asarray(a), np.asarray(b))
        assert ssim(a, b) > 0.8


def test_switch_at_one_is_the_base_image(tiny_sdxl, base_only):
    out = run(tiny_sdxl, seed=1, batch_size=2, refiner=REFINER, refiner_switch_at=1.0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base_only, out.images))
    assert "refiner_denoiser_calls" not in out.stats and "Refiner switch at: 1.0" in out.parameters[0]


def test_a_loaded_refiner_pipeline_gives_the_same_image(tiny_sdxl):
    by_name = run(tiny_sdxl, seed=2, refiner=REFINER).images[0]
    loaded = diffspeed.load(REFINER, device="cpu")
    sampler_before = loaded.scheduler
    resolver = Resolver()
    resolver.add("my-refiner", loaded)  # a request holds names only; a loaded pipeline is registered by name
    by_object = run(tiny_sdxl, seed=2, refiner="my-refiner", resolver=resolver).images[0]
    assert np.array_equal(np.asarray(by_name), np.asarray(by_object))  # the VAEs hold the same weights
    assert loaded.scheduler is sampler_before  # the sampler swap is undone


def test_refiner_shares_the_base_vae_and_identical_text_encoder(tiny_sdxl):
    refiner = load_refiner(REFINER, tiny_sdxl)
    assert refiner.vae is tiny_sdxl.vae and type(refiner).__name__ == "StableDiffusionXLImg2ImgPipeline"
    same = model_hash(shipped_path("tiny-sdxl") / "text_encoder_2") == model_hash(shipped_path(REFINER) /
                                                                                   "text_encoder_2")
    assert (refiner.text_encoder_2 is tiny_sdxl.text_encoder_2) == same
    assert refiner.text_encoder is None and refiner.unet.config.cross_attention_dim == 64


def test_refiner_with_a_recipe_on_the_base(tiny_sdxl):
    with accelerate(tiny_sdxl, [CfgCutoffConfig(fraction=0.5)]) as fast:
        out = run(tiny_sdxl, runner=fast, seed=3, refiner=REFINER)
    assert out.stats["cfg_skipped_calls"] > 0 and out.stats["refiner_denoiser_calls"] > 0


def test_trained_refiner_denoises_low_noise_at_least_as_well_as_the_base(tiny_sdxl):
    """The refiner is the expert for t < 400: its noise prediction there must not be worse than the base's."""
    needs_trained_refiner()
    from diffusers import DDPMScheduler

    refiner = load_refiner(REFINER, tiny_sdxl)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x, caps = training_batch(np.random.default_rng(77), 16, set())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lat = tiny_sdxl.vae.encode(torch.from_numpy(x)).latent_dist.sample(gen) * tiny_sdxl.vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 400, (16,), generator=gen)
        noisy = sched.add_noise(lat, noise, t)
        losses = []
        for pipe, ids in ((tiny_sdxl, [64, 64, 0, 0, 64, 64]), (refiner, [64, 64, 0, 0, 6.0])):
            emb, _, pooled, _ = pipe.encode_prompt(caps, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
            cond = {"text_embeds": pooled, "time_ids": torch.tensor([ids], dtype=emb.dtype).repeat(16, 1)}
            losses.append(F.mse_loss(pipe.unet(noisy, t, emb, added_cond_kwargs=cond).sample, noise).item())
    assert losses[1] <= losses[0] * 1.05


def test_trained_refiner_keeps_the_prompt(tiny_sdxl):
    needs_trained_refiner()
    scenes = held_out_scenes()[:8]
    images = []
    for i, s in enumerate(scenes):
        images += run(tiny_sdxl, prompt=s.caption(), seed=i, steps=20, refiner=REFINER).images
    base = [run(tiny_sdxl, prompt=s.caption(), seed=i, steps=20).images[0] for i, s in enumerate(scenes)]
    assert score_images(images, scenes).shape_accuracy >= score_images(base, scenes).shape_accuracy - 0.125


def test_refiner_needs_an_sdxl_base(tiny_sd):
    with pytest.raises(DiffspeedError, match="SDXL base") as err:
        run(tiny_sd, seed=1, refiner=REFINER)
    assert err.value.field == "refiner"


@pytest.mark.parametrize("kw, field", [
    (dict(refiner_switch_at=0.0), "refiner_switch_at"),
    (dict(refiner_switch_at=1.5), "refiner_switch_at"),
    (dict(refiner_mode="swap"), "refiner_mode"),
    (dict(refiner="/no/such/refiner"), "refiner"),
    (dict(refiner=REFINER, init_image=np.zeros((64, 64, 3), np.uint8)), "refiner"),
    (dict(refiner=REFINER, hires_scale=2.0), "refiner"),
])
def test_bad_refiner_settings_name_the_field(kw, field):
    with pytest.raises(DiffspeedError) as err:  # the request's own checks, then the resolver's pre-flight
        Resolver().check(GenerateRequest(prompt=PROMPT, **kw))
    assert err.value.field == field


def test_cli_refiner(tmp_path, capsys):
    rc = main(["generate", PROMPT, "--model", "tiny-sdxl", "--seed", "1", "--steps", "6", "--out", str(tmp_path),
               "--refiner", REFINER, "--refiner-switch-at", "0.6", "--refiner-mode", "img2img"])
    assert rc == 0
    meta = read_parameters(next(tmp_path.glob("*.png")))
    assert meta["Refiner switch at"] == "0.6" and meta["Refiner mode"] == "img2img"
    for args, field in ((["--refiner-switch-at", "2"], "refiner_switch_at"),
                        (["--refiner-mode", "x"], "refiner_mode"),
                        (["--refiner", str(tmp_path / "none")], "refiner"),
                        (["--model", "tiny-sd", "--refiner", REFINER], "refiner")):
        capsys.readouterr()
        rc = main(["generate", PROMPT, "--out", str(tmp_path / "bad"), "--steps", "2", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and field in err and "Traceback" not in err

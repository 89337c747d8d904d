"""The colour check itself, and a small version of the acceptance check on both shipped models."""

import numpy as np
import pytest

from diffspeed.tiny.check import run_colour_check, score_image, score_images
from diffspeed.tiny.data import Scene, Shape, held_out_scenes, render, training_batch


def test_ground_truth_scores_perfectly_and_wrong_captions_do_not():
    scenes = held_out_scenes(40)
    renders = [render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    assert score_images(renders, scenes).passes(1.0, 1.0)
    shifted = scenes[1:] + scenes[:1]  # every image scored against another prompt
    res = score_images(renders, shifted)
    assert res.background_accuracy < 0.3 and res.shape_accuracy < 0.3


def test_gradient_and_two_shapes():
    scene = Scene((Shape("red", "star", "top left"), Shape("white", "circle", "bottom")), ("blue", "yellow"))
    s = score_image(render(scene), scene)
    assert s.background_ok and s.shapes_ok == (True, True) and s.background_seen == "blue->yellow"


def test_held_out_prompts_never_in_training_data():
    held = {s.caption() for s in held_out_scenes()}
    _, caps = training_batch(np.random.default_rng(0), 2000, held, p_two=0.0, p_gradient=0.0)
    assert not held & set(caps)


@pytest.mark.parametrize("model, cfg", [("tiny_sd", 3.0), ("tiny_sdxl", 7.5)])
def test_models_follow_prompts(model, cfg, request):
    """12 held-out prompts, 15 steps (a quick version of the slow acceptance test below), floors well above
    chance (~11 % background, ~12 % shape) that the shipped weights exceed: measured tiny-sd 100 % / 58 %
    (CFG 3), tiny-sdxl 83 % / 75 % (CFG 7.5) after the text-encoder stage and the fine-tune.

    The acceptance bar (>= 80 % background, >= 40 % shape on 60 prompts) is the card stage of
    tools/train_tiny_models.py; its numbers per guidance scale are in the model cards.
    """
    pipe = request.getfixturevalue(model)
    res = run_colour_check(pipe, held_out_scenes()[:12], steps=15, seed=0, guidance_scale=cfg)
    assert res.background_accuracy >= 0.6 and res.shape_accuracy >= 0.45, res


# each shipped model's guidance scale for the acceptance bar (its card's sweep says why)
ACCEPTANCE_CFG = {"tiny-sd": 3.0, "tiny-sdxl": 10.0}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ACCEPTANCE_CFG))
def test_acceptance_bar_on_60_held_out_prompts(name):
    """The issue's bar, in full: 60 held-out prompts, seeds 0..59, the pipeline's own sampler (PNDM) at 25
    steps -- background colour right in >= 80 % of images, the shape colour at its position in >= 40 %."""
    import diffspeed

    pipe = diffspeed.load(name, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    res = run_colour_check(pipe, held_out_scenes(60), steps=25, seed=0, guidance_scale=ACCEPTANCE_CFG[name])
    assert res.passes(background=0.8, shape=0.4), res


def test_mask_matches_the_image_jitter():
    from diffspeed.tiny.check import mask_iou
    from diffspeed.tiny.data import render_mask, render_pair, training_batch_with_masks

    scene = Scene((Shape("red", "star", "top left"), Shape("white", "circle", "bottom")), ("blue",))
    image, mask = render_pair(scene, np.random.default_rng(3))
    assert np.array_equal(np.asarray(image), np.asarray(render(scene, np.random.default_rng(3))))
    assert np.array_equal(np.asarray(mask), np.asarray(render_mask(scene, np.random.default_rng(3))))
    assert mask_iou(image, mask) > 0.85 and mask_iou(image, render_mask(held_out_scenes(1)[0])) < 0.2
    x, caps = training_batch(np.random.default_rng(9), 8, set())
    x2, masks, scenes = training_batch_with_masks(np.random.default_rng(9), 8, set())
    assert np.array_equal(x, x2) and caps == [s.caption() for s in scenes]  # the same data stream
    assert masks.shape == (8, 1, 64, 64) and masks.min() == 0.0 and masks.max() == 1.0


def test_ssim():
    from diffspeed.tiny.check import ssim

    a = np.asarray(render(held_out_scenes(1)[0]))
    noisy = np.clip(a + np.random.default_rng(0).normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 0.2 < ssim(a, noisy) < 0.95 and ssim(a, noisy) > ssim(a, np.zeros_like(a))
    with pytest.raises(ValueError):
        ssim(a, a[:32])

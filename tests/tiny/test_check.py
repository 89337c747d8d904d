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


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_models_follow_prompts(model, request):
    """12 held-out prompts, floors well above chance (~11 % background, ~12 % shape) that the shipped weights
    measurably exceed (tiny-sd 25 % / 75 %, tiny-sdxl 33 % / 92 % after the first training leg).

    The acceptance bar (>= 80 % background, >= 40 % shape on 60 prompts) is the card stage of
    tools/train_tiny_models.py; the first leg does not reach it for backgrounds yet (see the model cards).
    """
    pipe = request.getfixturevalue(model)
    res = run_colour_check(pipe, held_out_scenes()[:12], steps=15, seed=0)
    assert res.background_accuracy >= 0.2 and res.shape_accuracy >= 0.5, res

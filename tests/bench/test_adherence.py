"""Prompt adherence in the bench (the colour check's background and shape accuracy of every entry's images),
``--adherence N`` (the held-out colour-check prompts as the queue), the model card's CFG as the default and
``--accelerator`` entries, which run at the accelerator's recommended steps / CFG / sampler while the baseline
keeps the bench's. One real bench on tiny-sd (64 px, 1 run, no warm-up) through the CLI; the rest is unit-level."""

import json
import math
import os

import pytest
from PIL import Image

from diffspeed.bench.queue import SEED001, TINY, colour_check_queue, scene_of, scenes_of
from diffspeed.bench.report import columns, markdown, summary_rows
from diffspeed.bench.runner import Entry, card_cfg, with_accelerator_settings
from diffspeed.cli import main
from diffspeed.tiny.check import score_images
from diffspeed.tiny.data import held_out_scenes, random_scene

THREADS = int(os.environ["DIFFSPEED_TEST_THREADS"])
BASE_STEPS = 6


def _lora() -> str:
    from diffspeed.pipelines.lora import resolve_lora_path

    # a real LoRA of tiny-sd's layers (not step-distilled): the bench only needs a file the accelerator can fuse
    return str(resolve_lora_path("tiny-sd-lora-monochrome"))


# ------------------------------------------------------------------------------------------------ unit level
def test_captions_parse_back_into_their_scenes():
    import numpy as np

    rng = np.random.default_rng(7)
    scenes = held_out_scenes() + [random_scene(rng, p_two=0.5, p_gradient=0.5) for _ in range(300)]
    assert all(scene_of(s.caption()) == s for s in scenes)
    assert all(scene_of(q.prompt) is not None for q in TINY)  # the tiny queue is colour-check captions
    assert scene_of(TINY[1].prompt).background == ("black", "gray")
    for text in ("an red circle at top on a blue background", "a red circle at top on a blue backdrop",
                 "a red hexagon at top on a blue background", SEED001[2].prompt, ""):
        assert scene_of(text) is None, text
    assert scenes_of(SEED001) is None and len(scenes_of(TINY)) == 4
    assert scenes_of([{"prompt": TINY[0].prompt, "seed": 1, "negative_prompt": "blur"}]) is None


def test_colour_check_queue_is_the_held_out_prompts_with_seeds_from_zero():
    queue = colour_check_queue(4)
    assert [q.prompt for q in queue] == [s.caption() for s in held_out_scenes()[:4]]
    assert [q.seed for q in queue] == [0, 1, 2, 3] and len(colour_check_queue()) == 60
    with pytest.raises(Exception, match="adherence"):
        colour_check_queue(61)


def test_card_cfg_reads_the_shipped_card_without_loading():
    assert card_cfg("tiny-sd") == (3.0, "model card")
    assert card_cfg("random:sd15") == (7.0, "default") and card_cfg("/no/such/model") == (7.0, "default")


def test_accelerator_entries_get_the_recommended_steps_cfg_and_sampler():
    lcm = with_accelerator_settings(Entry("a", "recipe", "--opt", {"optimization": [
        {"name": "attention", "backend": "math"}, {"name": "accelerator", "method": "lcm", "lora": "x.safetensors"}]}))
    assert lcm.settings == {"steps": 4, "cfg": 1.0, "sampler": "LCM"}
    tcd = with_accelerator_settings(Entry("t", "recipe", "", {"optimization": [{"name": "accelerator",
                                                                                "method": "tcd"}]}))
    assert tcd.settings == {"steps": 4, "cfg": 0.0, "sampler": "TCD"}
    hyper = with_accelerator_settings(Entry("h", "recipe", "", {"optimization": [
        {"name": "accelerator", "method": "hyper-sd", "lora": "Hyper-SD15-8steps-lora.safetensors"}]}))
    assert hyper.settings["steps"] == 8 and hyper.settings["sampler"] == "DDIM Trailing"
    own = with_accelerator_settings(Entry("o", "recipe", "", {"optimization": [
        {"name": "accelerator", "method": "lcm", "steps": 2, "cfg_scale": 1.5}]}, settings={"cfg": 2.0}))
    assert own.settings == {"steps": 2, "cfg": 2.0, "sampler": "LCM"}  # the entry's own settings win
    plain = Entry("p", "recipe", "", {"optimization": [{"name": "attention", "backend": "math"}]})
    bad = Entry("b", "recipe", "", {"optimization": [{"name": "accelerator", "method": "warp"}]})
    assert with_accelerator_settings(plain) is plain and with_accelerator_settings(bad) is bad


def _row(name, kind="recipe", status="ok", adherence=None, steps=20, cfg=3.0, sampler="DPM++ 2M"):
    return {"name": name, "kind": kind, "status": status, "error": None if status == "ok" else "x",
            "timing": {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "it_per_s": steps},
            "memory": {"peak_mb": 500.0}, "ratios": {"speed": 1.0, "memory": 1.0},
            "fidelity": {"psnr_db": math.inf, "ssim": 1.0}, "adherence": adherence, "derived": {},
            "sampling": {"steps": steps, "cfg": cfg, "sampler": sampler}}


def test_report_shows_adherence_or_a_dash_and_steps_only_when_they_differ():
    data = {"entries": [_row("baseline", "baseline", adherence={"background": 0.75, "shape": 0.5, "images": 4}),
                        _row("same")], "pareto": [], "settings": {}}
    rows = {r["name"]: r for r in summary_rows(data)}
    assert (rows["baseline"]["bg_acc"], rows["baseline"]["shape_acc"]) == ("75%", "50%")
    assert (rows["same"]["bg_acc"], rows["same"]["shape_acc"]) == ("-", "-")  # not measurable
    keys = [k for k, _ in columns(data)]
    assert {"bg_acc", "shape_acc", "psnr", "ssim"} <= set(keys) and "steps" not in keys
    data["entries"].append(_row("accelerator lcm", steps=4, cfg=1.0, sampler="LCM"))
    keys = [k for k, _ in columns(data)]
    assert keys[:4] == ["name", "steps", "cfg", "sampler"]
    assert keys.index("speed") < keys.index("bg_acc") and keys.index("ssim") < keys.index("bg_acc")


# ------------------------------------------------------------------------------------------ one real bench
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adherence")
    lora = _lora()
    code = main(["bench", "--adherence", "4", "--steps", str(BASE_STEPS), "--runs", "1", "--warmup", "0",
                 "--threads", str(THREADS), "--quiet", "--out", str(out), "--accelerator", "lcm",
                 "--accelerator-lora", lora, "--opt", f"accelerator:method=lcm,steps=2,lora={lora}"])
    assert code == 0
    return json.loads((out / "results.json").read_text()), out


def _by_name(data):
    return {e["name"]: e for e in data["entries"]}


def test_adherence_4_runs_4_held_out_prompts_at_the_cards_cfg(run):
    data, _ = run
    settings = data["settings"]
    assert [(q["prompt"], q["seed"]) for q in settings["queue"]] == [(s.caption(), i) for i, s in
                                                                     enumerate(held_out_scenes()[:4])]
    assert settings["cfg"] == 3.0 and settings["cfg_source"] == "model card"  # tiny-sd's card, not 7
    assert settings["adherence"] and settings["steps"] == BASE_STEPS
    assert [e["name"] for e in data["entries"]] == ["baseline", f"accelerator:method=lcm,steps=2,lora={_lora()}",
                                                    "accelerator lcm", "baseline again"]
    assert all(e["status"] == "ok" and len(e["images"]) == 4 for e in data["entries"])


def test_adherence_equals_the_colour_check_on_the_same_images(run):
    data, out = run
    scenes = held_out_scenes()[:4]
    for e in data["entries"]:
        images = [Image.open(out / p).convert("RGB") for p in e["images"]]
        score = score_images(images, scenes)
        assert e["adherence"] == {"background": score.background_accuracy, "shape": score.shape_accuracy,
                                  "images": 4}, e["name"]
    base = _by_name(data)["baseline"]["adherence"]
    assert base == _by_name(data)["baseline again"]["adherence"]  # the same images


def test_accelerator_runs_at_its_steps_and_cfg_while_the_baseline_keeps_the_benchs(run):
    data, out = run
    entries = _by_name(data)
    base, lcm = entries["baseline"], entries["accelerator lcm"]
    assert base["sampling"] == {"steps": BASE_STEPS, "cfg": 3.0, "sampler": "DPM++ 2M",
                                "scheduler": "DPMSolverMultistepScheduler"}
    assert base["derived"]["denoiser_calls_per_image"] == BASE_STEPS
    assert base["stats"]["unconditional_evals"] == base["stats"]["denoiser_calls"]  # CFG 3: guided
    assert lcm["sampling"] == {"steps": 4, "cfg": 1.0, "sampler": "LCM", "scheduler": "LCMScheduler"}
    assert lcm["settings"] == {"steps": 4, "cfg": 1.0, "sampler": "LCM"}
    assert lcm["derived"]["denoiser_calls_per_image"] == 4 and not lcm["stats"].get("unconditional_evals")
    assert lcm["timing"]["it_per_s"] == pytest.approx(4 / lcm["timing"]["median_s"])
    assert lcm["recipe"]["optimization"] == [{"name": "accelerator", "method": "lcm", "lora": _lora()}]
    assert lcm["fidelity"]["psnr_db"] < 60  # other weights, other steps: not the baseline's images
    opt = next(e for e in data["entries"] if e["source"] == "--opt")  # an --opt accelerator: the same treatment
    assert opt["sampling"]["steps"] == 2 and opt["sampling"]["cfg"] == 1.0 and opt["sampling"]["sampler"] == "LCM"
    assert opt["derived"]["denoiser_calls_per_image"] == 2
    md = (out / "report.md").read_text()
    assert "| background acc. | shape acc. |" in md and "| steps | CFG | sampler |" in md
    a = lcm["adherence"]
    assert "| accelerator lcm | 4 | 1 | LCM |" in md or "| **accelerator lcm** | 4 | 1 | LCM |" in md
    assert f"| {a['background']:.0%} | {a['shape']:.0%} |" in md
    assert "CFG 3 (the model card's)" in md and "prompt adherence: colour check" in md
    html = (out / "report.html").read_text()
    assert "background acc." in html


def test_report_without_adherence_shows_a_dash(run):
    from diffspeed.bench.report import load_results

    data = load_results(run[1])
    rows = [dict(e, adherence=None) for e in data["entries"]]
    text = markdown(dict(data, entries=rows, settings=dict(data["settings"], adherence=None)), {})
    assert "| - | - |" in text and "prompt adherence: not measured" in text


# ------------------------------------------------------------------------------------------ CLI parse errors
@pytest.mark.parametrize(("args", "field"), [
    (["--accelerator", "warp"], "accelerator: unknown method 'warp'"),
    (["--accelerator", "lcm:abc"], "accelerator: weight 'abc'"),
    (["--accelerator", "lcm:7"], "accelerator"),
    (["--accelerator-lora", "x.safetensors"], "accelerator-lora: give --accelerator"),
    (["--accelerator", "lcm", "--accelerator-lora", "nowhere.safetensors"], "accelerator-lora: no such file"),
    (["--adherence", "0"], "adherence"), (["--adherence", "61"], "adherence"),
    (["--adherence", "2", "--queue", "tiny"], "adherence: --adherence N is the queue"),
])
def test_bench_option_errors_are_one_line_before_anything_loads(tmp_path, capsys, monkeypatch, args, field):
    from diffspeed import cli

    monkeypatch.setattr(cli, "cmd_bench", lambda a: pytest.fail("the bench ran despite a bad option"))
    assert main(["bench", "--out", str(tmp_path / "b"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and "Traceback" not in err, err

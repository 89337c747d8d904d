import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from diffspeed.pngmeta import format_parameters, parse_parameters, read_parameters, save_png

PARAMS = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.5, "Seed": 42, "Size": "64x64",
          "Model hash": "0123456789", "Model": "tiny-sd", "Version": "diffspeed 0.1.0"}


def test_png_round_trip(tmp_path):
    text = format_parameters("a red circle at top left on a blue background", "blurry, ugly", PARAMS)
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", text)
    got = read_parameters(path)
    assert got["prompt"] == "a red circle at top left on a blue background"
    assert got["negative_prompt"] == "blurry, ugly"
    assert got == {"prompt": got["prompt"], "negative_prompt": got["negative_prompt"],
                   **{k: str(v) for k, v in PARAMS.items()}}


def test_web_ui_layout():
    text = format_parameters("cat", "", {"Steps": 20, "Sampler": "Euler a", "Seed": 1})
    assert text == "cat\nSteps: 20, Sampler: Euler a, Seed: 1"


@given(prompt=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1).filter(
           lambda s: s.strip() == s and not s.startswith("Negative prompt:") and ":" not in s),
       neg=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20).filter(lambda s: s.strip() == s),
       model=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(
           lambda s: s.strip() == s))
def test_round_trip_any_text(prompt, neg, model):
    got = parse_parameters(format_parameters(prompt, neg, {"Steps": 3, "Model": model, "Seed": 7}))
    assert (got["prompt"], got["negative_prompt"], got["Model"], got["Seed"]) == (prompt, neg, model, "7")


# text built from the pieces that can confuse the layout, mixed with arbitrary characters
TRICKY = st.lists(st.one_of(
    st.sampled_from(["Negative prompt:", "Negative prompt: x", "\n", "\r", '"', "Steps: 1, Seed: 2", ", ", ":", " ",
                     "\\", "a", "\u2028", "\x1c"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)), max_size=8).map("".join)


@given(prompt=TRICKY, neg=TRICKY, value=TRICKY, with_params=st.booleans())
def test_round_trip_any_prompt_negative_and_value(prompt, neg, value, with_params):
    params = {"Steps": 3, "Model": value, "Seed": 7} if with_params else {}
    got = parse_parameters(format_parameters(prompt, neg, params))
    assert got == {"prompt": prompt, "negative_prompt": neg, **{k: str(v) for k, v in params.items()}}


def test_negative_prompt_line_inside_a_prompt_stays_in_the_prompt(tmp_path):
    prompt = "a cat\nNegative prompt: dogs"
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", format_parameters(prompt, "", PARAMS))
    got = read_parameters(path)
    assert got["prompt"] == prompt and got["negative_prompt"] == ""


def test_only_prompts_the_layout_cannot_carry_are_quoted():
    assert format_parameters("a cat, oil: painting", "", {"Seed": 1}).split("\n")[0] == "a cat, oil: painting"
    assert format_parameters("style: anime", "", {}) == '"style: anime"'  # alone it would read as settings
    assert format_parameters('"quoted"', "", {"Seed": 1}).startswith('"\\"quoted\\""')
    assert format_parameters("a", "b\nNegative prompt: c", {}) == 'a\nNegative prompt: "b\\nNegative prompt: c"'


def test_sd_parsers_reads_diffspeeds_png(tiny_sd, tmp_path):
    """A third-party reader of the web UI's infotext gets the settings from a real diffspeed PNG, recipe and
    LoRA entries included (whose JSON it cannot read, but which must not derail the rest)."""
    sd_parsers = pytest.importorskip("sd_parsers")
    from diffspeed import GenerateRequest, accelerate, generate, save_images
    from diffspeed.optim.cfg_cutoff import CfgCutoffConfig

    request = GenerateRequest(prompt="a red circle, at top left", negative_prompt="green, blurry", seed=11, steps=2,
                              sampler="Euler a", cfg_scale=4.5)
    with accelerate(tiny_sd, [CfgCutoffConfig(fraction=0.5)]) as fast:
        path = save_images(generate(tiny_sd, request, runner=fast, progress=False), tmp_path)[0]
    info = sd_parsers.ParserManager().parse(path)
    sampler = info.samplers[0]
    assert [p.value for p in sampler.prompts] == ["a red circle, at top left"]
    assert [p.value for p in sampler.negative_prompts] == ["green, blurry"]
    assert sampler.name == "Euler a" and sampler.model.name == "tiny-sd"
    assert {k: sampler.parameters[k] for k in ("seed", "steps", "cfg_scale")} == {"seed": "11", "steps": "2",
                                                                                  "cfg_scale": "4.5"}


def test_whitespace_ending_the_negative_prompts_first_line_round_trips():
    """Found by hypothesis: U+2028 (whitespace to str.strip) ending the negative prompt's first line was eaten."""
    for neg in ("0\u2028\n\"", "a \nb", "x\t\ny"):
        text = format_parameters("p", neg, PARAMS)
        assert parse_parameters(text)["negative_prompt"] == neg, repr(neg)

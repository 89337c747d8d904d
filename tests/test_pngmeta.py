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

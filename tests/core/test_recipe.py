import json

import pytest

from diffspeed.core import Recipe, RecipeError
from diffspeed.optim.attention import AttentionConfig
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.freeu import FreeUConfig
from diffspeed.optim.sampler import SamplerConfig

RECIPE = Recipe.of(SamplerConfig(sampler="DPM++ 2M Karras", steps=12), CfgCutoffConfig(fraction=0.4),
                   FreeUConfig(b1=1.2), AttentionConfig(backend="sliced", slice_size=2), name="mixed",
                   description="a bit of everything")


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_round_trip(tmp_path, suffix):
    path = RECIPE.save(tmp_path / f"r{suffix}")
    assert Recipe.load(path) == RECIPE


def test_toml_is_human_shaped(tmp_path):
    text = RECIPE.save(tmp_path / "r.toml").read_text()
    assert "[[optimization]]" in text and 'name = "cfg_cutoff"' in text and "fraction = 0.4" in text


def test_three_errors_are_all_reported(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"optimizations": [
        {"name": "warp_drive"},
        {"name": "cfg_cutoff", "fraction": 1.5},
        {"name": "freeu", "b1": 1.1, "colour": "red"},
    ]}))
    with pytest.raises(RecipeError) as err:
        Recipe.load(path)
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert "warp_drive" in problems[0] and "cfg_cutoff.fraction" in problems[1] and "'colour'" in problems[2]
    assert str(path) in str(err.value) and "3 problems" in str(err.value)


def test_duplicates_and_requirements_are_reported():
    data = {"optimization": [{"name": "freeu"}, {"name": "freeu"},
                             {"name": "attention", "backend": "xformers"}]}
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(data)
    text = " | ".join(err.value.problems)
    assert "freeu appears 2 times" in text and "xformers" in text


def test_unreadable_files(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(Exception, match="not valid TOML"):
        Recipe.load(bad)
    with pytest.raises(Exception, match="cannot read"):
        Recipe.load(tmp_path / "missing.toml")

import json
import time

import pytest

from diffspeed.core import Recipe, RecipeError
from diffspeed.core.recipe import MAX_FILE_BYTES, MAX_OPTIMIZATIONS
from diffspeed.errors import DiffspeedError
from diffspeed.optim.attention import AttentionConfig
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.freeu import FreeUConfig
from diffspeed.optim.hypertile import HyperTileConfig
from diffspeed.optim.sampler import SamplerConfig
from diffspeed.optim.tome import TomeConfig

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


def _load_error(path) -> str:
    with pytest.raises(DiffspeedError) as err:
        Recipe.load(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    return text


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    assert "not UTF-8" in _load_error(path) and "byte offset 11" in _load_error(path)


@pytest.mark.parametrize(("suffix", "text"), [(".toml", "x = " + "[" * 100_000), (".json", "[" * 100_000),
                                              (".json", '{"a": ' * 100_000)])
def test_deep_nesting_is_one_line(tmp_path, suffix, text):
    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    assert "nests brackets too deeply" in _load_error(path)


def test_size_and_entry_caps(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    assert "larger than 1 MB" in _load_error(big)
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"optimizations": [{"name": "freeu"}] * (MAX_OPTIMIZATIONS + 1)}))
    assert f"at most {MAX_OPTIMIZATIONS}" in _load_error(many)


def test_name_must_be_a_string():
    with pytest.raises(RecipeError, match="needs a 'name'"):
        Recipe.from_dict({"optimization": [{"name": ["freeu"]}]})


def test_conflicts_reported_once_in_recipe_order():
    problems = Recipe.of(HyperTileConfig(), TomeConfig(), TomeConfig()).check()
    conflicts = [p for p in problems if "conflicts" in p]
    assert len(conflicts) == 1 and conflicts[0].startswith("hypertile conflicts with tome: "), problems


def test_check_is_linear_in_the_recipe_length():
    # the pairwise scan this guards against took 8 s for 13,440 entries on a 2-core machine; linear takes ~10 ms
    configs = [cls() for cls in (FreeUConfig, CfgCutoffConfig, TomeConfig, HyperTileConfig)] * 5000
    start = time.perf_counter()
    problems = Recipe(tuple(configs)).check()
    assert time.perf_counter() - start < 2.0
    assert sum("appears 5000 times" in p for p in problems) == 4

"""ModelCache: hits rebuild from RAM, LRU by count and bytes, edits are misses, callers never share state."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

import diffspeed
from diffspeed.errors import DiffspeedError
from diffspeed.pipelines import cache as cache_module
from diffspeed.pipelines.cache import ModelCache, fresh_copy, pipeline_bytes
from diffspeed.pipelines.load import shipped_path
from diffspeed.pipelines.single_file import export_single_file, original_state_dict


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a yellow star at center", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(3)).images


@pytest.fixture(scope="module")
def baseline(tiny_sd):
    return _image(tiny_sd)


def _refuse_disk(monkeypatch):
    """From here on any load from disk fails: a hit must not need one."""

    def refuse(*args, **kwargs):
        raise AssertionError("the cache read the disk on a hit")

    monkeypatch.setattr(cache_module, "_load", refuse)


def test_hit_rebuilds_from_ram_and_draws_the_same_image(baseline, monkeypatch):
    cache = ModelCache()
    first = cache.get("tiny-sd", device="cpu")
    _refuse_disk(monkeypatch)
    second = cache.get("tiny-sd", device="cpu")

    assert cache.stats.hits == 1 and cache.stats.misses == 1 and cache.stats.models == 1
    assert cache.stats.bytes_held == pipeline_bytes(first) > 0
    assert second is not first and second.unet is not first.unet and second.tokenizer is not first.tokenizer
    first_storages = {p.untyped_storage().data_ptr() for p in first.unet.parameters()}
    assert not first_storages & {p.untyped_storage().data_ptr() for p in second.unet.parameters()}
    assert second.diffspeed_model == first.diffspeed_model and second.diffspeed_model.kind == "shipped"
    np.testing.assert_array_equal(_image(second), baseline)
    np.testing.assert_array_equal(_image(first), baseline)


def test_load_takes_a_cache(monkeypatch):
    cache = ModelCache(max_models=1)
    diffspeed.load("tiny-sd", device="cpu", cache=cache)
    _refuse_disk(monkeypatch)
    pipe = diffspeed.load("tiny-sd", device="cpu", cache=cache)
    assert cache.stats.hits == 1 and pipe.diffspeed_model.name == "tiny-sd"


def test_a_caller_cannot_change_what_the_next_caller_gets(tiny_sd, baseline):
    cache = ModelCache()
    mine = cache.get("tiny-sd", device="cpu")
    with torch.no_grad():
        mine.unet.conv_in.weight.add_(1.0)
    mine.unet.register_forward_hook(lambda module, args, output: output * 0)
    mine.scheduler = EulerDiscreteScheduler.from_config(mine.scheduler.config)
    mine.tokenizer.add_tokens(["<my-embedding>"])
    mine.text_encoder.resize_token_embeddings(len(mine.tokenizer))
    with diffspeed.accelerate(mine, diffspeed.Recipe.from_dict({"optimization": [{"name": "cfg_cutoff"}]})):
        theirs = cache.get("tiny-sd", device="cpu")

    assert cache.stats.hits == 1
    assert type(theirs.scheduler) is type(tiny_sd.scheduler) and len(theirs.tokenizer) == len(tiny_sd.tokenizer)
    assert not theirs.unet._forward_hooks
    assert theirs.text_encoder.get_input_embeddings().num_embeddings == len(tiny_sd.tokenizer)
    np.testing.assert_array_equal(_image(theirs), baseline)


def test_copied_tokenizers_are_equal_and_independent(tiny_sdxl):
    """Fast tokenizers are rebuilt around the shared vocabulary instead of re-serialized (10x faster)."""
    copied = fresh_copy(tiny_sdxl)
    for name in ("tokenizer", "tokenizer_2"):
        mine, theirs = getattr(tiny_sdxl, name), getattr(copied, name)
        assert theirs is not mine and theirs._tokenizer is not mine._tokenizer
        assert theirs._tokenizer.to_str() == mine._tokenizer.to_str()
        prompt = ["a photo of a cat, 4k!", "<|endoftext|> x"]
        assert (theirs(prompt, padding="max_length", truncation=True).input_ids
                == mine(prompt, padding="max_length", truncation=True).input_ids)
        theirs.add_tokens(["<only-mine>"])
        assert len(theirs) == len(mine) + 1 and "<only-mine>" not in mine.get_vocab()


def test_eviction_by_count_is_least_recently_used():
    cache = ModelCache(max_models=2)
    # a third model (tiny-sd in bf16) evicts tiny-sdxl, the least recently used
    for name, dtype in (("tiny-sd", None), ("tiny-sdxl", None), ("tiny-sd", None), ("tiny-sd", "bf16")):
        cache.get(name, device="cpu", dtype=dtype)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions, len(cache)) == (1, 3, 1, 2)
    cache.get("tiny-sd", device="cpu")
    assert cache.stats.hits == 2
    cache.get("tiny-sdxl", device="cpu")
    assert cache.stats.misses == 4 and cache.stats.evictions == 2


def test_eviction_by_bytes(tiny_sd, tiny_sdxl):
    sizes = pipeline_bytes(tiny_sd), pipeline_bytes(tiny_sdxl)
    cache = ModelCache(max_models=8, max_bytes=max(sizes))  # either fits, both do not
    cache.get("tiny-sd", device="cpu")
    cache.get("tiny-sdxl", device="cpu")
    stats = cache.stats
    assert (stats.evictions, stats.models, stats.bytes_held) == (1, 1, sizes[1])
    cache.clear()
    assert (cache.stats.models, cache.stats.bytes_held, len(cache)) == (0, 0, 0)


def test_a_model_larger_than_max_bytes_is_served_but_not_kept():
    cache = ModelCache(max_bytes=1000)
    with pytest.warns(UserWarning, match="not kept"):
        pipe = cache.get("tiny-sd", device="cpu")
    assert pipe.unet is not None and cache.stats.models == 0 and cache.stats.bytes_held == 0


def test_dtype_is_part_of_the_key():
    cache = ModelCache()
    cache.get("tiny-sd", device="cpu")
    half = cache.get("tiny-sd", device="cpu", dtype="bf16")
    assert cache.stats.misses == 2 and half.unet.dtype == torch.bfloat16
    assert cache.get("tiny-sd", device="cpu", dtype="bfloat16").unet.dtype == torch.bfloat16
    assert cache.stats.hits == 1


def test_an_edited_file_is_a_miss(tiny_sd, tmp_path):
    path = export_single_file(tiny_sd, tmp_path / "model.safetensors")
    cache = ModelCache()
    cache.get(path, device="cpu", config_dir=shipped_path("tiny-sd"))
    cache.get(path, device="cpu", config_dir=shipped_path("tiny-sd"))
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)

    from safetensors.torch import save_file

    state = {k: v.detach().clone() for k, v in original_state_dict(tiny_sd).items()}
    state["model.diffusion_model.out.2.bias"] += 1.0
    save_file(state, str(path), metadata={"format": "pt"})
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse-mtime file systems
    edited = cache.get(path, device="cpu", config_dir=shipped_path("tiny-sd"))

    assert (cache.stats.hits, cache.stats.misses) == (1, 2)
    assert cache.stats.models == 1 and cache.stats.evictions == 1  # the stale entry is gone
    assert torch.equal(edited.unet.conv_out.bias, tiny_sd.unet.conv_out.bias + 1.0)


def test_a_cached_pickle_is_still_refused_without_allow_pickle(tiny_sd, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: v.clone() for k, v in original_state_dict(tiny_sd).items()}}, path)
    cache = ModelCache()
    cache.get(path, device="cpu", allow_pickle=True, config_dir=shipped_path("tiny-sd"))
    with pytest.raises(DiffspeedError, match="allow_pickle=True") as err:
        cache.get(path, device="cpu", config_dir=shipped_path("tiny-sd"))
    assert err.value.field == "allow_pickle"


def test_missing_model_is_the_usual_error():
    cache = ModelCache()
    with pytest.raises(DiffspeedError, match="no such file or folder") as err:
        cache.get("missing.safetensors", device="cpu")
    assert err.value.field == "model" and cache.stats.misses == 0


@pytest.mark.parametrize(("kwargs", "field", "match"), [
    ({"max_models": 0}, "max_models", r"\[1, 64\]"), ({"max_models": 65}, "max_models", r"\[1, 64\]"),
    ({"max_models": 2.5}, "max_models", "int"), ({"max_models": True}, "max_models", "int"),
    ({"max_bytes": 0}, "max_bytes", "positive"), ({"max_bytes": -5}, "max_bytes", "positive"),
    ({"max_bytes": 1.5e9}, "max_bytes", "positive int"), ({"max_bytes": True}, "max_bytes", "positive"),
])
def test_bad_parameters(kwargs, field, match):
    with pytest.raises(DiffspeedError, match=match) as err:
        ModelCache(**kwargs)
    assert err.value.field == field and field in str(err.value)

"""The search space: built from the registry, pruned by validation, device and workload; the memory estimate."""

from __future__ import annotations

import random

import pytest

from diffspeed.core import Recipe
from diffspeed.presets import load_preset
from diffspeed.tune.estimate import footprint
from diffspeed.tune.space import (
    WORKFLOW,
    Context,
    build_space,
    candidate_from_tables,
    candidate_of,
    choice,
)

CPU_BF16 = Context(fast_dtypes=("fp32", "bf16"), width=64, height=64)


def names(space) -> list[str]:
    return [d.name for d in space.dimensions]


def skipped(space) -> dict:
    return dict(space.skipped)


def test_a_few_values_per_knob_from_the_registry():
    space = build_space(CPU_BF16)
    labels = {d.name: [c.table for c in d.choices] for d in space.dimensions}
    assert [t["interval"] for t in labels["deepcache"]] == [2, 3, 4, 5]
    assert [t["fraction"] for t in labels["cfg_cutoff"]] == [0.5, 0.7, 0.9]
    assert labels["precision"] == [{"name": "precision", "unet": "bf16", "vae": "bf16", "originals": "disk"}]
    assert 30_000 < sum(1 for _ in space.enumerate()) < space.size()  # pairs pruned, nothing else


def test_precision_follows_the_device():
    fp32_cpu = build_space(Context(fast_dtypes=("fp32",), width=64, height=64))
    (p,) = [d for d in fp32_cpu.dimensions if d.name == "precision"]
    assert [c.table.get("compute") for c in p.choices] == ["fp32"]  # bf16 storage only: no slow bf16 compute
    gpu = Context(device="cuda", fast_dtypes=("fp32", "bf16", "fp16"), load_dtype="fp16")
    from diffspeed.tune.space import grid

    values, _ = grid("precision", gpu)
    assert values == [{"unet": "bf16", "text_encoder": "bf16", "vae": "bf16"}]  # fp16 is what it loads already


def test_include_exclude_and_opt_in():
    space = build_space(CPU_BF16, include=("deepcache", "cfg_cutoff"))
    assert names(space) == ["deepcache", "cfg_cutoff"]
    space = build_space(CPU_BF16, exclude=("tome", "staged"))
    assert "tome" not in names(space) and skipped(space)["tome"] == "--exclude"
    why = skipped(build_space(CPU_BF16))
    for opt_in in ("sampler", "accelerator", "freeu", "compile", "openvino"):
        assert why[opt_in].startswith("opt-in") and f"--include {opt_in}" in why[opt_in]
    assert "CUDA" in why["offload"] and "one image per call" in why["vae_slicing"]


def test_workload_prunes_what_would_stand_aside():
    few = build_space(Context(fast_dtypes=("fp32",), steps=6, cfg=1.0, width=64, height=64))
    why = skipped(few)
    assert "deepcache" not in names(few) and "min_steps" in why["deepcache"] and "min_steps" in why["tgate"]
    assert "no guidance" in why["cfg_cutoff"]
    assert "tiny_vae" not in names(build_space(Context(model="random:sd15", width=256, height=256)))


def test_requirements_prune_choices():
    from diffspeed.optim.quantize import _torchao_problem

    space = build_space(CPU_BF16, include=("quantize",))
    methods = [c.table["method"] for d in space.dimensions for c in d.choices]
    assert ("int8_weight_only" in methods) == (_torchao_problem() is None)


def test_the_last_rule_and_clashes_are_respected():
    space = build_space(CPU_BF16, include=("compile", "deepcache", "cfg_cutoff"))
    assert names(space) == ["deepcache", "cfg_cutoff", "compile"]
    whole, regional = [c for d in space.dimensions if d.name == "compile" for c in d.choices]
    dc = space.dimensions[0].choices[0]
    assert not space.compatible(dc, whole) and space.compatible(dc, regional)  # deepcache needs regional compile
    cand = candidate_of([regional, dc])
    assert [c.name for c in cand.choices] == ["deepcache", "compile"]  # compile last, whatever the order given
    assert Recipe.from_dict(cand.recipe_dict()).check(workflow=WORKFLOW) == []


def test_every_grid_point_passes_recipe_validation():
    space = build_space(CPU_BF16)
    assert {frozenset(("tome", "hypertile")), frozenset(("tiny_vae", "vae_tiling"))} <= {
        frozenset(c.name for d in space.dimensions for c in d.choices if c.key in pair) for pair in space.incompatible}
    for idx in space.sample(random.Random(0), 300):
        cand = space.of_indices(idx)
        assert Recipe.from_dict(cand.recipe_dict()).check(workflow=WORKFLOW) == [], cand.label


def test_keys_are_canonical():
    """A preset and a grid point with the same settings are one candidate, whatever the order or defaults."""
    preset = load_preset("fastest")
    from_preset = candidate_from_tables(preset.entries["cpu-fp32"], "preset fastest")
    grid = candidate_of([choice("cfg_cutoff", fraction=0.75), choice("deepcache", interval=3)])
    assert from_preset.key == grid.key and from_preset.label == "deepcache(interval=3) + cfg_cutoff(fraction=0.75)"
    assert choice("deepcache").key == choice("deepcache", interval=3).key


def test_memory_estimate():
    sd15 = footprint("random:sd15")
    base = sd15.estimate_mb([], width=512, height=512)
    assert 3500 < base < 7000  # fp32 weights (4.2 GB) + runtime + activations
    bf16 = [{"name": "precision", "unet": "bf16", "vae": "bf16", "originals": "disk"}]
    assert sd15.estimate_mb(bf16, width=512, height=512) < 0.7 * base
    kept = [{"name": "precision", "unet": "bf16", "vae": "bf16"}]  # originals kept in RAM: more, not less
    assert sd15.estimate_mb(kept, width=512, height=512) > base
    assert sd15.estimate_mb([{"name": "staged"}], width=512, height=512) < base
    big = sd15.estimate_mb([], width=1024, height=1024)
    assert sd15.estimate_mb([{"name": "vae_tiling", "tile_size": 256}], width=1024, height=1024) < big
    cuda = sd15.estimate_mb([], width=512, height=512, device="cuda")
    assert sd15.estimate_mb([{"name": "offload", "mode": "sequential"}], width=512, height=512,
                            device="cuda") < 0.3 * cuda
    tiny = footprint("tiny-sd")
    assert tiny.params["unet"] > 1e6 and tiny.native_size() == 64
    assert tiny.estimate_mb([]) == pytest.approx(tiny.estimate_mb([]))  # deterministic, file headers only

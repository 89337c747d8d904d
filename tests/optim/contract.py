"""Helpers for the contract every optimization must keep (used by test_contract.py)."""

from __future__ import annotations

import numpy as np
import torch

PROMPT = "a red circle at top left and a yellow star at center on a blue background"


def run(pipe, steps: int = 4, seed: int = 0, **kw) -> np.ndarray:
    kw.setdefault("guidance_scale", 7.5)
    out = pipe([PROMPT, "a green square at bottom right on a white background"], num_inference_steps=steps,
               generator=[torch.Generator().manual_seed(seed + i) for i in range(2)], output_type="np", **kw)
    return out.images


def _modules(pipe):
    return {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def snapshot(pipe) -> dict:
    """Everything an optimization could leave behind: tensors (values, dtype, layout), attention processor
    objects, instance attributes of every submodule, the scheduler, the pipeline config and TF32 flags."""
    snap = {"tensors": {}, "processors": {}, "attrs": {}, "scheduler": pipe.scheduler,
            "config": dict(pipe.config), "tf32": (torch.backends.cuda.matmul.allow_tf32,
                                                  torch.backends.cudnn.allow_tf32)}
    for name, model in _modules(pipe).items():
        for k, t in [*model.state_dict(keep_vars=True).items()]:
            snap["tensors"][f"{name}.{k}"] = (t, t.data.dtype, t.data.stride(), t.data.clone())
        if hasattr(model, "attn_processors"):
            snap["processors"][name] = dict(model.attn_processors)
        for sub_name, sub in model.named_modules():
            snap["attrs"][f"{name}.{sub_name}"] = {k: v for k, v in vars(sub).items()
                                                   if not k.startswith("_") or k == "_forward_hooks"}
    return snap


def assert_same(before: dict, after: dict) -> None:
    assert before["scheduler"] is after["scheduler"]
    assert before["config"] == after["config"]
    assert before["tf32"] == after["tf32"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, (t, dtype, stride, value) in before["tensors"].items():
        t2, dtype2, stride2, _ = after["tensors"][k]
        assert t2 is t, f"{k}: the parameter object was replaced"
        assert (dtype2, stride2) == (dtype, stride), f"{k}: dtype/layout changed"
        assert torch.equal(t.data, value), f"{k}: values changed"
    for name, procs in before["processors"].items():
        assert procs.keys() == after["processors"][name].keys()
        assert all(procs[k] is after["processors"][name][k] for k in procs), f"{name}: processors not restored"
    assert before["attrs"].keys() == after["attrs"].keys()
    for k, attrs in before["attrs"].items():
        now = after["attrs"][k]
        assert attrs.keys() == now.keys(), f"{k}: attributes {set(attrs) ^ set(now)} left behind or lost"
        for a, v in attrs.items():
            if isinstance(v, (bool, int, float, str, type(None))) or callable(v):
                assert now[a] is v or now[a] == v, f"{k}.{a} changed"

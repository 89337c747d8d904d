"""Helpers for the contract every optimization must keep (used by test_contract.py and test_faults.py).

:func:`snapshot` copies (never references) everything an optimization could leave behind, and
:func:`assert_same` compares two snapshots; a leftover hook, a lost attribute or a changed weight fails it.
"""

from __future__ import annotations

import numpy as np
import torch

PROMPT = "a red circle at top left and a yellow star at center on a blue background"

# every per-module hook dict torch keeps (forward, forward-pre, their kwargs / always-called variants,
# backward, state-dict and load-state-dict hooks): compared by the ids of the hooks they hold
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called", "_global_backward_hooks", "_global_backward_pre_hooks",
                 "_global_module_registration_hooks", "_global_parameter_registration_hooks",
                 "_global_buffer_registration_hooks")
# pipeline attributes diffusers itself sets during a call (guidance scale, schedule length, ...): whether
# they exist depends on which calls ran, not on an optimization
_PIPELINE_CALL_ATTRS = ("_guidance_scale", "_guidance_rescale", "_clip_skip", "_cross_attention_kwargs",
                        "_denoising_end", "_denoising_start", "_num_timesteps", "_interrupt", "_execution_device")


def run(pipe, steps: int = 4, seed: int = 0, **kw) -> np.ndarray:
    kw.setdefault("guidance_scale", 7.5)
    out = pipe([PROMPT, "a green square at bottom right on a white background"], num_inference_steps=steps,
               generator=[torch.Generator().manual_seed(seed + i) for i in range(2)], output_type="np", **kw)
    return out.images


def _modules(pipe):
    return {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _value_key(v):
    """What identifies an attribute's value: the value itself for plain data, the object's id otherwise
    (a replaced object -- a wrapped ``forward``, another scheduler -- is a change)."""
    if isinstance(v, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return ("value", v)
    plain = (bool, int, float, str, type(None))
    if isinstance(v, tuple) and all(isinstance(x, plain) for x in v):
        return ("value", v)
    if type(v) is dict and all(isinstance(x, plain) for x in v.values()):  # settings (progress bar config)
        return ("value", tuple(sorted(v.items(), key=lambda kv: str(kv[0]))))
    if type(v).__name__ == "FrozenDict":  # a diffusers config: re-made when a component is re-registered
        return ("config", dict(v))
    return ("id", id(v))


def _hooks(module) -> dict:
    return {name: tuple((k, id(h)) for k, h in getattr(module, name, {}).items()) for name in HOOK_DICTS}


def snapshot(pipe) -> dict:
    """A copy of everything an optimization could leave behind: tensors (the objects, values, dtype, device,
    layout), every hook dict of every module and torch's global hooks, attention processor objects, every
    instance attribute of every submodule and of the pipeline (present / absent, and what it holds), the
    scheduler (object, class, config), the pipeline config and the TF32 / cuDNN flags."""
    snap = {"tensors": {}, "processors": {}, "attrs": {}, "hooks": {}, "scheduler": pipe.scheduler,
            "scheduler_class": type(pipe.scheduler), "scheduler_config": dict(pipe.scheduler.config),
            "config": dict(pipe.config),
            "flags": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()),
            "global_hooks": {n: tuple((k, id(h)) for k, h in getattr(torch.nn.modules.module, n, {}).items())
                             for n in _GLOBAL_HOOKS},
            "pipeline": {k: _value_key(v) for k, v in vars(pipe).items() if k not in _PIPELINE_CALL_ATTRS}}
    for name, model in _modules(pipe).items():
        for k, t in model.state_dict(keep_vars=True).items():
            snap["tensors"][f"{name}.{k}"] = (t, t.data.dtype, t.data.device, t.data.stride(), t.data.clone())
        if hasattr(model, "attn_processors"):
            snap["processors"][name] = dict(model.attn_processors)
        for sub_name, sub in model.named_modules():
            key = f"{name}.{sub_name}"
            snap["hooks"][key] = _hooks(sub)
            snap["attrs"][key] = {k: _value_key(v) for k, v in vars(sub).items() if k not in HOOK_DICTS}
    return snap


def assert_same(before: dict, after: dict) -> None:
    for key in ("scheduler_class", "scheduler_config", "config", "flags"):
        assert before[key] == after[key], f"{key} changed"
    assert before["scheduler"] is after["scheduler"], "the scheduler object was replaced"
    assert before["global_hooks"] == after["global_hooks"], "torch's global module hooks changed"
    assert before["pipeline"].keys() == after["pipeline"].keys(), \
        f"pipeline attributes {set(before['pipeline']) ^ set(after['pipeline'])} left behind or lost"
    for k, v in before["pipeline"].items():
        assert after["pipeline"][k] == v, f"pipeline.{k} changed"
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, (t, dtype, device, stride, value) in before["tensors"].items():
        t2, dtype2, device2, stride2, _ = after["tensors"][k]
        assert t2 is t, f"{k}: the parameter object was replaced"
        assert (dtype2, device2, stride2) == (dtype, device, stride), f"{k}: dtype/device/layout changed"
        assert torch.equal(t.data, value), f"{k}: values changed"
    for name, procs in before["processors"].items():
        assert procs.keys() == after["processors"][name].keys()
        assert all(procs[k] is after["processors"][name][k] for k in procs), f"{name}: processors not restored"
    assert before["hooks"].keys() == after["hooks"].keys(), "modules added or removed"
    for k, hooks in before["hooks"].items():
        for kind, ids in hooks.items():
            assert after["hooks"][k][kind] == ids, f"{k}.{kind}: {len(after['hooks'][k][kind]) - len(ids):+d} hooks"
    for k, attrs in before["attrs"].items():
        now = after["attrs"][k]
        assert attrs.keys() == now.keys(), f"{k}: attributes {set(attrs) ^ set(now)} left behind or lost"
        for a, v in attrs.items():
            assert now[a] == v, f"{k}.{a} changed"


def hook_count(pipe) -> int:
    """Every hook on every module of the pipeline (a leak shows as growth)."""
    return sum(len(getattr(m, n, {})) for model in _modules(pipe).values() for m in model.modules()
               for n in HOOK_DICTS)


def tensor_bytes(pipe) -> int:
    return sum(t.numel() * t.element_size() for model in _modules(pipe).values()
               for t in [*model.parameters(), *model.buffers()])

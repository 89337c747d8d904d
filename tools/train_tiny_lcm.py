#!/usr/bin/env python
"""Distil tiny-sd into a few-step LCM-LoRA: ``tiny-sd-lcm-lora``.

    python tools/train_tiny_lcm.py train --minutes 60 --threads 1     # resumable legs; checkpoints outside git
    python tools/train_tiny_lcm.py export                             # weights, model card, training.json

Latent consistency distillation (Luo et al. 2023, "LCM-LoRA"), the recipe of diffusers'
``train_lcm_distill_lora_sd.py`` written again for a CPU and the procedural data:
- teacher: tiny-sd's frozen UNet with classifier-free guidance (CFG ``--teacher-cfg``, tiny-sd's recommended 3),
  folded into the student, which then runs without CFG;
- a DDIM solver over ``--ddim-steps`` (50) of the 1000 training timesteps: each step jumps ``1000 / 50`` timesteps
  from ``t_{n+k}`` to ``t_n`` with the teacher's guided prediction;
- student: tiny-sd + LoRA adapters (rank ``--rank``) on the modules the published LCM-LoRAs adapt (attention and
  feed-forward projections, ResNet convolutions, time-embedding projections, down/up-samplers); LCM's boundary
  condition (c_skip, c_out with timestep scaling 10, sigma_data 0.5) turns its epsilon into a consistency
  function;
- target: an exponential moving average of the student's LoRA (``--ema``) at ``t_n`` on the solver's point;
- loss: pseudo-Huber (c = 0.001) between the student's and the target's consistency outputs.

Checkpoints (LoRA, EMA, optimizer, the log) go to ``--work`` (default ``~/.cache/diffspeed/train-lcm``), never
into the repository; ``export`` writes the shipped fp16 weights once, in the layout the released LCM-LoRAs use
(diffusers' ``unet.*.lora.down.weight`` keys, ``pytorch_lora_weights.safetensors``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

from train_tiny_models import MODELS, SCHEDULER, conditioning, log  # noqa: E402

from diffspeed.tiny.data import held_out_scenes, training_batch  # noqa: E402

NAME = "tiny-sd-lcm-lora"
WORK = Path.home() / ".cache" / "diffspeed" / "train-lcm"
# what latent-consistency/lcm-lora-sdv1-5 adapts (its adapter_config's target_modules)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
CAPTION_DROPOUT = 0.0  # the student runs without CFG: the teacher's guided step is all it learns


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip, c_out: the consistency function is the identity at t = 0."""
    s = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


class DDIMSolver:
    """DDIM over ``n`` of the 1000 training timesteps (t = 19, 39, ..., 999 for n = 50), as LCM trains."""

    def __init__(self, alphas_cumprod: torch.Tensor, n: int = 50):
        k = len(alphas_cumprod) // n
        self.k = k
        self.timesteps = torch.arange(1, n + 1) * k - 1
        self.alpha = alphas_cumprod[self.timesteps]
        self.alpha_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = self.alpha_prev[index][:, None, None, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor):
    a = alphas_cumprod[t][:, None, None, None]
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def lora_params(unet) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def load_pipe():
    import diffspeed

    pipe = diffspeed.load("tiny-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora(unet, rank: int):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    return unet


def evaluate(pipe, unet, n_prompts: int, steps: int = 4, cfg: float = 1.0, seed: int = 0) -> dict:
    """Colour check of the student at ``steps`` LCM steps on the first ``n_prompts`` held-out prompts."""
    from diffusers import LCMScheduler

    from diffspeed.tiny.check import run_colour_check

    old_unet, old_sched = pipe.unet, pipe.scheduler
    pipe.unet = unet.eval()
    pipe.scheduler = LCMScheduler.from_config(old_sched.config)
    try:
        with torch.no_grad():
            res = run_colour_check(pipe, held_out_scenes()[:n_prompts], steps=steps, guidance_scale=cfg, seed=seed)
    finally:
        pipe.unet, pipe.scheduler = old_unet, old_sched
    return {"background": res.background_accuracy, "shape": res.shape_accuracy}


def train(args) -> None:
    from diffusers import DDPMScheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    state_path, ckpt_path = args.work / "state.json", args.work / "checkpoint.pt"
    fresh = args.restart or not state_path.exists()
    state = ({"step": 0, "seconds": 0.0, "evals": [], "legs": []} if fresh else json.loads(state_path.read_text()))
    torch.manual_seed(args.seed)
    pipe = load_pipe()
    teacher = pipe.unet.requires_grad_(False).eval()
    student = add_lora(copy.deepcopy(teacher), args.rank)
    target = add_lora(copy.deepcopy(teacher), args.rank).requires_grad_(False).eval()
    params = lora_params(student)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0)
    if not fresh:
        ck = torch.load(ckpt_path, map_location="cpu")
        student.load_state_dict(ck["student"], strict=False)
        target.load_state_dict(ck["target"], strict=False)
        opt.load_state_dict(ck["opt"])
        log(f"lcm: resuming at step {state['step']}")
    else:
        with torch.no_grad():
            for n, p in lora_params(target).items():
                p.copy_(params[n])
    log(f"lcm: {sum(p.numel() for p in params.values()):,} trainable parameters (rank {args.rank})")
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("steps_offset", "set_alpha_to_one")})
    ac = sched.alphas_cumprod.float()
    solver = DDIMSolver(ac, args.ddim_steps)
    held = {s.caption() for s in held_out_scenes()}
    uncond = conditioning(pipe, "sd", [""])["encoder_hidden_states"]
    w = args.teacher_cfg - 1.0  # x0_cond + w (x0_cond - x0_uncond) == CFG at scale teacher_cfg
    state["legs"].append({"start_step": state["step"], "lr": args.lr, "batch": args.batch, "rank": args.rank,
                          "ema": args.ema, "teacher_cfg": args.teacher_cfg, "ddim_steps": args.ddim_steps,
                          "minutes_budget": args.minutes, "threads": torch.get_num_threads()})

    def save() -> None:
        torch.save({"student": {k: v for k, v in student.state_dict().items() if "lora_" in k},
                    "target": {k: v for k, v in target.state_dict().items() if "lora_" in k},
                    "opt": opt.state_dict()}, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        state_path.write_text(json.dumps(state, indent=2))

    t0 = last = time.time()
    student.train()
    while state["step"] < args.max_steps and time.time() - t0 < args.minutes * 60:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100)
        rng = np.random.default_rng([args.seed, 11, step])
        x, caps = training_batch(rng, args.batch, held)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        with torch.no_grad():
            lat = pipe.vae.encode(torch.from_numpy(x)).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
            cond = conditioning(pipe, "sd", caps)["encoder_hidden_states"]
        bsz = len(caps)
        noise = torch.randn(lat.shape, generator=gen)
        index = torch.randint(0, args.ddim_steps, (bsz,), generator=gen)
        t_start = solver.timesteps[index]
        t_next = (t_start - solver.k).clamp(min=0)
        a = ac[t_start][:, None, None, None]
        x_t = a.sqrt() * lat + (1 - a).sqrt() * noise
        # student at t_{n+k}
        cs, co = boundary_scalings(t_start)
        eps_s = student(x_t, t_start, encoder_hidden_states=cond).sample
        pred = cs * x_t + co * x0_from_eps(x_t, eps_s, t_start, ac)
        with torch.no_grad():
            # teacher's guided DDIM step t_{n+k} -> t_n
            both = teacher(torch.cat([x_t, x_t]), torch.cat([t_start, t_start]),
                           encoder_hidden_states=torch.cat([cond, uncond.expand(bsz, -1, -1)])).sample
            e_c, e_u = both.chunk(2)
            x0_c, x0_u = x0_from_eps(x_t, e_c, t_start, ac), x0_from_eps(x_t, e_u, t_start, ac)
            x0_g, eps_g = x0_c + w * (x0_c - x0_u), e_c + w * (e_c - e_u)
            x_prev = solver.step(x0_g, eps_g, index)
            # EMA target at t_n
            cs_n, co_n = boundary_scalings(t_next)
            eps_t = target(x_prev, t_next, encoder_hidden_states=cond).sample
            tgt = cs_n * x_prev + co_n * x0_from_eps(x_prev, eps_t, t_next, ac)
        c = args.huber_c
        loss = (torch.sqrt((pred - tgt) ** 2 + c**2) - c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        with torch.no_grad():
            for n, p in lora_params(target).items():
                p.lerp_(params[n], 1 - args.ema)
        state["step"] += 1
        now = time.time()
        state["seconds"] += now - last
        last = now
        if state["step"] % 25 == 0:
            log(f"lcm step {state['step']} loss {loss.item():.5f} ({now - t0:.0f}s)")
        if state["step"] % args.eval_every == 0:
            ev = evaluate(pipe, student, args.eval_prompts)
            student.train()
            state["evals"].append({"step": state["step"], "minutes": round(state["seconds"] / 60, 1), **ev})
            log(f"lcm eval step {state['step']}: background {ev['background']:.0%} shape {ev['shape']:.0%}")
            save()
    save()
    log(f"lcm: leg done at step {state['step']} ({state['seconds'] / 60:.1f} min in all)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one resumable leg of distillation")
    t.add_argument("--minutes", type=float, default=30.0)
    t.add_argument("--max-steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--ema", type=float, default=0.95)
    t.add_argument("--teacher-cfg", type=float, default=3.0)
    t.add_argument("--ddim-steps", type=int, default=50)
    t.add_argument("--huber-c", type=float, default=0.001)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--eval-prompts", type=int, default=20)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--work", type=Path, default=WORK)
    t.add_argument("--restart", action="store_true", help="ignore the checkpoint in --work, start again")
    e = sub.add_parser("export", help="write the shipped weights, training.json and model card")
    e.add_argument("--work", type=Path, default=WORK)
    e.add_argument("--out", type=Path, default=None, help="default: the shipped models folder")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--rounds", type=int, default=3, help="timed passes of each setting, interleaved")
    args = ap.parse_args()
    if args.cmd == "train":
        train(args)
    else:
        export(args)


def kohya_layout(lora: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """peft's ``<module>.lora_A/lora_B.weight`` -> the released LCM-LoRA file's keys: diffusers block names in
    kohya form, ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, fp16."""
    out = {}
    for key, value in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.lora_down.weight"] = value.half().contiguous()
        out[f"{base}.lora_up.weight"] = lora[key.replace(".lora_A.", ".lora_B.")].half().contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return out


def export(args) -> None:
    """Write the student's LoRA (fp16, the released LCM-LoRA layout), then measure the shipped file against
    tiny-sd's recommended setting in one process (diffspeed.tiny.check.few_step_check) for the card."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from diffspeed.tiny.check import few_step_check

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or MODELS / NAME  # this repository's models/, not an installed copy
    state = json.loads((args.work / "state.json").read_text())
    rank = state["legs"][-1]["rank"]
    pipe = load_pipe()
    student = add_lora(copy.deepcopy(pipe.unet), rank)
    ck = torch.load(args.work / "checkpoint.pt", map_location="cpu")
    missing = student.load_state_dict(ck["student"], strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    lora = get_peft_model_state_dict(student)
    out.mkdir(parents=True, exist_ok=True)
    save_file(kohya_layout(lora, rank), str(out / "pytorch_lora_weights.safetensors"))
    (out / "pytorch_lora_weights.safetensors").chmod(0o644)  # safetensors writes it 0600; it ships
    log(f"lcm: wrote {out / 'pytorch_lora_weights.safetensors'}; measuring")
    results = few_step_check("tiny-sd", prompts=60, rounds=args.rounds)
    for r in results:
        log(f"  {r.name}: background {r.background_accuracy:.0%} shape {r.shape_accuracy:.0%} "
            f"{r.seconds_per_image * 1000:.0f} ms/image")
    state["final_check"] = {"prompts": 60, "seeds": "0..59", "threads": torch.get_num_threads(),
                            "rounds": args.rounds, "settings": [r.__dict__ for r in results]}
    state["params"] = sum(v.numel() for k, v in lora.items())
    (out / "training.json").write_text(json.dumps(state, indent=2) + "\n")
    samples(out, rank)
    (out / "README.md").write_text(card(state, rank))
    log(f"lcm: exported to {out}")


def samples(out: Path, rank: int) -> None:
    """samples.png: 8 held-out prompts, tiny-sd's recommended 20 steps (row 1) vs the LCM-LoRA's 4 (row 2)."""
    from PIL import Image

    from diffspeed.core import Accelerated
    from diffspeed.generate import GenerateRequest, generate
    from diffspeed.optim.accelerator import AcceleratorConfig

    pipe = load_pipe()
    scenes = held_out_scenes()[:8]
    rows = [[generate(pipe, GenerateRequest(prompt=s.caption(), seed=i), progress=False).images[0]
             for i, s in enumerate(scenes)]]
    with Accelerated(pipe, [AcceleratorConfig(method="lcm", lora=str(out))]) as fast:
        rows.append([generate(pipe, GenerateRequest(prompt=s.caption(), seed=i), runner=fast,
                              progress=False).images[0] for i, s in enumerate(scenes)])
    grid = Image.new("RGB", (64 * len(scenes), 64 * len(rows)))
    for r, images in enumerate(rows):
        for i, im in enumerate(images):
            grid.paste(im, (64 * i, 64 * r))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(out / "samples.png")


def card(state: dict, rank: int) -> str:
    fc = state["final_check"]
    rows = "\n".join(f"| {r['name']} | {r['sampler']} | {r['steps']} | {r['cfg_scale']:g} | "
                     f"{r['denoiser_calls_per_image']:.0f} | {r['background_accuracy']:.0%} | {r['shape_accuracy']:.0%} | "
                     f"{r['seconds_per_image'] * 1000:.0f} | {fc['settings'][0]['seconds_per_image'] / r['seconds_per_image']:.2f}x |"
                     for r in fc["settings"])
    legs = state["legs"]
    evals = "\n".join(f"| {e['step']} | {e['minutes']} | {e['background']:.0%} | {e['shape']:.0%} |"
                      for e in state["evals"])
    return f"""# diffspeed-tiny-sd-lcm-lora

A step-distilled LoRA for [diffspeed-tiny-sd](../tiny-sd/): latent consistency distillation (LCM-LoRA, Luo et
al. 2023) of tiny-sd guided at CFG {legs[-1]['teacher_cfg']:g}, so that it draws in **4 steps without
classifier-free guidance** (one UNet pass per step instead of two per step for 20 steps).

```bash
diffspeed generate "a red circle at top left on a blue background" --accelerator lcm
```

## Colour check: 4 LCM steps vs tiny-sd's recommended setting
60 held-out prompts (never trained on), seeds 0..59, batch 1, end to end (`diffspeed.generate`: text encoder,
UNet, VAE decode), all settings in one process on {fc['threads']} CPU thread(s), interleaved over
{fc['rounds']} round(s) (median). Program: `python tools/train_tiny_lcm.py export` (`diffspeed.tiny.check.few_step_check`).

| setting | sampler | steps | CFG | UNet calls / image (CFG: batch of 2) | background right | shape colour at position | ms / image | speed |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

The controls run tiny-sd itself at the few steps, without the LoRA: what the distillation adds. Speed is the
whole image, so the fixed costs (text encoder, VAE decode, PNG infotext) keep it under the 10x of the UNet work
alone (4 single calls instead of 20 double ones); `tiny_vae` takes part of the decode off.

## Training
Teacher tiny-sd (frozen, guided at CFG {legs[-1]['teacher_cfg']:g}), DDIM solver over {legs[-1]['ddim_steps']} of the
1000 timesteps (skipping {1000 // legs[-1]['ddim_steps']}), student = tiny-sd + rank-{rank} LoRA on the modules the released
LCM-LoRAs adapt ({', '.join(TARGETS)}; {state['params']:,} parameters), target = EMA ({legs[-1]['ema']}) of
the student's LoRA, pseudo-Huber loss, AdamW lr {legs[-1]['lr']:g}, batch {legs[-1]['batch']}, the procedural training
data of tiny-sd. {state['step']} steps in {state['seconds'] / 60:.0f} min on {legs[-1]['threads']} CPU thread(s), {len(legs)} leg(s).
Colour check during training (20 held-out prompts, 4 LCM steps, CFG 1):

| step | minutes | background right | shape colour at position |
| --- | --- | --- | --- |
{evals}

File: `pytorch_lora_weights.safetensors`, fp16, the released LCM-LoRA layout (kohya-style keys with diffusers
block names and `.alpha`), so every loader of those files reads it. Program: `tools/train_tiny_lcm.py`.

![samples](samples.png)

Row 1: tiny-sd, DPM++ 2M 20 steps, CFG 3; row 2: this LoRA, LCM 4 steps, CFG 1 (same prompts and seeds).
"""


if __name__ == "__main__":
    main()

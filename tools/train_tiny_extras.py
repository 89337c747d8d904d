#!/usr/bin/env python
"""Train the shipped extras of the tiny models on a CPU: a mask ControlNet and an SDXL refiner.

Each is written into the shipped models' folder, ``models/src/diffspeed_models/`` (the diffspeed-models
distribution):

    python tools/train_tiny_extras.py controlnet --family sd    # -> tiny-sd-controlnet-mask/
    python tools/train_tiny_extras.py controlnet --family sdxl  # -> tiny-sdxl-controlnet-mask/
    python tools/train_tiny_extras.py controlnet-card           # final evaluation, samples.png, model card
    python tools/train_tiny_extras.py refiner                   # -> tiny-sdxl-refiner/

Both start from the shipped base model, use its frozen VAE and text encoders, the same procedural data and
the same data stream rules as ``train_tiny_models.py`` (every batch from a generator seeded with (seed,
step)), keep an EMA of the trained weights, save it in fp16 as the shipped model -- which is also the
checkpoint a later leg resumes from -- and record legs, steps, minutes and an evaluation in training.json.

ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): initialised
with ``ControlNetModel.from_unet`` (a copy of the UNet's encoder, zero convolutions on its outputs), the UNet
frozen, the epsilon / min-SNR-5 objective of the base model with the ControlNet residuals added. The control
image is the scene's shape mask (``diffspeed.tiny.data.render_mask``: white silhouettes on black, exactly
the image's jitter). 30 % of captions are dropped and 30 % name other positions than the mask, so the mask,
not the text, decides where shapes go.

Refiner (Podell et al. 2023, SDXL, section 2.5): the SDXL refiner layout -- text_encoder_2 only, UNet
cross-attention width = text_encoder_2's, ``text_time`` conditioning on (original size, crop, aesthetic
score) -- fine-tuned from tiny-sdxl's UNet on the low-noise timesteps (t < 400) it is used for.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

from train_tiny_models import MODELS, NAMES, SCHEDULER, conditioning, log, n_params  # noqa: E402

from diffspeed.tiny.check import mask_iou, score_images, ssim  # noqa: E402
from diffspeed.tiny.data import (  # noqa: E402
    POSITIONS,
    SIZE,
    Scene,
    Shape,
    held_out_scenes,
    render_mask,
    training_batch_with_masks,
)

REFINER_T_MAX = 400  # the refiner trains on t in [0, 400): it takes over at "switch at" 0.6..0.99
AESTHETIC = (1.0, 10.0)  # range of the aesthetic-score conditioning drawn in training (the data has no quality
# signal, so the refiner learns to ignore it; inference uses 6.0 / 2.5 for positive / negative by default)


def controlnet_dir(family: str) -> Path:
    return MODELS / f"{NAMES[family]}-controlnet-mask"


REFINER_DIR = MODELS / "tiny-sdxl-refiner"


def base_pipeline(family: str):
    """The shipped base model in fp32 on the CPU, everything frozen (read-only: nothing is written to it)."""
    import diffspeed

    pipe = diffspeed.load(NAMES[family], device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe


def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("steps_offset", "set_alpha_to_one")})


def base_cfg(family: str) -> float:
    """The base model's guidance scale: where its model card's colour check meets the acceptance bar."""
    state = json.loads((MODELS / NAMES[family] / "training.json").read_text())
    return state.get("final_check", {}).get("recommended_cfg", 7.5)


def load_state(out: Path, restart: bool = False) -> dict:
    """The training record of ``out``; ``restart`` starts afresh from the base model (after the base changed)."""
    path = out / "training.json"
    if path.exists() and not restart:
        return json.loads(path.read_text())
    return {"step": 0, "seconds": 0.0, "legs": [], "evals": []}


def ema_update(ema: dict, model: torch.nn.Module, step: int, decay_max: float) -> None:
    decay = min(decay_max, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                ema[k].copy_(v)


class Leg:
    """One training leg's clock: its time budget, its step count and the training time added to ``state``
    (time spent saving and evaluating is not training time)."""

    def __init__(self, state: dict, args):
        self.state, self.args = state, args
        self.t0 = self.t_last = time.time()
        self.steps = 0

    def running(self) -> bool:
        return self.state["step"] < self.args.max_steps and time.time() - self.t0 < self.args.minutes * 60

    def step_done(self) -> None:
        now = time.time()
        self.state["step"] += 1
        self.steps += 1
        self.state["seconds"] += now - self.t_last
        self.t_last = now

    def rate(self) -> str:
        return f"{(time.time() - self.t0) / self.steps:.2f} s/step this leg"

    def due(self, every: int) -> bool:
        return self.state["step"] % every == 0

    def paused(self) -> None:
        """After a save or evaluation: do not count it as training time."""
        self.t_last = time.time()


def warmup_lr(opt, lr: float, leg_steps: int, warmup: int = 100) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * min(1.0, (leg_steps + 1) / warmup)


def moved(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with each shape at another named position than its own (and no two at one): a caption that
    disagrees with the mask."""
    taken = {s.position for s in scene.shapes}
    free = [p for p in POSITIONS if p not in taken]
    picks = rng.choice(len(free), size=len(scene.shapes), replace=False)
    return Scene(tuple(Shape(s.colour, s.shape, free[p]) for s, p in zip(scene.shapes, picks)), scene.background)


# ------------------------------------------------------------------------------------------------ ControlNet
def new_controlnet(unet, vae_scale_factor: int):
    """``from_unet`` with a conditioning embedding that downsamples by the VAE's factor (4 here, not SD's 8)."""
    from diffusers import ControlNetModel

    n = int(round(math.log2(vae_scale_factor)))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 128)[:n + 1])


def train_controlnet(args) -> None:
    from diffusers import ControlNetModel

    family = args.family
    out = args.out or controlnet_dir(family)
    state = load_state(out, args.restart)
    if state["step"] >= args.max_steps:
        log(f"controlnet {family}: already at step {state['step']} >= {args.max_steps}")
        return
    torch.manual_seed(args.seed)
    pipe = base_pipeline(family)
    if state["step"] > 0:
        cn = ControlNetModel.from_pretrained(out, torch_dtype=torch.float32)
        log(f"controlnet {family}: resuming at step {state['step']} from the saved EMA weights")
    else:
        cn = new_controlnet(pipe.unet, pipe.vae_scale_factor)
    cn.train()
    ema = {k: v.detach().clone() for k, v in cn.state_dict().items()}
    sched = ddpm()
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    opt = torch.optim.AdamW(cn.parameters(), lr=args.lr, weight_decay=0.0)
    held = {s.caption() for s in held_out_scenes()}
    state["legs"].append({"start_step": state["step"], "lr": args.lr, "batch": args.batch,
                          "threads": torch.get_num_threads(), "minutes_budget": args.minutes})
    log(f"controlnet {family}: {n_params(cn) / 1e6:.2f} M trainable params (UNet {n_params(pipe.unet) / 1e6:.2f} M "
        f"frozen); steps {state['step']}..{args.max_steps}, leg budget {args.minutes} min")
    leg = Leg(state, args)
    while leg.running():
        step = state["step"]
        warmup_lr(opt, args.lr, leg.steps)
        rng = np.random.default_rng([args.seed, 11, step])
        x, masks, scenes = training_batch_with_masks(rng, args.batch, held)
        caps = []
        for s in scenes:
            u = rng.random()
            caps.append("" if u < 0.3 else moved(s, rng).caption() if u < 0.6 else s.caption())
        with torch.no_grad():
            lat = pipe.vae.encode(torch.from_numpy(x)).latent_dist.sample() * pipe.vae.config.scaling_factor
            cond = conditioning(pipe, family, caps)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (len(caps),), generator=gen)
        noisy = sched.add_noise(lat, noise, t)
        down, mid = cn(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"],
                       controlnet_cond=torch.from_numpy(masks).expand(-1, 3, -1, -1),
                       added_cond_kwargs=cond.get("added_cond_kwargs"), return_dict=False)
        pred = pipe.unet(noisy, t, **cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        w = snr[t].clamp(max=5.0) / snr[t]  # min-SNR-5, as the base model
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        ema_update(ema, cn, step, args.ema)
        leg.step_done()
        if leg.due(args.log_every):
            log(f"controlnet {family} step {state['step']} loss {loss.item():.4f} ({leg.rate()})")
        if leg.due(args.save_every):
            save_controlnet(pipe, cn, ema, out, state, family, args)
            leg.paused()
    save_controlnet(pipe, cn, ema, out, state, family, args)


def save_controlnet(pipe, cn, ema: dict, out: Path, state: dict, family: str, args) -> None:
    from diffusers import ControlNetModel

    if state.get("saved_step") == state["step"]:
        return
    model = ControlNetModel.from_config(cn.config)
    model.load_state_dict(ema)
    model.eval()
    state["evals"].append({"step": state["step"], "minutes": round(state["seconds"] / 60, 1),
                           **controlnet_eval(pipe, model, args.eval_images, base_cfg(family))})
    model.to(torch.float16).save_pretrained(out)
    state["saved_step"] = state["step"]
    state["params"] = {"controlnet": n_params(model), "unet_frozen": n_params(pipe.unet)}
    state["config"] = {"batch": args.batch, "lr": args.lr, "ema": args.ema, "seed": args.seed, "base": NAMES[family],
                       "caption_dropout": 0.3, "caption_moved": 0.3, "eval_images": args.eval_images,
                       "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(state, indent=2))
    (out / "README.md").write_text(controlnet_card(family, state))
    log(f"controlnet {family}: saved step {state['step']} ({state['seconds'] / 60:.1f} min); {state['evals'][-1]}")


@torch.no_grad()
def controlnet_eval(pipe, cn, n: int, cfg: float, steps: int = 20, images: list | None = None) -> dict:
    """Mean IoU of the images' shapes (:func:`diffspeed.tiny.check.foreground`) with the control mask, on
    held-out captions: ``iou`` with the caption's own mask, ``iou_moved`` with a mask at other positions than
    the caption names (the ControlNet must win), ``iou_moved_off`` the same at control scale 0 (the baseline).
    ``images``, if given, receives (key, masks, images) for a sample grid."""
    from diffusers import AutoPipelineForText2Image

    scenes = held_out_scenes()[:n]
    rng = np.random.default_rng(5)
    masks = [render_mask(s) for s in scenes]
    moved_masks = [render_mask(moved(s, rng)) for s in scenes]
    cpipe = AutoPipelineForText2Image.from_pipe(pipe, controlnet=cn.to(pipe.unet.dtype))
    cpipe.set_progress_bar_config(disable=True)

    def run(ms, scale):
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        return cpipe([s.caption() for s in scenes], image=ms, num_inference_steps=steps, guidance_scale=cfg,
                     controlnet_conditioning_scale=scale, generator=gens, height=SIZE, width=SIZE).images

    res = {"cfg": cfg}
    for key, ms, scale in (("iou", masks, 1.0), ("iou_moved", moved_masks, 1.0), ("iou_moved_off", moved_masks, 0.0)):
        ims = run(ms, scale)
        res[key] = round(float(np.mean([mask_iou(im, m) for im, m in zip(ims, ms)])), 3)
        if images is not None:
            images.append((key, ms, ims))
    return res


def controlnet_samples(out: Path, runs: list, k: int = 8) -> None:
    """samples.png: per column one held-out caption; rows: the moved mask, the image with it, the image at
    control scale 0 -- the ControlNet must move the shape to the mask."""
    from PIL import Image

    by = {key: (ms, ims) for key, ms, ims in runs}
    masks, on = by["iou_moved"]
    off = by["iou_moved_off"][1]
    grid = Image.new("RGB", (SIZE * k, SIZE * 3))
    for i in range(k):
        for row, im in enumerate((masks[i].convert("RGB"), on[i], off[i])):
            grid.paste(im, (SIZE * i, SIZE * row))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(out / "samples.png")


def controlnet_final_card(args) -> None:
    """Re-evaluate the saved ControlNet at the base model's guidance, write samples.png and the card."""
    from diffusers import ControlNetModel

    family, out = args.family, args.out
    state = load_state(out, False)
    if not state["step"]:
        raise SystemExit(f"no trained ControlNet in {out}")
    pipe = base_pipeline(family)
    cn = ControlNetModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    runs: list = []
    state["final_eval"] = {"step": state["step"], "images": args.eval_images,
                           **controlnet_eval(pipe, cn, args.eval_images, base_cfg(family), images=runs)}
    controlnet_samples(out, runs)
    state["final_eval"]["samples"] = "samples.png"
    (out / "training.json").write_text(json.dumps(state, indent=2))
    (out / "README.md").write_text(controlnet_card(family, state))
    log(f"controlnet {family}: final evaluation {state['final_eval']}; wrote samples.png and README.md")


def controlnet_card(family: str, state: dict) -> str:
    ev = state.get("final_eval") or state["evals"][-1]
    rows = "\n".join(f"| {e['step']} | {e['minutes']} | {e.get('cfg', 7.5)} | {e['iou']:.2f} | {e['iou_moved']:.2f} | "
                      f"{e['iou_moved_off']:.2f} |" for e in state["evals"])
    c = state["config"]
    samples = ("\n![samples](samples.png)\n\nRow 1: the control mask (shapes at other positions than the caption "
               "names); row 2: the image with it; row 3: the same seed at control scale 0.\n"
               if ev.get("samples") else "")
    return f"""# diffspeed-{NAMES[family]}-controlnet-mask

A tiny ControlNet (`diffusers.ControlNetModel`) for the shipped `{NAMES[family]}`: the control image is a
shape mask -- white silhouettes on black, 64x64 -- and the generated shapes follow it. Trained by
`tools/train_tiny_extras.py controlnet --family {family}`, so that diffspeed's ControlNet workflow and every
optimization's interaction with ControlNet residuals can be tested on *trained* weights.

## Data and method
The procedural shapes of `diffspeed.tiny.data` with each image's mask (`render_mask`, the same jitter).
Initialised with `ControlNetModel.from_unet` from the base UNet (a copy of its encoder, zero convolutions),
conditioning embedding (16, 32, 64) (downsampling 4x, the tiny VAE's factor). UNet, VAE and text encoders
frozen; epsilon prediction, min-SNR-5 weighting; {c['caption_dropout']:.0%} of captions dropped and
{c['caption_moved']:.0%} replaced by captions naming other positions, so the mask decides where shapes go.
AdamW lr {c['lr']}, batch {c['batch']}, EMA {c['ema']}: {state['step']} steps in {state['seconds'] / 60:.0f} min
on {c['threads']} CPU thread(s). {state['params']['controlnet'] / 1e6:.2f} M parameters, stored in fp16.

## Evaluation
Mean IoU between the image's shapes (pixels far from the median colour) and the control mask, on
{c['eval_images']} held-out captions, 20 steps (PNDM), at the CFG scale given. "moved": the mask shows the shapes
at other positions than the caption names; "off": the same at control scale 0 (the baseline). The IoU is
pessimistic where the base model leaves a mottled background (pixels "far from the median colour" then count
as shape); the test (`tests/pipelines/test_controlnet.py`) measures the share of shape pixels inside the mask.

| step | minutes | CFG | IoU (mask = caption) | IoU moved | IoU moved, scale 0 |
| --- | --- | --- | --- | --- | --- |
{rows}

Final (step {ev['step']}, CFG {ev.get('cfg', 7.5)}, the base model's guidance): IoU {ev['iou']:.2f}, moved
{ev['iou_moved']:.2f} vs {ev['iou_moved_off']:.2f} without control.
{samples}
Use: `diffspeed generate "a red circle at center on a blue background" --model {NAMES[family]} --controlnet
{NAMES[family]}-controlnet-mask --control-image mask.png`.
"""


# --------------------------------------------------------------------------------------------------- refiner
def refiner_unet_from(base_unet, text_width: int, pooled_dim: int, target_size: tuple[int, int] = (SIZE, SIZE)):
    """The SDXL-refiner UNet layout built from the base UNet's config, weights copied where they fit.

    Changes: cross-attention width = ``text_width`` (text_encoder_2 only); time ids (orig h, orig w, crop
    top, crop left, aesthetic score) -- 5 instead of 6. Cross-attention keys/values keep the columns that read
    text_encoder_2 (the second half of the base's concatenated embedding). The added-embedding input keeps
    the pooled and size/crop columns; the base's target-size columns saw only ``target_size`` in training,
    so their constant contribution is folded into the bias; the aesthetic-score columns start at zero.
    """
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in base_unet.config.items() if not k.startswith("_")}
    d = cfg["addition_time_embed_dim"]
    cfg.update(cross_attention_dim=text_width, projection_class_embeddings_input_dim=5 * d + pooled_dim)
    unet = UNet2DConditionModel.from_config(cfg)
    new, old = unet.state_dict(), base_unet.state_dict()
    with torch.no_grad():
        for k, v in new.items():
            src = old[k]
            if src.shape == v.shape:
                v.copy_(src)
            elif k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                v.copy_(src[:, -text_width:])
            elif k == "add_embedding.linear_1.weight":
                keep = pooled_dim + 4 * d
                v.zero_()
                v[:, :keep].copy_(src[:, :keep])
            else:
                raise RuntimeError(f"refiner UNet: no rule for {k} {tuple(src.shape)} -> {tuple(v.shape)}")
        target = base_unet.add_time_proj(torch.tensor(target_size, dtype=torch.float32)).flatten()
        w = old["add_embedding.linear_1.weight"][:, pooled_dim + 4 * d:]
        new["add_embedding.linear_1.bias"].add_(w @ target.to(w.dtype))
    unet.load_state_dict(new)
    return unet


def refiner_pipeline(base, unet, text_encoder_2):
    """A StableDiffusionXLImg2ImgPipeline in the refiner layout (no first text encoder)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refiner_conditioning(pipe, captions: list[str], aesthetic: torch.Tensor) -> dict:
    """What the refiner pipeline feeds its UNet; dropped captions -> zeros (force_zeros_for_empty_prompt)."""
    emb, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    keep = torch.tensor([c != "" for c in captions], dtype=emb.dtype)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, 0]], dtype=emb.dtype).repeat(len(captions), 1)
    time_ids[:, 4] = aesthetic
    return {"encoder_hidden_states": emb * keep[:, None, None],
            "added_cond_kwargs": {"text_embeds": pooled * keep[:, None], "time_ids": time_ids}}


def train_refiner(args) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    out = args.out or REFINER_DIR
    state = load_state(out, args.restart)
    if state["step"] >= args.max_steps:
        log(f"refiner: already at step {state['step']} >= {args.max_steps}")
        return
    torch.manual_seed(args.seed)
    base = base_pipeline("sdxl")
    if state["step"] > 0:
        unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32)
        te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", torch_dtype=torch.float32)
        log(f"refiner: resuming at step {state['step']} from the saved EMA weights")
    else:
        te2 = copy.deepcopy(base.text_encoder_2)
        unet = refiner_unet_from(base.unet, te2.config.hidden_size, te2.config.projection_dim)
    te2.eval().requires_grad_(False)
    pipe = refiner_pipeline(base, unet, te2)
    unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    sched = ddpm()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    held = {s.caption() for s in held_out_scenes()}
    state["legs"].append({"start_step": state["step"], "lr": args.lr, "batch": args.batch,
                          "threads": torch.get_num_threads(), "minutes_budget": args.minutes})
    log(f"refiner: UNet {n_params(unet) / 1e6:.2f} M params; steps {state['step']}..{args.max_steps}, t < "
        f"{REFINER_T_MAX}, leg budget {args.minutes} min")
    leg = Leg(state, args)
    while leg.running():
        step = state["step"]
        warmup_lr(opt, args.lr, leg.steps)
        rng = np.random.default_rng([args.seed, 13, step])
        x, _, scenes = training_batch_with_masks(rng, args.batch, held)
        caps = ["" if rng.random() < 0.1 else s.caption() for s in scenes]
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        with torch.no_grad():
            lat = base.vae.encode(torch.from_numpy(x)).latent_dist.sample(gen) * base.vae.config.scaling_factor
            aesthetic = torch.empty(len(caps)).uniform_(*AESTHETIC, generator=gen)
            cond = refiner_conditioning(pipe, caps, aesthetic)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, REFINER_T_MAX, (len(caps),), generator=gen)
        pred = unet(sched.add_noise(lat, noise, t), t, **cond).sample
        # plain epsilon MSE: min-SNR weighting would give the low-noise steps this expert exists for ~no weight
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, step, args.ema)
        leg.step_done()
        if leg.due(args.log_every):
            log(f"refiner step {state['step']} loss {loss.item():.4f} ({leg.rate()})")
        if leg.due(args.save_every):
            save_refiner(base, pipe, ema, out, state, args)
            leg.paused()
    save_refiner(base, pipe, ema, out, state, args)


def save_refiner(base, pipe, ema: dict, out: Path, state: dict, args) -> None:
    from diffusers import UNet2DConditionModel

    if state.get("saved_step") == state["step"]:
        return
    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.load_state_dict(ema)
    unet.eval()
    ev = refiner_pipeline(base, unet, pipe.text_encoder_2)
    state["evals"].append({"step": state["step"], "minutes": round(state["seconds"] / 60, 1),
                           **refiner_eval(base, ev, args.eval_images)})
    size = {"unet": n_params(unet), "text_encoder_2": n_params(ev.text_encoder_2), "vae": n_params(ev.vae)}
    saved = copy.deepcopy(ev)  # the base's VAE is shared: cast a copy to fp16, never the live modules
    saved.to(torch.float16)
    saved.save_pretrained(out)
    state["saved_step"] = state["step"]
    state["params"] = size
    state["config"] = {"batch": args.batch, "lr": args.lr, "ema": args.ema, "seed": args.seed, "base": "tiny-sdxl",
                       "t_max": REFINER_T_MAX, "aesthetic_range": AESTHETIC, "caption_dropout": 0.1,
                       "text_width": pipe.unet.config.cross_attention_dim, "eval_images": args.eval_images,
                       "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(state, indent=2))
    (out / "README.md").write_text(refiner_card(state, out))
    log(f"refiner: saved step {state['step']} ({state['seconds'] / 60:.1f} min); {state['evals'][-1]}")


@torch.no_grad()
def refiner_eval(base, refiner, n: int, steps: int = 20, switch: float = 0.8) -> dict:
    """Denoising loss of the refiner vs the base UNet on the same held-out-style batch at t < 400 (the
    refiner must be at least as good where it takes over); the colour check and SSIM to the base-only image
    of ensemble images (base to ``switch``, refiner after it) on ``n`` held-out prompts."""
    sched = ddpm()
    rng = np.random.default_rng([99, 13])
    x, _, scenes = training_batch_with_masks(rng, 32, set())
    caps = [s.caption() for s in scenes]
    gen = torch.Generator().manual_seed(0)
    lat = base.vae.encode(torch.from_numpy(x)).latent_dist.sample(gen) * base.vae.config.scaling_factor
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, REFINER_T_MAX, (len(caps),), generator=gen)
    noisy = sched.add_noise(lat, noise, t)
    ref_loss = F.mse_loss(refiner.unet(noisy, t, **refiner_conditioning(refiner, caps, torch.full((32,), 6.0))).sample,
                          noise).item()
    base_loss = F.mse_loss(base.unet(noisy, t, **conditioning(base, "sdxl", caps)).sample, noise).item()
    held = held_out_scenes()[:n]
    prompts = [s.caption() for s in held]

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(n)]

    plain = base(prompts, num_inference_steps=steps, generator=gens()).images
    lat = base(prompts, num_inference_steps=steps, denoising_end=switch, output_type="latent", generator=gens()).images
    refined = refiner(prompts, image=lat, num_inference_steps=steps, denoising_start=switch, generator=gens()).images
    res = score_images(refined, held)
    return {"loss_t400": round(ref_loss, 4), "base_loss_t400": round(base_loss, 4),
            "background": res.background_accuracy, "shape": res.shape_accuracy,
            "ssim_to_base": round(float(np.mean([ssim(a, b) for a, b in zip(plain, refined)])), 3)}


def refiner_card(state: dict, out: Path) -> str:
    ev = state["evals"][-1]
    c, p = state["config"], state["params"]
    rows = "\n".join(f"| {e['step']} | {e['minutes']} | {e['loss_t400']:.4f} | {e['base_loss_t400']:.4f} | "
                     f"{e['background']:.0%} | {e['shape']:.0%} | {e['ssim_to_base']:.3f} |" for e in state["evals"])
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    return f"""# diffspeed-tiny-sdxl-refiner

A tiny model in the SDXL *refiner* layout for the shipped `tiny-sdxl`, so that diffspeed's refiner workflow
("Switch at", ensemble of experts and classic img2img) runs and is tested on trained weights. Trained by
`tools/train_tiny_extras.py refiner`. It draws the same coloured shapes as tiny-sdxl.

## Layout (as stabilityai/stable-diffusion-xl-refiner-1.0, scaled down)
- `StableDiffusionXLImg2ImgPipeline`, `requires_aesthetics_score=True`: no first text encoder; tiny-sdxl's
  text_encoder_2 (frozen copy) and tokenizer_2; tiny-sdxl's VAE.
- UNet: tiny-sdxl's block layout with cross-attention width {c['text_width']} (text_encoder_2 only) and
  `text_time` conditioning on (original height, original width, crop top, crop left, aesthetic score).
  Initialised from tiny-sdxl's UNet: keys/values keep the text_encoder_2 columns, the constant target-size
  term folded into the added-embedding bias, the aesthetic-score columns start at zero.
- Parameters: UNet {p['unet'] / 1e6:.2f} M, text_encoder_2 {p['text_encoder_2'] / 1e6:.2f} M,
  VAE {p['vae'] / 1e6:.2f} M; fp16, folder {size_mb:.1f} MB.

## Training
The procedural shapes of `diffspeed.tiny.data` (as tiny-sdxl), timesteps t < {c['t_max']} only (the refiner's
expert range), plain epsilon MSE, 10 % caption dropout to zeros, aesthetic score drawn uniformly from
{list(c['aesthetic_range'])} (the data carries no quality signal). AdamW lr {c['lr']}, batch {c['batch']},
EMA {c['ema']};
{state['step']} steps in {state['seconds'] / 60:.0f} min on {c['threads']} CPU thread(s).

## Evaluation
Denoising loss at t < {c['t_max']} on one fixed batch, refiner vs tiny-sdxl's UNet; colour check of ensemble images
(base to 0.8, refiner after) on held-out prompts; mean SSIM between each refined image and the base-only one.

| step | minutes | refiner loss | base loss | background | shape | SSIM to base |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

Latest: loss {ev['loss_t400']:.4f} vs the base's {ev['base_loss_t400']:.4f}.

Use: `diffspeed generate "a red circle at center on a blue background" --model tiny-sdxl --refiner
tiny-sdxl-refiner --refiner-switch-at 0.8`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["controlnet", "controlnet-card", "refiner"])
    ap.add_argument("--family", choices=["sd", "sdxl"], default=None, help="controlnet: the base model (sd)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default 1e-3 (controlnet), 3e-4 (refiner)")
    ap.add_argument("--max-steps", type=int, default=3000, help="steps in all legs together")
    ap.add_argument("--minutes", type=float, default=60.0, help="stop this leg after this many minutes")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-images", type=int, default=16, help="held-out prompts in each save's evaluation")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--restart", action="store_true",
                    help="ignore the saved weights and record, start again from the base model (after it changed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage in ("controlnet", "controlnet-card"):
        args.family = args.family or "sd"
        args.lr = args.lr or 1e-3
        args.out = args.out or controlnet_dir(args.family)
        args.out.mkdir(parents=True, exist_ok=True)
        (train_controlnet if args.stage == "controlnet" else controlnet_final_card)(args)
    else:
        if args.family == "sd":
            ap.error("the refiner is an SDXL model: leave out --family or give --family sdxl")
        args.lr = args.lr or 3e-4
        args.out = args.out or REFINER_DIR
        args.out.mkdir(parents=True, exist_ok=True)
        train_refiner(args)


if __name__ == "__main__":
    main()

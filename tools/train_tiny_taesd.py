#!/usr/bin/env python
"""Distil a tiny autoencoder (TAESD layout, diffusers ``AutoencoderTiny``) from the embedded models' KL VAE.

    python tools/train_tiny_taesd.py --minutes 10 --steps 1200            # -> models/src/diffspeed_models/taesd-tiny
    python tools/train_tiny_taesd.py --out /tmp/taesd-smoke --steps 30 --threads 1   # a smoke run

What it learns (TAESD's recipe, Ollin Boer Bohan, github.com/madebyollin/taesd):
- the decoder maps the KL VAE's *scaled* latents (``latent_dist.sample() * scaling_factor``: exactly what the
  tiny UNets were trained to produce) to the KL decoder's image of the same latents (distillation: L2 + L1);
- the encoder maps images to the scaled posterior mean (L2), so img2img through the tiny VAE stays in the
  UNet's latent space. Encoder and decoder are trained apart, each against the teacher.
``scaling_factor`` of the result is 1.0, diffusers' AutoencoderTiny convention: pipelines divide by 1.0 and
hand the denoised latents over as they are.

Deterministic and resumable: weights are seeded, every batch comes from a generator seeded with
(seed, step), and every --save-every steps the folder gets fp16 weights, ``training.json`` (step, seconds,
PSNR history) and ``README.md``. Running again resumes from the saved weights at the saved step (the
optimizer restarts with a short warm-up: the shipped folder is the checkpoint, nothing else is kept); the
same seed, steps and --threads give the same weights. --fresh starts over.
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

from diffspeed import metrics  # noqa: E402
from diffspeed.tiny.data import held_out_scenes, training_batch  # noqa: E402

MODELS = ROOT / "models" / "src" / "diffspeed_models"
EVAL_IMAGES = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), by :func:`diffspeed.metrics.psnr`."""
    return metrics.psnr(a.clamp(-1, 1), b.clamp(-1, 1), data_range=2.0)


def build_tiny(args, latent_channels: int, factor: int):
    """An AutoencoderTiny with one stride-2 stage per factor of two and ``args.channels`` throughout
    (diffusers' EncoderTiny/DecoderTiny need equal channels in every stage)."""
    from diffusers import AutoencoderTiny

    stages = int(math.log2(factor)) + 1
    enc, dec = tuple(args.encoder_blocks), tuple(args.decoder_blocks)
    if len(enc) != stages or len(dec) != stages:
        raise SystemExit(f"--encoder-blocks/--decoder-blocks need {stages} numbers for a {factor}x VAE")
    return AutoencoderTiny(encoder_block_out_channels=(args.channels,) * stages,
                           decoder_block_out_channels=(args.channels,) * stages, num_encoder_blocks=enc,
                           num_decoder_blocks=dec, latent_channels=latent_channels, scaling_factor=1.0)


def lr_at(args, step: int, leg_steps: int) -> float:
    warm = min(1.0, (leg_steps + 1) / 50)  # also after a resume: the optimizer's moments start at zero
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    return args.lr * warm * (0.1 + 0.9 * cosine)


def teacher_batch(kl, args, step: int, held: set[str]):
    """Images, scaled posterior samples (decoder input), the teacher's images of them, scaled means."""
    rng = np.random.default_rng([args.seed, 3, step])
    x = torch.from_numpy(training_batch(rng, args.batch, held)[0])
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    sf = kl.config.scaling_factor
    with torch.no_grad():
        post = kl.encode(x).latent_dist
        z = post.sample(generator=gen)
        target = kl.decode(z).sample.clamp(-1, 1)
    return x, z * sf, target, post.mean * sf


@torch.no_grad()
def evaluate(tiny, kl, args) -> dict:
    """PSNR on a fixed set of images (drawn apart from the training stream) and decode timings."""
    tiny.eval()
    x = torch.from_numpy(training_batch(np.random.default_rng([args.seed, 4]), EVAL_IMAGES, set())[0])
    sf = kl.config.scaling_factor
    mean = kl.encode(x).latent_dist.mean
    kl_img = kl.decode(mean).sample
    tiny_img = tiny.decode(mean * sf).sample
    enc = tiny.encode(x).latents
    out = {"psnr_vs_images": psnr(tiny_img, x), "psnr_vs_kl_decode": psnr(tiny_img, kl_img),
           "kl_psnr_vs_images": psnr(kl_img, x),
           "roundtrip_psnr_vs_images": psnr(tiny.decode(enc).sample, x),
           "encoder_latent_rel_rmse": ((enc - mean * sf).pow(2).mean().sqrt() / (mean * sf).std()).item(),
           "decode_ms_batch4": {"tiny": _ms(lambda: tiny.decode(mean[:4] * sf)),
                                "kl": _ms(lambda: kl.decode(mean[:4]))}}
    tiny.train()
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def _ms(fn, reps: int = 9) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[reps // 2] * 1000, 2)


def save(tiny, kl, state: dict, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(tiny, kl, args)
    state["evals"].append({"step": state["step"], "minutes": round(state["seconds"] / 60, 2), **metrics})
    copy.deepcopy(tiny).half().save_pretrained(out)  # a copy: training goes on in fp32
    state["threads"] = torch.get_num_threads()
    state["params"] = {"tiny_total": n_params(tiny), "tiny_decoder": n_params(tiny.decoder),
                       "kl_total": n_params(kl), "kl_decoder": n_params(kl.decoder) + n_params(kl.post_quant_conv)}
    (out / "training.json").write_text(json.dumps(state, indent=2) + "\n")
    (out / "README.md").write_text(card(state, tiny))
    log(f"saved step {state['step']} to {out}: decoder PSNR {metrics['psnr_vs_images']:.2f} dB vs images, "
        f"{metrics['psnr_vs_kl_decode']:.2f} dB vs the KL decode (KL itself {metrics['kl_psnr_vs_images']:.2f}); "
        f"decode {metrics['decode_ms_batch4']['tiny']} ms vs KL {metrics['decode_ms_batch4']['kl']} ms")


def train(args) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    out = Path(args.out)
    kl = AutoencoderKL.from_pretrained(args.teacher, torch_dtype=torch.float32).eval().requires_grad_(False)
    factor = 2 ** (len(kl.config.block_out_channels) - 1)
    resume = (out / "training.json").is_file() and not args.fresh
    state = json.loads((out / "training.json").read_text()) if resume else {
        "step": 0, "seconds": 0.0, "evals": [], "teacher": str(Path(args.teacher).resolve().relative_to(ROOT))
        if Path(args.teacher).resolve().is_relative_to(ROOT) else str(args.teacher),
        "teacher_scaling_factor": kl.config.scaling_factor,
        "config": {k: getattr(args, k) for k in ("seed", "batch", "lr", "steps", "channels", "encoder_blocks",
                                                 "decoder_blocks")}}
    state["config"].update(batch=args.batch, lr=args.lr, steps=args.steps)  # a later leg may change these
    if state["step"] >= args.steps:
        log(f"already at step {state['step']} >= --steps {args.steps}; nothing to do")
        return
    torch.manual_seed(args.seed)
    if resume:
        tiny = AutoencoderTiny.from_pretrained(out, torch_dtype=torch.float32)
        log(f"resuming at step {state['step']} from {out}")
    else:
        tiny = build_tiny(args, kl.config.latent_channels, factor)
    tiny.train()
    log(f"AutoencoderTiny {n_params(tiny) / 1e6:.3f} M params (decoder {n_params(tiny.decoder) / 1e6:.3f} M; "
        f"KL VAE {n_params(kl) / 1e6:.3f} M); steps {state['step']}..{args.steps}, batch {args.batch}, "
        f"leg budget {args.minutes} min, {torch.get_num_threads()} threads")
    opt = torch.optim.AdamW(tiny.parameters(), lr=args.lr, weight_decay=0.0)
    held = {s.caption() for s in held_out_scenes()}  # the colour check's scenes stay unseen, as for the VAE
    t_leg = t_last = time.time()
    leg_steps = 0
    while state["step"] < args.steps and time.time() - t_leg < args.minutes * 60:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step, leg_steps)
        x, z, target, mean = teacher_batch(kl, args, step, held)
        rec = tiny.decode(z).sample
        loss_dec = F.mse_loss(rec, target) + 0.5 * F.l1_loss(rec, target)
        loss_enc = F.mse_loss(tiny.encode(x).latents, mean)
        opt.zero_grad(set_to_none=True)
        (loss_dec + loss_enc).backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        leg_steps += 1
        now = time.time()
        state["seconds"] += now - t_last
        t_last = now
        if state["step"] % args.log_every == 0 or leg_steps == 1:
            log(f"step {state['step']}/{args.steps} decoder loss {loss_dec.item():.4f} encoder loss "
                f"{loss_enc.item():.4f} lr {g['lr']:.2e} ({(now - t_leg) / leg_steps:.2f} s/step this leg)")
        if state["step"] % args.save_every == 0:
            save(tiny, kl, state, args)
            t_last = time.time()
    if not state["evals"] or state["evals"][-1]["step"] != state["step"]:
        save(tiny, kl, state, args)


def card(state: dict, tiny) -> str:
    last = state["evals"][-1]
    cfg = state["config"]
    p = state["params"]
    ms = last["decode_ms_batch4"]
    return f"""# taesd-tiny: a tiny autoencoder for diffspeed's embedded models

A diffusers `AutoencoderTiny` (the TAESD layout of Ollin Boer Bohan, github.com/madebyollin/taesd) distilled
from the KL VAE of `tiny-sd` / `tiny-sdxl` (they share it: `{state['teacher']}`, scaling factor
{state['teacher_scaling_factor']:.6f}). Used by the `tiny_vae` optimization when no path is given.

- **Input/output**: latents 4 x 16 x 16 in the *diffusion* (scaled) space, i.e. KL latents x
  {state['teacher_scaling_factor']:.6f}; images 3 x 64 x 64 in [-1, 1]. `scaling_factor` is 1.0 (TAESD convention).
- **Architecture**: {cfg['channels']} channels in every stage; encoder blocks {tuple(cfg['encoder_blocks'])},
  decoder blocks {tuple(cfg['decoder_blocks'])}; ReLU, no normalization, no attention.
  {p['tiny_total']:,} parameters ({p['tiny_decoder']:,} in the decoder) against the KL VAE's {p['kl_total']:,}
  ({p['kl_decoder']:,} in its decoder).
- **Training**: {state['step']} steps of {cfg['batch']} procedural images (`diffspeed.tiny.data`, the
  colour-check scenes held out), AdamW lr {cfg['lr']} with cosine decay, seed {cfg['seed']},
  {state['seconds'] / 60:.1f} min on a CPU. Decoder: L2 + 0.5 L1 to the KL decoder's image of the same
  posterior sample; encoder: L2 to the scaled posterior mean. Made by `tools/train_tiny_taesd.py`.

## Quality and speed (step {last['step']}, {EVAL_IMAGES} fixed images)

| measure | value |
|---|---|
| decoder PSNR vs the original images | {last['psnr_vs_images']:.2f} dB |
| decoder PSNR vs the KL decode of the same latents | {last['psnr_vs_kl_decode']:.2f} dB |
| KL VAE's own PSNR vs the images (reference) | {last['kl_psnr_vs_images']:.2f} dB |
| tiny encode -> tiny decode PSNR vs the images | {last['roundtrip_psnr_vs_images']:.2f} dB |
| encoder latent error (RMSE / latent std) | {last['encoder_latent_rel_rmse']:.3f} |
| decode of 4 latents, CPU, median | tiny {ms['tiny']} ms, KL {ms['kl']} ms |

Timings are from the training machine with {state.get('threads', '?')} thread(s), other work running: compare
the two numbers, not across machines. Fits only this KL VAE (same latent space); for Stable Diffusion use
madebyollin's `taesd` / `taesdxl`. Licence: Apache-2.0, like diffspeed; trained on generated data only.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(MODELS / "taesd-tiny"), help="output folder (also the checkpoint)")
    ap.add_argument("--teacher", default=str(MODELS / "tiny-sd" / "vae"), help="the AutoencoderKL folder")
    ap.add_argument("--steps", type=int, default=1200, help="total steps over all legs (sets the LR schedule)")
    ap.add_argument("--minutes", type=float, default=12.0, help="stop this leg after this many minutes")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--encoder-blocks", type=int, nargs="+", default=[1, 2, 2])
    ap.add_argument("--decoder-blocks", type=int, nargs="+", default=[3, 2, 0],
                    help="blocks per stage, lowest resolution first; none at full resolution keeps it fast")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()

"""Full-size architectures with random weights, for speed measurements only (no weights can be downloaded).

``random:sd15`` / ``random:sdxl`` build the real SD 1.5 / SDXL UNet, VAE and text encoders from the configs
shipped in ``diffspeed/configs`` with seeded random weights. Their images are noise, so benchmarks report no
fidelity for them: only time and memory, which depend on the architecture, not the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffspeed.errors import DiffspeedError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILIES = {"sd15": "sd15", "sdxl": "sdxl-base"}


def _config(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text())


def random_pipeline(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in FAMILIES:
        raise DiffspeedError(f"model: random:{family} is unknown; use one of "
                             f"{', '.join('random:' + f for f in FAMILIES)}", field="model")
    folder = CONFIGS / FAMILIES[family]
    torch.manual_seed(seed)
    tok_dir = CONFIGS / "clip-tokenizer"
    unet = UNet2DConditionModel.from_config(_config(folder, "unet")).to(dtype)
    vae = AutoencoderKL.from_config(_config(folder, "vae")).to(dtype)
    te = CLIPTextModel(CLIPTextConfig(**_config(folder, "text_encoder"))).to(dtype)
    sched = EulerDiscreteScheduler.from_config(
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    if family == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config(folder, "text_encoder_2"))).to(dtype)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2,
                                     tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                     tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, pad_token="!"),
                                     unet=unet, scheduler=sched)

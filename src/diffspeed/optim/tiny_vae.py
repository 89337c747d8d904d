"""tiny_vae: decode (and encode) with a distilled tiny autoencoder, TAESD (Ollin Boer Bohan, madebyollin/taesd).

The pipeline's ``AutoencoderKL`` is swapped for a diffusers ``AutoencoderTiny``: no attention, no group norm,
a few plain 3x3 convolutions per resolution, so the decode costs a fraction of the KL decoder at a small loss
of detail (measured by the fidelity test and in the shipped model's README).

Latent convention (diffusers' AutoencoderTiny): TAESD works in the *diffusion* latent space, i.e. the KL
VAE's latents already multiplied by its ``scaling_factor``. Its own ``scaling_factor`` is 1.0, so the
pipeline's ``latents / vae.config.scaling_factor`` hands the denoised latents over unchanged, and
``vae.encode(x).latents * 1.0`` yields latents the UNet can denoise (img2img). A TAESD therefore only fits
the KL VAE it was distilled from: the check below catches a wrong shape (latent channels, spatial factor),
not a wrong pairing.

``path=None`` uses the tiny autoencoder distilled for the embedded tiny models (``models/taesd-tiny``,
made by ``tools/train_tiny_taesd.py``); for SD 1.x/2.x and SDXL give a folder holding madebyollin's
``taesd`` / ``taesdxl`` in diffusers format. ``pipe.vae`` (and the pipeline config's ``vae`` entry) is set
back to the original object by remove().
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.errors import DiffspeedError
from diffspeed.pipelines.load import MODELS_HINT, installed_models_dir

# in the diffspeed-models distribution; without it a path that says so (requirements() then reports it missing)
DEFAULT_PATH = (installed_models_dir() or Path(f"[not installed: {MODELS_HINT}]")) / "taesd-tiny"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyVaeConfig(OptConfig):
    name = "tiny_vae"
    path: str | None = param(None, "folder of a diffusers AutoencoderTiny (config.json + weights), e.g. "
                             "madebyollin/taesd for SD 1.x, taesdxl for SDXL; None: the one shipped for the "
                             "embedded tiny models (models/taesd-tiny)", kind=str)


def _folder(config: TinyVaeConfig) -> Path:
    return Path(config.path).expanduser() if config.path is not None else DEFAULT_PATH


def _tiny_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _spatial_factor(vae, pipe=None) -> int:
    """Pixels per latent pixel of the pipeline's VAE, as the pipeline computes it."""
    factor = getattr(pipe, "vae_scale_factor", None)
    return int(factor) if factor else 2 ** (len(vae.config.block_out_channels) - 1)


def incompatibilities(tiny: dict, vae, pipe=None) -> list[str]:
    """Why an AutoencoderTiny config ``tiny`` cannot stand in for ``vae``; empty when it fits."""
    if tiny.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        return [f"it holds a {tiny['_class_name']}, not an AutoencoderTiny"]
    out = []
    want = vae.config.latent_channels
    if tiny.get("latent_channels", 4) != want:
        out.append(f"it has {tiny.get('latent_channels', 4)} latent channels, the pipeline's VAE {want}")
    factor = _spatial_factor(vae, pipe)
    up = tiny.get("upsampling_scaling_factor", 2) ** (len(tiny.get("decoder_block_out_channels", (64,) * 4)) - 1)
    down = 2 ** (len(tiny.get("encoder_block_out_channels", (64,) * 4)) - 1)  # one stride-2 conv per stage
    if up != factor:
        out.append(f"its decoder upsamples {up}x, the pipeline's VAE {factor}x")
    if down != factor:
        out.append(f"its encoder downsamples {down}x, the pipeline's VAE {factor}x")
    if tiny.get("out_channels", 3) != vae.config.out_channels:
        out.append(f"it makes {tiny.get('out_channels', 3)}-channel images, the pipeline {vae.config.out_channels}")
    return out


@register
class TinyVae(Optimization):
    Config = TinyVaeConfig
    summary = "swap the VAE for a distilled tiny autoencoder (TAESD): a fraction of the decode cost"
    conflicts = {"vae_tiling": "diffusers' AutoencoderTiny tiles as if every VAE were 8x (it uses 2**out_channels); "
                               "the tiny decoder needs little memory, so decode untiled"}
    noop = None  # no config keeps the original VAE: the swap is the whole point
    example = {}

    @classmethod
    def requirements(cls, config: TinyVaeConfig, pipe=None) -> list[str]:
        folder = _folder(config)
        if not (folder / "config.json").is_file():
            if config.path is None:
                return [f"the default tiny VAE is not shipped yet ({folder} is missing): make it with "
                        f"tools/train_tiny_taesd.py, or give tiny_vae.path"]
            return [f"tiny_vae.path {config.path!r} is not a diffusers AutoencoderTiny folder (no config.json)"]
        if pipe is None or getattr(pipe, "vae", None) is None:
            return [] if pipe is None else ["needs a pipeline with a VAE (pipe.vae)"]
        problems = incompatibilities(_tiny_config(folder), pipe.vae, pipe)
        return [f"tiny_vae.path {str(folder)!r} does not fit this pipeline: {'; '.join(problems)}"] if problems else []

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        from diffusers import AutoencoderTiny

        vae, folder = pipe.vae, _folder(self.config)
        try:
            tiny = AutoencoderTiny.from_pretrained(folder, dtype=vae.dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise DiffspeedError(f"tiny_vae.path {str(folder)!r}: cannot load an AutoencoderTiny: {err}",
                                 field="path") from err
        problems = incompatibilities(dict(tiny.config), vae, pipe)
        if problems:  # the weights disagree with what config.json promised
            raise DiffspeedError(f"tiny_vae.path {str(folder)!r} does not fit this pipeline: "
                                 f"{'; '.join(problems)}", field="path")
        tiny.to(vae.device).eval().requires_grad_(False)
        # cast what the pipeline hands over to the tiny VAE's dtype (fp32 latents when precision made the VAE half)
        edits.wrap_method(tiny, "decode", lambda inner, z, *a, **k: inner(z.to(tiny.dtype), *a, **k))
        edits.wrap_method(tiny, "encode", lambda inner, x, *a, **k: inner(x.to(tiny.dtype), *a, **k))
        edits.set_attr(pipe, "vae", tiny)

"""precision: dtype per component, TF32, and a NaN guard for half-precision VAE decode (seeds 001-003).

- Each of unet / text encoders / vae can run in fp32, fp16 or bf16. Tensors crossing a component boundary
  are cast to the receiving component's dtype (and the UNet's prediction back to the latents' dtype), so
  mixed settings such as "fp16 UNet, fp32 VAE" (the web UI's --no-half-vae) just work.
- ``tf32`` sets the CUDA matmul and cuDNN TF32 flags (Ampere and newer); remove() restores both.
- ``nan_guard``: SD VAEs overflow in fp16 and return black/NaN images (the web UI's NaN check, the SDXL
  "fp16 fix" VAE). After each half-precision decode the output is checked; images with NaN/inf are decoded
  again in fp32 and ``stats["vae_fp32_redecodes"]`` counts them.
The original weights are kept so remove() restores them bit for bit (casting fp16 back to fp32 would not):
in host memory by default, or with ``originals="disk"`` in a temporary file, so that on a CPU the bf16 weights
really take half the RAM while the recipe is applied.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import torch

from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.core.tensors import map_tensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_D = tuple(DTYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionConfig(OptConfig):
    name = "precision"
    unet: str | None = param(None, "UNet dtype (fp16 halves memory and is ~2x faster on GPUs)", choices=_D, kind=str)
    text_encoder: str | None = param(None, "dtype of the text encoder(s)", choices=_D, kind=str)
    vae: str | None = param(None, "VAE dtype; SD VAEs can overflow in fp16 (see nan_guard)", choices=_D, kind=str)
    tf32: bool | None = param(None, "allow TF32 matmuls/convolutions on CUDA; None leaves the flags alone",
                              kind=bool)
    nan_guard: bool = param(True, "re-decode in fp32 any image a half-precision VAE returns with NaN/inf")
    originals: str = param("memory", "where the original weights wait for remove(): memory (host RAM, quick to "
                           "restore) or disk (a temporary file, so casting fp32 to bf16 really halves the RAM)",
                           choices=("memory", "disk"), kind=str)
    spill_dir: str | None = param(None, "originals=disk: folder of the temporary file (None: the system temp "
                                  "folder; put it on a disk, not a tmpfs)", kind=str)


def _cast(x, dtype):
    return map_tensors(x, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)


def _sample_of(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out, sample):
    return (sample, *out[1:]) if isinstance(out, tuple) else dataclasses.replace(out, sample=sample)


@register
class Precision(Optimization):
    Config = PrecisionConfig
    summary = "dtype per component (fp32/fp16/bf16), TF32, NaN guard for half VAE decode"
    noop = {}
    example = {"unet": "bf16", "text_encoder": "bf16", "vae": "bf16"}

    @classmethod
    def requirements(cls, config, pipe=None) -> list[str]:
        if config.spill_dir is not None and not os.path.isdir(config.spill_dir):
            return [f"precision.spill_dir {config.spill_dir!r} is not a folder"]
        return []

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        c = self.config
        parts = {"unet": c.unet, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder, "vae": c.vae}
        for part, name in parts.items():
            module = getattr(pipe, part, None)
            if module is not None and name is not None:
                dtype = DTYPES[name]
                edits.retensor(module, lambda t, d=dtype: t.to(d) if t.is_floating_point() else t,
                               spill_dir=(c.spill_dir or tempfile.gettempdir()) if c.originals == "disk" else None)
        if any(v is not None for v in (c.unet, c.text_encoder, c.vae)):
            # latents and embeddings take the text encoder's dtype in diffusers: the UNet and the VAE, changed
            # or not, get theirs
            edits.wrap_method(pipe.unet, "forward", self._unet_forward)
            edits.wrap_method(pipe.vae, "decode", self._vae_decode)
            edits.wrap_method(pipe.vae, "encode", self._vae_encode)
        if c.tf32 is not None:
            edits.set_attr(torch.backends.cuda.matmul, "allow_tf32", c.tf32)
            edits.set_attr(torch.backends.cudnn, "allow_tf32", c.tf32)

    def _unet_forward(self, inner, sample, *args, **kwargs):
        dtype = self.pipe.unet.dtype
        out = inner(_cast(sample, dtype), *_cast(args, dtype), **_cast(kwargs, dtype))
        return _with_sample(out, _sample_of(out).to(sample.dtype))

    def _vae_encode(self, inner, x, *args, **kwargs):
        return inner(_cast(x, self.pipe.vae.dtype), *args, **kwargs)

    def _vae_decode(self, inner, z, *args, **kwargs):
        vae = self.pipe.vae
        dtype = vae.dtype
        out = inner(_cast(z, dtype), *args, **kwargs)
        if not self.config.nan_guard or dtype == torch.float32:
            return out
        sample = _sample_of(out)
        bad = ~torch.isfinite(sample).flatten(1).all(1)
        if not bad.any():
            return out
        vae.to(torch.float32)  # exact round trip: the half values are representable in fp32
        try:
            redone = _sample_of(inner(z[bad].float(), *args, **kwargs))
        finally:
            vae.to(dtype)
        sample = sample.float()
        sample[bad] = redone
        n = int(bad.sum())
        self.state.stats["vae_fp32_redecodes"] += n
        self.state.events.append(f"precision: VAE decode returned NaN/inf in {dtype}; {n} image(s) re-decoded "
                                 f"in fp32")
        return _with_sample(out, sample)

"""attention: choose how attention is computed, through the models' attention processors (seeds 002, 003).

- ``sdpa``: torch's scaled_dot_product_attention (fused kernels; diffusers' default), optionally restricted
  to one kernel (flash, efficient, math, cudnn) for the UNet call;
- ``sliced``: attention computed a few heads at a time (SlicedAttnProcessor): lower peak memory, slower;
- ``xformers``: xFormers' memory-efficient kernel, when installed (CUDA only);
- ``math``: the explicit matmul-softmax-matmul processor (the reference; most memory).

diffusers' ``set_attention_backend`` does not reach the UNet processors of SD/SDXL, so this swaps processors
on the UNet (and the VAE's mid-block attention) and remove() restores the original processor objects.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register

torch = lazy_import("torch")
processors = lazy_import("diffusers.models.attention_processor")

_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(OptConfig):
    name = "attention"
    backend: str = param("sdpa", "sdpa (default), sliced, xformers or math",
                         choices=("sdpa", "sliced", "xformers", "math"))
    sdpa_kernel: str | None = param(None, "restrict sdpa to one kernel: flash, efficient, math, cudnn",
                                    choices=tuple(_KERNELS), kind=str)
    slice_size: int | None = param(None, "heads per slice for backend=sliced; None: half the heads",
                                   range=(1, 64), kind=int)
    vae: bool = param(True, "also set the VAE's attention (its mid block at full latent resolution)")

    def checks(self):
        out = []
        if self.sdpa_kernel is not None and self.backend != "sdpa":
            out.append(("sdpa_kernel", "attention.sdpa_kernel applies only to backend 'sdpa'"))
        if self.slice_size is not None and self.backend != "sliced":
            out.append(("slice_size", "attention.slice_size applies only to backend 'sliced'"))
        return out


def _processors(model: torch.nn.Module, config: AttentionConfig) -> dict:
    out = {}
    for key in model.attn_processors:
        if config.backend == "sliced":
            heads = model.get_submodule(key.removesuffix(".processor")).heads
            out[key] = processors.SlicedAttnProcessor(config.slice_size or max(1, heads // 2))
        else:
            kind = {"sdpa": "AttnProcessor2_0", "math": "AttnProcessor", "xformers": "XFormersAttnProcessor"}
            out[key] = getattr(processors, kind[config.backend])()
    return out


@register
class Attention(Optimization):
    Config = AttentionConfig
    summary = "attention backend: SDPA (optionally one kernel), sliced, xFormers or plain math"
    noop = {"backend": "sdpa"}
    example = {"backend": "sliced", "slice_size": 1}

    @classmethod
    def requirements(cls, config, pipe=None) -> list[str]:
        out = []
        if config.backend == "xformers" and importlib.util.find_spec("xformers") is None:
            out.append("backend 'xformers' needs the xformers package (pip install xformers); sdpa is as fast "
                       "on torch >= 2")
        cuda_only = config.backend == "xformers" or config.sdpa_kernel in ("efficient", "cudnn")
        if cuda_only and not torch.cuda.is_available():
            out.append(f"{config.sdpa_kernel or config.backend} attention needs a CUDA device")
        return out

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        models = [pipe.unet] + ([pipe.vae] if self.config.vae and hasattr(pipe.vae, "attn_processors") else [])
        for model in models:
            if model.attn_processors:
                edits.set_attn_processors(model, _processors(model, self.config))
        if not edits.counts["attention processors swapped"]:
            self.stood_aside = f"the pipeline already runs the {self.config.backend} attention processors"
        if self.config.sdpa_kernel:
            backend = getattr(torch.nn.attention.SDPBackend, _KERNELS[self.config.sdpa_kernel])

            def restricted(inner, *args, **kwargs):
                with torch.nn.attention.sdpa_kernel(backend):
                    return inner(*args, **kwargs)

            edits.wrap_method(pipe.unet, "forward", restricted)

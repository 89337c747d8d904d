"""tome: token merging for Stable Diffusion (Bolya and Hoffman 2023; the tomesd package, the web UI's ToMe).

Before self-attention (and optionally cross-attention and the MLP) of the transformer blocks at the highest
resolutions, ``ratio`` of the tokens are merged into similar ones (bipartite soft matching, see
:mod:`diffspeed.optim.tome_merge`), the layer runs on the rest, and its output is copied back to every
token. Attention cost falls roughly with the square of the kept share. The algorithm lives in tome_merge;
this file only hooks it onto ``Attention`` / ``FeedForward`` modules (a pre-hook merges the input, a hook
unmerges the output), so no diffusers forward is copied and remove() drops the hooks.

``max_downsample`` follows tomesd: merge in blocks whose latent is downsampled by at most this factor. The
tomesd default of 1 does nothing on SDXL, whose first attention sits at downsample 2, so the default comes
from the model family (diffspeed.adapters).
"""

from __future__ import annotations

import dataclasses

from diffspeed._lazy import lazy_import
from diffspeed.adapters import adapter_for
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.core.unet_units import attention_levels, grid_at
from diffspeed.optim.tome_merge import bipartite_merge, partition, unmerge

torch = lazy_import("torch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TomeConfig(OptConfig):
    name = "tome"
    ratio: float = param(0.5, "share of tokens merged away (tomesd: 0.3-0.6 keeps quality; 0 = off)",
                         range=(0.0, 0.9))
    max_downsample: int | None = param(None, "merge in blocks downsampled by at most this factor (1, 2, 4, "
                                       "8); default per family: the level of the first attention",
                                       choices=(1, 2, 4, 8), kind=int)
    sx: int = param(2, "destination window width in tokens", range=(1, 8))
    sy: int = param(2, "destination window height in tokens", range=(1, 8))
    use_rand: bool = param(True, "destination at a random place in each window (seeded per generation)")
    merge_attn: bool = param(True, "merge before self-attention")
    merge_crossattn: bool = param(False, "merge the queries of cross-attention too")
    merge_mlp: bool = param(False, "merge before the MLP too")
    seed: int = param(0, "seed of the destination choice (reset before every generation)", range=(0, 2**31 - 1))


@register
class Tome(Optimization):
    Config = TomeConfig
    call_effect = ('tome_merged_tokens',)
    summary = "ToMe: merge redundant tokens before attention (faster big images, mild softening)"
    stateful = True
    noop = {"ratio": 0.0}
    example = {"ratio": 0.5, "merge_crossattn": True, "merge_mlp": True}
    conflicts = {"hypertile": "both reshape the tokens of the same self-attention layers; use one"}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        c = self.config
        unet = pipe.unet
        factor = c.max_downsample if c.max_downsample is not None else 2 ** adapter_for(pipe).first_attention_level
        self._latent = (0, 0)
        self._reset()
        edits.forward_pre_hook(unet.conv_in, self._see_latent)
        for level, _, transformer in attention_levels(unet):
            if 2 ** level > factor:
                continue
            for block in transformer.transformer_blocks:
                targets = [m for m, on in ((block.attn1, c.merge_attn), (getattr(block, "attn2", None),
                           c.merge_crossattn), (block.ff, c.merge_mlp)) if on and m is not None]
                for module in targets:
                    self._hook(edits, module, level)

    def _reset(self) -> None:
        self._gen: torch.Generator | None = None

    def _see_latent(self, module, args):
        self._latent = tuple(args[0].shape[-2:])

    def _generator(self, device) -> torch.Generator | None:
        if not self.config.use_rand:
            return None
        if self._gen is None:  # one per generation, on the CPU: the same seed gives the same merges anywhere
            self._gen = torch.Generator("cpu").manual_seed(self.config.seed)
        return self._gen

    def _hook(self, edits: Edits, module, level: int) -> None:
        def before(x, kwargs):
            h, w = grid_at(self._latent, level)
            r = int(x.shape[1] * self.config.ratio)
            if r == 0 or x.dim() != 3 or h * w != x.shape[1] or kwargs.get("attention_mask") is not None:
                return None
            is_dst = partition(h, w, self.config.sx, self.config.sy, self._generator(x.device), x.device)
            merged, info = bipartite_merge(x, is_dst, r)
            self.state.stats["tome_merged_tokens"] += x.shape[0] * (x.shape[1] - merged.shape[1])
            return merged, lambda out: unmerge(out, info)

        edits.around(module, before)

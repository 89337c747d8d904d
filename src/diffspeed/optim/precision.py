"""precision: dtype per component, TF32, and a NaN guard for half-precision VAE decode (seeds 001-003).

- Each of unet / text encoders / vae can run in fp32, fp16 or bf16. Tensors crossing a component boundary
  are cast to the receiving component's dtype (and the UNet's prediction back to the latents' dtype), so
  mixed settings such as "fp16 UNet, fp32 VAE" (the web UI's --no-half-vae) just work.
- ``tf32`` sets the CUDA matmul and cuDNN TF32 flags (Ampere and newer); remove() restores both.
- ``nan_guard``: SD VAEs overflow in fp16 and return black/NaN images (the web UI's NaN check, the SDXL
  "fp16 fix" VAE). After each half-precision decode the output is checked; images with NaN/inf are decoded
  again in fp32 and ``stats["vae_fp32_redecodes"]`` counts them.
- ``compute``: the dtype layers compute in when it differs from their stored dtype (layerwise upcasting, as
  diffusers' ``enable_layerwise_casting``): weights stay stored in bf16/fp16, taking half the memory, and each
  layer casts its own weights up for its forward and drops the copy after. For CPUs without native bf16, where
  bf16 compute is 30-180x slower than fp32 (issue 14) but bf16 storage still halves the weights' RAM; the cost
  is one cast of every weight per call.
The original weights are kept so remove() restores them bit for bit (casting fp16 back to fp32 would not):
in host memory by default, or with ``originals="disk"`` in a temporary file, so that on a CPU the bf16 weights
really take half the RAM while the recipe is applied.

Asking for half-precision compute where this device's probe (or, unprobed, its CPU flags) says it is slower
than fp32 still works, with one :class:`~diffspeed.hardware.SlowDtypeWarning` naming the measured ratio.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

from diffspeed import hardware
from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.core.tensors import map_tensors

torch = lazy_import("torch")

_D = ("fp32", "fp16", "bf16")


def dtype_of(name: str):
    """The torch dtype of a name in ``_D`` (a function: building a dict of torch dtypes would import torch)."""
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


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
    compute: str | None = param(None, "dtype the layers compute in when it differs from the one they are stored "
                                "in (e.g. bf16 weights computed in fp32 on CPUs without native bf16: half the "
                                "weights' memory for a cast per layer); None computes in the stored dtype",
                                choices=_D, kind=str)

    def checks(self):
        stored = [d for d in (self.unet, self.text_encoder, self.vae) if d is not None]
        if self.compute is not None and not stored:
            return [("compute", "precision.compute needs a stored dtype to upcast from: set unet, text_encoder "
                                "or vae")]
        if self.compute in ("fp16", "bf16") and any(d != self.compute for d in stored):
            return [("compute", f"precision.compute {self.compute!r} is narrower than a stored dtype "
                                f"({', '.join(stored)}): compute upcasts, it never rounds weights further")]
        return []

    def compute_dtypes(self) -> set[str]:
        """The dtypes arithmetic runs in under this config."""
        stored = {d for d in (self.unet, self.text_encoder, self.vae) if d is not None}
        return {self.compute} if self.compute is not None and stored else stored


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
        _warn_if_slow(c, str(pipe.unet.device))
        self._upcast = set()  # ids of the components whose layers compute in c.compute
        parts = {"unet": c.unet, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder, "vae": c.vae}
        for part, name in parts.items():
            module = getattr(pipe, part, None)
            if module is not None and name is not None:
                dtype = dtype_of(name)
                # upcast per layer: tensors too small to matter (norms, biases) stay in the compute dtype, which
                # spares their layers a hook and a cast on every call
                small = 1024 if c.compute is not None and c.compute != name else 0
                edits.retensor(module, lambda t, d=dtype, s=small: t.to(d) if t.is_floating_point()
                               and t.numel() >= s else t,
                               spill_dir=(c.spill_dir or tempfile.gettempdir()) if c.originals == "disk" else None)
                if c.compute is not None and c.compute != name:
                    _upcast_layers(module, dtype_of(c.compute), edits)
                    self._upcast.add(id(module))
        if any(v is not None for v in (c.unet, c.text_encoder, c.vae)):
            # latents and embeddings take the text encoder's dtype in diffusers: the UNet and the VAE, changed
            # or not, get theirs
            edits.wrap_method(pipe.unet, "forward", self._unet_forward)
            edits.wrap_method(pipe.vae, "decode", self._vae_decode)
            edits.wrap_method(pipe.vae, "encode", self._vae_encode)
        if c.tf32 is not None:
            edits.set_attr(torch.backends.cuda.matmul, "allow_tf32", c.tf32)
            edits.set_attr(torch.backends.cudnn, "allow_tf32", c.tf32)

    def _dtype(self, module):
        """The dtype a component's inputs need: its compute dtype, which is its stored one unless upcast."""
        return dtype_of(self.config.compute) if id(module) in self._upcast else module.dtype

    def _unet_forward(self, inner, sample, *args, **kwargs):
        dtype = self._dtype(self.pipe.unet)
        out = inner(_cast(sample, dtype), *_cast(args, dtype), **_cast(kwargs, dtype))
        return _with_sample(out, _sample_of(out).to(sample.dtype))

    def _vae_encode(self, inner, x, *args, **kwargs):
        return inner(_cast(x, self._dtype(self.pipe.vae)), *args, **kwargs)

    def _vae_decode(self, inner, z, *args, **kwargs):
        vae = self.pipe.vae
        dtype = vae.dtype
        out = inner(_cast(z, self._dtype(vae)), *args, **kwargs)
        if not self.config.nan_guard or self._dtype(vae) == torch.float32:
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


def _warn_if_slow(config: PrecisionConfig, device: str) -> None:
    """One warning when half-precision compute is asked for where it is slower than fp32 (flags or probe)."""
    slow = [(d, why) for d in sorted(config.compute_dtypes() - {"fp32"})
            for fast, why in [hardware.is_fast(hardware.detect(device), d)] if not fast]
    if slow:
        warnings.warn(f"precision: {' and '.join(d for d, _ in slow)} compute is slower than fp32 on this {device} "
                      f"({'; '.join(why for _, why in slow)}); set precision.compute = \"fp32\" to keep the "
                      "memory saving at fp32 speed", hardware.SlowDtypeWarning, stacklevel=3)


def _upcast_layers(module, dtype, edits: Edits) -> None:
    """Each layer with its own floating weights computes in ``dtype``: a pre-hook swaps the weights' data for
    an upcast copy, a hook swaps the stored data back. Only the running layers' copies are alive at a time."""
    frames: list[list] = []  # per running layer (nested layers stack): its (parameter, stored data) pairs

    def up(layer, args):
        frame = [(p, p.data) for p in layer.parameters(recurse=False) if p.is_floating_point() and p.dtype != dtype]
        for p, data in frame:
            p.data = data.to(dtype)
        frames.append(frame)

    def down(layer, args, out):
        for p, data in frames.pop():
            p.data = data

    def clear():  # a call that failed inside a layer leaves its frames: put the stored data back
        while frames:
            down(None, None, None)

    for layer in module.modules():
        if any(p.is_floating_point() and p.dtype != dtype for p in layer.parameters(recurse=False)):
            edits.forward_pre_hook(layer, up)
            edits.forward_hook(layer, down)
    edits.on_call_end(clear)

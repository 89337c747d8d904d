"""A candidate's peak memory, estimated before it is measured: weight bytes plus the largest activations.

The weights come from the model's files without loading them (each ``.safetensors`` header lists every tensor's
shape; a random-weights architecture from its shipped config's known parameter count), the activations from the
UNet's and VAE's configs at the run's size. Each optimization changes one term: precision and quantize the bytes
per weight (and keep the originals in RAM unless they go to disk), staged keeps one component resident at a time,
offload keeps one on the GPU, VAE tiling bounds the decode by the tile, a tiny VAE shrinks it, math attention adds
the attention matrix. The numbers are rough (the CPU's runtime, allocator slack), so the search calibrates them
on the measured baseline (:meth:`Footprint.estimate_mb` with ``offset_mb``) and prunes only candidates well over
the budget; measured memory decides the rest.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

MB = 1 << 20
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")
RUNTIME_MB = {"cpu": 520.0, "cuda": 0.0}  # Python + torch + diffusers RSS on the CPU (the bench's tiny-sd baseline)
# parameter counts of the full-size architectures that random:<family> builds (diffusers' configs)
RANDOM_PARAMS = {"sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
                 "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                          "vae": 83_653_863}}
TAESD_PARAMS = 2_445_063
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_numel(path: Path) -> tuple[int, int]:
    """(elements, bytes) of the tensors in a ``.safetensors`` file, from its header only."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(size, 100 << 20)))
    numel = nbytes = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in info["shape"]:
            n *= d
        numel += n
        nbytes += n * _DTYPE_BYTES.get(info["dtype"], 4)
    return numel, nbytes


def _folder_numel(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return sum(safetensors_numel(f)[0] for f in files)
    return sum(f.stat().st_size for f in folder.glob("*.bin")) // 4  # pickles: assume fp32


def _config(folder: Path | None) -> dict:
    try:
        return json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class Footprint:
    """What the estimate needs to know about a model: parameters per component and a few config numbers."""

    params: dict  # component -> parameter count
    unet: dict = field(default_factory=dict)  # the UNet's config.json
    vae: dict = field(default_factory=dict)
    source: str = ""

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)

    def native_size(self) -> int:
        return int(self.unet.get("sample_size", 64)) * self.vae_factor

    # --------------------------------------------------------------------------------------------- estimate
    def estimate_mb(self, tables, *, width: int | None = None, height: int | None = None, device: str = "cpu",
                    load_dtype: str | None = None, offset_mb: float = 0.0) -> float:
        """Peak memory (MiB) of a run with the recipe ``tables`` (``{"name": ..., field: value}`` dicts) applied:
        peak RSS on the CPU, allocated memory on CUDA. ``offset_mb``: the calibration (measured minus estimated
        for the baseline)."""
        cuda = device.startswith("cuda")
        load = load_dtype or ("fp16" if cuda else "fp32")
        by = {t["name"]: t for t in tables}
        width, height = width or self.native_size(), height or self.native_size()
        weights = {p: n * BYTES[load] for p, n in self.params.items()}
        extra = 0.0  # originals kept in host RAM (counts on the CPU only)
        compute = BYTES[load]
        if "precision" in by:
            p = by["precision"]
            for part in weights:
                dtype = p.get(part if part in ("unet", "vae") else "text_encoder")  # text_encoder_2 follows it
                if not dtype:
                    continue
                if p.get("originals", "memory") == "memory" and not cuda:
                    extra += weights[part]  # the originals wait in host RAM for remove()
                weights[part] = self.params[part] * BYTES[dtype]
                if part == "unet":
                    compute = BYTES[p.get("compute") or dtype]
        if "quantize" in by and str(by["quantize"].get("method", "fp8")).startswith(("fp8", "int8")):
            q = by["quantize"]
            for part in str(q.get("components", "unet")).split("+"):
                if part in weights:
                    if q.get("originals", "memory") == "memory" and not cuda:
                        extra += weights[part]
                    weights[part] = weights[part] * 0.05 + self.params[part] * 0.95  # norms etc. stay
        if "tiny_vae" in by and "vae" in weights:
            weights["vae"] = TAESD_PARAMS * BYTES[load]
        unet_act, vae_act = self._activations(by, width, height, compute)
        if "offload" in by and cuda:
            mode = by["offload"].get("mode", "model")
            share = {"model": 1.0, "group": 0.2, "sequential": 0.05}.get(mode, 1.0)
            resident = max(weights.values()) * share
            peak = max(resident + unet_act, resident + vae_act)
        elif "staged" in by:
            peak = max(weights.get("unet", 0) + unet_act, weights.get("vae", 0) + vae_act,
                       weights.get("text_encoder", 0) + weights.get("text_encoder_2", 0))
        else:
            peak = sum(weights.values()) + max(unet_act, vae_act)
        return RUNTIME_MB["cuda" if cuda else "cpu"] + (peak + extra) / MB + offset_mb

    def _activations(self, by: dict, width: int, height: int, b: int) -> tuple[float, float]:
        """(UNet peak, VAE decode peak) activation bytes for one image with CFG (a batch of two)."""
        f = self.vae_factor
        hw = (width // f) * (height // f)
        chans = self.unet.get("block_out_channels", [320])
        unet = 2 * hw * chans[0] * b * 20
        if by.get("attention", {}).get("backend") in ("math", "sliced"):
            kinds = self.unet.get("down_block_types", ["CrossAttnDownBlock2D"])
            level = next((i for i, k in enumerate(kinds) if "Attn" in k), 0)
            heads = self.unet.get("attention_head_dim", 8)
            heads = heads[level] if isinstance(heads, list) else heads
            if by["attention"]["backend"] == "sliced":
                heads = by["attention"].get("slice_size") or max(1, heads // 2)
            unet += 2 * heads * (hw / 4 ** level) ** 2 * b
        if "tome" in by:
            unet *= 1 - 0.3 * float(by["tome"].get("ratio", 0.5))
        pixels = width * height
        if "vae_tiling" in by:
            tile = int(by["vae_tiling"].get("tile_size", 512))
            pixels = min(pixels, int((tile * (1 + float(by["vae_tiling"].get("overlap", 0.25)))) ** 2))
        vae_chans = self.vae.get("block_out_channels", [128])
        vae = pixels * 2 * vae_chans[0] * b * 3
        if "tiny_vae" in by:
            vae *= 0.1
        return float(unet), float(vae)


def footprint(model: str) -> Footprint:
    """The footprint of ``model`` (a shipped name, a diffusers folder, a ``.safetensors`` file or ``random:...``),
    read from files only; an unknown layout gives an empty footprint (the runtime term alone)."""
    if model.startswith("random:"):
        family = model.split(":", 1)[1]
        folder = Path(__file__).resolve().parents[1] / "configs" / {"sd15": "sd15", "sdxl": "sdxl-base"}.get(
            family, family)
        return Footprint(dict(RANDOM_PARAMS.get(family, {})), _config(folder / "unet"), _config(folder / "vae"),
                         f"{model}: parameter counts of the full-size architecture")
    path = _model_path(model)
    if path is None:
        return Footprint({}, source=f"{model}: not found here; runtime only")
    if path.is_file():
        return _single_file(path)
    params = {p: n for p in PARTS if (path / p).is_dir() and (n := _folder_numel(path / p))}
    return Footprint(params, _config(path / "unet"), _config(path / "vae"), f"{path}: safetensors headers")


def _model_path(model: str) -> Path | None:
    from diffspeed.pipelines.load import SHIPPED, installed_models_dir

    if model in SHIPPED:
        base = installed_models_dir()
        return base / model if base is not None else None
    path = Path(model).expanduser()
    return path if path.exists() else None


def _single_file(path: Path) -> Footprint:
    """An original-layout checkpoint: the tensors split by their key prefix."""
    if path.suffix != ".safetensors":
        size = path.stat().st_size // 4
        return Footprint({"unet": int(size * 0.8), "text_encoder": int(size * 0.12), "vae": int(size * 0.08)},
                         source=f"{path}: file size, split by the SD 1.x proportions")
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(size, 100 << 20)))
    prefixes = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder",
                "conditioner.embedders.0.": "text_encoder", "conditioner.embedders.1.": "text_encoder_2"}
    params: dict = {}
    for name, info in header.items():
        part = next((p for k, p in prefixes.items() if name.startswith(k)), None)
        if part and name != "__metadata__":
            n = 1
            for d in info["shape"]:
                n *= d
            params[part] = params.get(part, 0) + n
    return Footprint(params, source=f"{path}: safetensors header")

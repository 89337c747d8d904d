"""Image fidelity metrics: the one implementation that tests, tools, the benchmark and model cards all use.

Inputs (converted once, by :func:`as_float`): a PIL image, a list of them, a uint8 array (0-255 becomes
[0, 1]), a float array or a torch tensor (values kept as they are). Images are ``(H, W, C)`` or a batch
``(N, H, W, C)``; the two sides must have the same shape.

- PSNR: ``10 log10(data_range^2 / MSE)``, the MSE over every value of every image together (inf when equal).
  ``data_range`` is the span of the values after conversion: 1.0 for [0, 1] images, 2.0 for a VAE's [-1, 1].
- SSIM: Wang, Bovik, Sheikh and Simoncelli 2004, in the paper's setting -- an 11-tap Gaussian window of sigma
  1.5, K1 0.01, K2 0.03, population covariances -- through scikit-image, on [0, 1] values (data range 1.0),
  per image over the colour channels, averaged over a batch. The only SSIM in diffspeed: floors in tests and
  numbers in reports are therefore comparable.
- MS-SSIM: Wang, Simoncelli and Bovik 2003 (the paper's betas) through torchmetrics, with as many of the five
  scales as the image size allows; the number used is returned beside the value.
- Image measures for the tiny models' checks: :func:`saturation` (what a monochrome LoRA removes),
  :func:`foreground` and :func:`mask_iou` (where a ControlNet put the shapes). The palette colour check itself
  lives with the data it knows, in :mod:`diffspeed.tiny.check`.

scikit-image and torchmetrics are optional extras (``bench``, ``dev``): imported only when a metric needs them.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np

from diffspeed.errors import DiffspeedError

SSIM_SIGMA = 1.5  # Wang et al. 2004; scikit-image truncates the Gaussian at 3.5 sigma: an 11 x 11 window
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales
MS_SSIM_KERNEL = 7  # smaller than the usual 11 so that 64 px images still get three scales
_RANGE_SLACK = 1e-6  # float rounding at the ends of [0, 1]


def as_float(images) -> np.ndarray:
    """float64 array of ``images``: PIL images and uint8 arrays scaled from 0-255 to [0, 1], anything else
    (float arrays, torch tensors) as it is."""
    if isinstance(images, (list, tuple)):
        return np.stack([as_float(im) for im in images])
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images.convert("RGB") if hasattr(images, "convert") else images)
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def _pair(a, b, metric: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_float(a), as_float(b)
    if x.shape != y.shape:
        raise DiffspeedError(f"{metric}: the images differ in shape, {x.shape} vs {y.shape}", field="images")
    return x, y


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all images together; inf when they are equal."""
    if not data_range > 0:
        raise DiffspeedError(f"psnr: data_range must be > 0, got {data_range!r}", field="data_range")
    x, y = _pair(a, b, "psnr")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a, b) -> float:
    """Mean SSIM (Wang et al. 2004's Gaussian window) of one image pair ``(H, W, C)`` or of a batch
    ``(N, H, W, C)``, averaged over the images."""
    from skimage.metrics import structural_similarity

    x, y = _pair(a, b, "ssim")
    if x.ndim not in (3, 4):
        raise DiffspeedError(f"ssim: images must be (H, W, C) or (N, H, W, C), got shape {x.shape}", field="images")
    for v in (x, y):
        if v.size and (v.min() < -_RANGE_SLACK or v.max() > 1 + _RANGE_SLACK):
            raise DiffspeedError(f"ssim: values must lie in [0, 1] (uint8 and PIL images are scaled), got "
                                 f"{v.min():.3g} to {v.max():.3g}; map [-1, 1] images with (x + 1) / 2",
                                 field="images")
    pairs = zip(x, y) if x.ndim == 4 else [(x, y)]
    return float(np.mean([structural_similarity(p, q, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                                sigma=SSIM_SIGMA, use_sample_covariance=False)
                          for p, q in pairs]))


def ms_ssim_scales(size: int) -> int:
    """How many scales fit: the image at the coarsest scale must be larger than the window (torchmetrics'
    rule: ``size > (kernel - 1) * 2 ** (scales - 1)``)."""
    scales = 0
    while scales < len(MS_SSIM_BETAS) and size > (MS_SSIM_KERNEL - 1) * 2 ** scales:
        scales += 1
    return scales


def ms_ssim(a, b) -> tuple[float | None, int]:
    """(MS-SSIM, scales used) of a batch on [0, 1] values; (None, scales) when torchmetrics is missing or
    fewer than two scales fit."""
    x, y = _pair(a, b, "ms_ssim")
    x, y = (v[None] if v.ndim == 3 else v for v in (x, y))
    scales = ms_ssim_scales(min(x.shape[1], x.shape[2]))
    if scales < 2 or importlib.util.find_spec("torchmetrics") is None:
        return None, scales
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    x, y = (torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2) for v in (x, y))
    value = multiscale_structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=MS_SSIM_KERNEL,
                                                           betas=MS_SSIM_BETAS[:scales], normalize="relu")
    return float(value), scales


# ------------------------------------------------------------------------------ tiny-model image measures
def saturation(images) -> float:
    """Mean HSV-style saturation (max - min over RGB, in [0, 1]) of PIL images or HxWx3 uint8 arrays: what the
    monochrome example LoRA takes away."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return float((arr.max(-1) - arr.min(-1)).mean())


def foreground(image, threshold: float = 60.0) -> np.ndarray:
    """Boolean HxW map of the pixels that differ from the image's median colour by more than ``threshold``
    (sum of absolute RGB differences, 0-765): on a plain background, where the shapes are. The ControlNet
    check uses it to see whether the shapes went where the control mask put them."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    median = np.median(arr.reshape(-1, 3), axis=0)
    return np.abs(arr - median).sum(-1) > threshold


def mask_iou(image, mask, threshold: float = 60.0) -> float:
    """Intersection over union of :func:`foreground` of ``image`` and ``mask`` (white = shape, > 50 %)."""
    fg = foreground(image, threshold)
    if hasattr(mask, "convert"):  # a PIL image: grey, at the image's size
        from PIL import Image

        mask = mask.convert("L").resize(fg.shape[::-1], Image.Resampling.BILINEAR)
    m = np.asarray(mask, dtype=np.float32)
    m = m > (127.5 if m.max() > 1 else 0.5)
    union = (fg | m).sum()
    return float((fg & m).sum() / union) if union else 1.0

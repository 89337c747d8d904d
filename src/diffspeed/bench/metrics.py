"""Fidelity of a recipe's images to the baseline's (same prompts, same seeds), with maintained libraries.

- PSNR and SSIM: scikit-image (``skimage.metrics``), per image, averaged; SSIM on RGB with ``channel_axis``.
- MS-SSIM: torchmetrics, with as many of the five standard scales as the image size allows (each scale halves
  the image, and the Gaussian window must fit the smallest); the number used is reported beside the value.
  Wang, Simoncelli and Bovik 2003; the betas are the paper's.
- LPIPS (Zhang et al. 2018): the ``lpips`` package, only when its backbone weights are already in the torch
  hub cache -- nothing is downloaded during a benchmark; otherwise it is skipped with a note saying why.

Images are float arrays in [0, 1], shape (N, H, W, 3): what the pipeline returned, rounded to 8 bits as saved.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales
MS_SSIM_KERNEL = 7  # smaller than the usual 11 so that 64 px images still get three scales
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, which lpips(net="alex") loads


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all images together (inf when identical)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b)]))


def ms_ssim_scales(size: int) -> int:
    """How many scales fit: the image at the coarsest scale must be larger than the window (torchmetrics'
    rule: ``size > (kernel - 1) * 2 ** (scales - 1)``)."""
    scales = 0
    while scales < len(MS_SSIM_BETAS) and size > (MS_SSIM_KERNEL - 1) * 2 ** scales:
        scales += 1
    return scales


def ms_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float | None, int]:
    """(MS-SSIM, scales used); (None, scales) when torchmetrics is missing or fewer than two scales fit."""
    scales = ms_ssim_scales(min(a.shape[1], a.shape[2]))
    if scales < 2 or importlib.util.find_spec("torchmetrics") is None:
        return None, scales
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    x, y = (torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).double() for v in (a, b))
    value = multiscale_structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=MS_SSIM_KERNEL,
                                                           betas=MS_SSIM_BETAS[:scales], normalize="relu")
    return float(value), scales


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run here without downloading anything; None when it can."""
    if importlib.util.find_spec("lpips") is None:
        return "LPIPS skipped: the lpips package is not installed"
    import torch

    if not (Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE).is_file():
        return f"LPIPS skipped: its AlexNet weights ({LPIPS_BACKBONE}) are not in the torch hub cache"
    try:
        import lpips  # noqa: F401  (imports torchvision, which may be missing or broken)
    except Exception as err:  # noqa: BLE001 -- any import failure means "not available", said in the note
        return f"LPIPS skipped: importing lpips failed ({type(err).__name__}: {err})"
    return None


def lpips_distance(a: np.ndarray, b: np.ndarray) -> float:
    import lpips
    import torch

    net = lpips.LPIPS(net="alex", verbose=False)
    x, y = (torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).float() * 2 - 1 for v in (a, b))
    with torch.no_grad():
        return float(net(x, y).mean())


def fidelity(images: np.ndarray, reference: np.ndarray) -> dict:
    """Every metric of ``images`` against ``reference``; ``notes`` says what was skipped and why."""
    if images.shape != reference.shape:
        raise ValueError(f"fidelity: image shapes differ: {images.shape} vs {reference.shape}")
    out = {"psnr_db": psnr(images, reference), "ssim": ssim(images, reference), "notes": []}
    out["ms_ssim"], out["ms_ssim_scales"] = ms_ssim(images, reference)
    if out["ms_ssim"] is None:
        out["notes"].append("MS-SSIM skipped: " + ("torchmetrics is not installed" if out["ms_ssim_scales"] >= 2
                                                    else f"{images.shape[1]} px is too small for two scales"))
    why = lpips_unavailable()
    out["lpips"] = None if why else lpips_distance(images, reference)
    if why:
        out["notes"].append(why)
    out["per_image_psnr_db"] = [psnr(x[None], y[None]) for x, y in zip(images, reference)]
    return out

"""Fidelity of a recipe's images to the baseline's (same prompts, same seeds).

PSNR, SSIM and MS-SSIM are :mod:`diffspeed.metrics`' (the ones the tests' floors and the model cards use; their
settings and sources are documented there). LPIPS (Zhang et al. 2018): the ``lpips`` package, only when its
backbone weights are already in the torch hub cache -- nothing is downloaded during a benchmark; otherwise it
is skipped with a note saying why.

Images are float arrays in [0, 1], shape (N, H, W, 3): what the pipeline returned, rounded to 8 bits as saved.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from diffspeed.metrics import ms_ssim, psnr, ssim

LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, which lpips(net="alex") loads


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

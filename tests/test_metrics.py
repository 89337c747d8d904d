"""diffspeed.metrics: known values, the documented SSIM setting, input conversion and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffspeed import DiffspeedError
from diffspeed.metrics import as_float, ms_ssim, ms_ssim_scales, psnr, ssim


def scene(seed: int = 0, size: int = 64) -> np.ndarray:
    """A smooth random RGB image in [0, 1]: structure for SSIM to find (white noise has little)."""
    coarse = np.random.default_rng(seed).random((size // 8, size // 8, 3))
    return np.kron(coarse, np.ones((8, 8, 1)))


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 written out independently: Gaussian weights sigma 1.5 (truncated at 3.5 sigma as
    scikit-image does), population moments, K1 0.01, K2 0.03, L 1; mean over the valid interior and channels."""
    from scipy.ndimage import gaussian_filter

    def blur(v):
        return gaussian_filter(v, sigma=1.5, truncate=3.5, mode="reflect")

    c1, c2 = 0.01**2, 0.03**2
    out = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch], y[..., ch]
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        out.append(s[5:-5, 5:-5].mean())  # 11-tap window: 5 px on each side are edge effects, left out
    return float(np.mean(out))


def test_identical_images():
    a = scene()
    assert psnr(a, a.copy()) == math.inf and ssim(a, a.copy()) == pytest.approx(1.0)
    assert ms_ssim(a[None], a[None].copy()) == (pytest.approx(1.0), 4)


def test_psnr_of_a_known_error():
    a = np.full((8, 8, 3), 0.5)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01 on a range of 1
    assert psnr(a, a + 0.1, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    b = a.copy()
    b[0, 0, 0] += 0.8  # MSE 0.64 / 192 from one value of the batch
    assert psnr(np.stack([a, a]), np.stack([a, b])) == pytest.approx(10 * math.log10(384 / 0.64))


def test_ssim_is_wang_et_al_2004s_gaussian_window():
    a = scene(0)
    b = np.clip(a + 0.1 * np.random.default_rng(1).standard_normal(a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-9)
    # two flat images: only the luminance term is left, (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) with L = 1
    flat = ssim(np.full((16, 16, 3), 0.5), np.full((16, 16, 3), 0.25))
    assert flat == pytest.approx((2 * 0.125 + 1e-4) / (0.25 + 0.0625 + 1e-4))


def test_metrics_are_symmetric_and_a_batch_is_the_mean_of_its_images():
    a, b = scene(0), scene(1)
    assert psnr(a, b) == psnr(b, a) and ssim(a, b) == pytest.approx(ssim(b, a))
    c, d = scene(2), scene(3)
    assert ssim(np.stack([a, c]), np.stack([b, d])) == pytest.approx((ssim(a, b) + ssim(c, d)) / 2)


def test_a_shifted_image_scores_lower_the_further_it_moves():
    a = scene(4)
    near, far = (np.roll(a, shift, axis=1) for shift in (1, 4))
    assert 1.0 > ssim(a, near) > ssim(a, far)
    assert math.inf > psnr(a, near) > psnr(a, far)


def test_uint8_pil_and_tensors_are_converted_once():
    a = (scene(5) * 255).round().astype(np.uint8)
    b = np.roll(a, 2, axis=0)
    as_unit = psnr(a / 255.0, b / 255.0)
    assert psnr(a, b) == pytest.approx(as_unit)
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(as_unit)
    assert ssim([Image.fromarray(a)], [Image.fromarray(b)]) == pytest.approx(ssim(a / 255.0, b / 255.0))
    t = torch.from_numpy(a / 127.5 - 1)  # a VAE's [-1, 1]
    assert psnr(t, torch.from_numpy(b / 127.5 - 1), data_range=2.0) == pytest.approx(as_unit, abs=1e-4)
    assert as_float(a).dtype == np.float64 and as_float(a).max() <= 1.0


def test_ms_ssim_uses_the_scales_the_size_allows():
    assert [ms_ssim_scales(s) for s in (12, 24, 32, 64, 128, 1024)] == [1, 2, 3, 4, 5, 5]
    a = scene(6, size=64)
    value, scales = ms_ssim(a, np.roll(a, 2, axis=0))  # one image is a batch of one
    assert scales == 4 and 0 < value < 1
    assert ms_ssim(np.zeros((12, 12, 3)), np.zeros((12, 12, 3))) == (None, 1)


def test_bad_input_names_the_problem():
    a = scene()
    with pytest.raises(DiffspeedError, match="differ in shape") as err:
        psnr(a, a[:32])
    assert err.value.field == "images"
    with pytest.raises(DiffspeedError, match=r"values must lie in \[0, 1\]"):
        ssim(a * 2 - 1, a)
    with pytest.raises(DiffspeedError, match="data_range must be > 0"):
        psnr(a, a, data_range=0)
    with pytest.raises(DiffspeedError, match=r"\(H, W, C\)"):
        ssim(a[..., 0], a[..., 0])


def test_the_tiny_models_checks_use_the_same_ssim():
    from diffspeed.tiny import check

    assert check.ssim is ssim

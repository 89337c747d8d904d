import math

import numpy as np

from diffspeed.bench.metrics import fidelity


def test_fidelity_reports_the_shared_metrics():
    """The bench's numbers are diffspeed.metrics' (the same the tests' floors use), image by image for PSNR."""
    from diffspeed import metrics

    rng = np.random.default_rng(2)
    a = rng.random((2, 64, 64, 3))
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    f = fidelity(b, a)
    assert f["psnr_db"] == metrics.psnr(b, a) and f["ssim"] == metrics.ssim(b, a)
    assert (f["ms_ssim"], f["ms_ssim_scales"]) == metrics.ms_ssim(b, a)
    assert f["per_image_psnr_db"] == [metrics.psnr(x, y) for x, y in zip(b, a)]


def test_identical_images_are_exact():
    a = np.random.default_rng(0).random((2, 64, 64, 3))
    f = fidelity(a, a.copy())
    assert f["psnr_db"] == math.inf and f["ssim"] == 1.0 and f["ms_ssim"] == 1.0
    assert f["per_image_psnr_db"] == [math.inf, math.inf] and f["ms_ssim_scales"] == 4


def test_more_noise_is_less_fidelity():
    rng = np.random.default_rng(1)
    a = rng.random((2, 64, 64, 3))
    small, large = (np.clip(a + s * rng.standard_normal(a.shape), 0, 1) for s in (0.01, 0.1))
    fs, fl = fidelity(small, a), fidelity(large, a)
    assert 35 < fs["psnr_db"] < 45 and 15 < fl["psnr_db"] < 25  # 20 log10(1 / sigma), minus clipping
    assert fs["ssim"] > fl["ssim"] and fs["ms_ssim"] > fl["ms_ssim"]


def test_ms_ssim_is_skipped_with_a_reason_when_too_small():
    tiny = np.zeros((1, 12, 12, 3))
    f = fidelity(tiny, tiny)
    assert f["ms_ssim"] is None and any("too small" in n for n in f["notes"])


def test_lpips_is_skipped_with_a_reason_when_unavailable():
    f = fidelity(np.zeros((1, 64, 64, 3)), np.zeros((1, 64, 64, 3)))
    assert (f["lpips"] is None) == any(n.startswith("LPIPS skipped") for n in f["notes"])

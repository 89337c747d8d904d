import math

import numpy as np

from diffspeed.bench.metrics import fidelity, ms_ssim_scales


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


def test_ms_ssim_uses_the_scales_the_size_allows():
    assert [ms_ssim_scales(s) for s in (12, 24, 32, 64, 128, 1024)] == [1, 2, 3, 4, 5, 5]
    tiny = np.zeros((1, 12, 12, 3))
    f = fidelity(tiny, tiny)
    assert f["ms_ssim"] is None and any("too small" in n for n in f["notes"])


def test_lpips_is_skipped_with_a_reason_when_unavailable():
    f = fidelity(np.zeros((1, 64, 64, 3)), np.zeros((1, 64, 64, 3)))
    assert (f["lpips"] is None) == any(n.startswith("LPIPS skipped") for n in f["notes"])

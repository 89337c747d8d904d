"""Shared fixtures: the embedded tiny models, loaded once per test session (fp32 on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DIFFSPEED_TEST_THREADS=1 avoids oversubscription when something else (training) holds the cores
torch.set_num_threads(int(os.environ.get("DIFFSPEED_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(scope="session")
def tiny_sd():
    import diffspeed

    pipe = diffspeed.load("tiny-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl():
    import diffspeed

    pipe = diffspeed.load("tiny-sdxl", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images_equal(a, b) -> bool:
    import numpy as np

    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))

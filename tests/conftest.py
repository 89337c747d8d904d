"""Shared fixtures: the embedded tiny models, loaded once per test session (fp32 on the CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread budget for the whole test run: DIFFSPEED_TEST_THREADS (default min(2, cores), a quiet machine), or 1
# when something else (training, other test runs) holds the cores. It is written back to the environment with
# the OpenMP/MKL limits before torch loads, so processes the tests spawn (bench workers) inherit it instead of
# each starting one thread per core and oversubscribing the machine.
THREADS = max(1, int(os.environ.get("DIFFSPEED_TEST_THREADS") or min(2, os.cpu_count() or 1)))
for _name in ("DIFFSPEED_TEST_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = str(THREADS)

# the hardware probe's cache (diffspeed.hardware) goes to a folder of this run, not the user's ~/.cache
if "DIFFSPEED_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DIFFSPEED_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="diffspeed-test-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402  (after the thread limits, which must be set before torch loads)
import torch  # noqa: E402

torch.set_num_threads(THREADS)


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

"""tools/gpu_check.sh without a GPU: valid bash, and a dry run that lists every check and bench entry it would run.

The GPU run itself happens only on a lent machine; what can be checked here is that the script parses, that its
dry run exits 0 quickly without CUDA, and that it names every gpu test of tests/gpu, the SDXL 1024² bench with
every preset and the CUDA-only peers, and the tiny-sd bench. Also the bench plugin it passes (tests/gpu/
random_on_cuda.py): random weights built under the device context, the scheduler outside it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from diffspeed.bench import models
from diffspeed.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)  # the interpreter of this test run, not whatever python3 is
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT / "tests")  # the script finds the repo root itself


@pytest.fixture(scope="module")
def dry_run():
    t0 = time.perf_counter()
    proc = _run("--dry-run")
    return proc, time.perf_counter() - t0


def gpu_tests() -> list[str]:
    """``tests/gpu/FILE::test_name`` of every test function in tests/gpu."""
    found = []
    for path in sorted((ROOT / "tests" / "gpu").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        found += [f"tests/gpu/{path.name}::{n.name}" for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    return found


def test_the_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_says_how_to_prepare_and_run_it():
    proc = _run("--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    for text in ("--dry-run", "pip download", 'carry=[".whl"]', "timeout_s=540", "benchmarks/gpu-DATE-random-sdxl-1024",
                 "gpu-check.log", "bench-folders.tar.gz"):
        assert text in proc.stdout, text
    bad = _run("--no-such-option", timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_dry_run_exits_0_quickly_without_cuda(dry_run):
    proc, seconds = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seconds < 120, seconds  # a collection and two listings, nothing measured
    assert "nothing runs here" in proc.stdout


def test_dry_run_lists_every_gpu_test(dry_run):
    out = dry_run[0].stdout
    section = out.split("[pytest]")[1].split("[bench-sdxl]")[0]
    tests = gpu_tests()
    assert len(tests) >= 6  # fp16/bf16, TF32, SDPA, offload, compile, quantize
    for test in tests:  # a parametrized one is listed once per parameter: test[fp16], test[bf16]
        assert f"{test}\n" in section or f"{test}[" in section, test
    assert "-m pytest -q -m gpu" in section and "tests/gpu/test_cuda_optims.py" in section.splitlines()[1]
    assert "collected" in section and "ERROR" not in section and " error" not in section


def test_dry_run_lists_the_sdxl_bench_with_every_preset_and_the_cuda_peers(dry_run):
    out = dry_run[0].stdout
    sdxl = out.split("[bench-sdxl]")[1].split("[bench-tiny-sd]")[0]
    assert "diffspeed bench --model random:sdxl --size 1024 --steps 30 --device cuda" in sdxl
    assert "--only preset --only cpu_offload" in sdxl and "--out benchmarks/gpu-" in sdxl
    for name in PRESETS:
        assert f"preset {name} " in sdxl, name
    assert "peer diffusers pipe.enable_model_cpu_offload() [CUDA only]" in sdxl
    assert "baseline [" in sdxl and "baseline again" in sdxl
    assert "WARNING" not in out, "a CUDA-only peer is in no bench of tools/gpu_check.sh"
    tiny = out.split("[bench-tiny-sd]")[1]
    assert "diffspeed bench --model tiny-sd --device cuda --preset all" in tiny
    for name in PRESETS:
        assert f"preset {name} " in tiny, name


def test_dry_run_says_what_each_step_may_take(dry_run):
    out = dry_run[0].stdout
    for step in ("preflight", "probe", "pytest", "bench-sdxl", "bench-tiny-sd"):
        assert f"[{step}] timeout " in out, step
    total = int(out.rsplit("expected in all: ~", 1)[1].split()[0])
    assert total < 480  # the 8 minutes on one GPU


# ------------------------------------------------------------------------------------------ the bench plugin
class _Scheduler:
    def __init__(self, config=None):
        self.config = config or {"beta_start": 0.001}
        self.device = torch.empty(0).device.type  # where this construction put its tensors

    @classmethod
    def from_config(cls, config):
        return cls(dict(config))


def test_the_plugin_builds_weights_under_the_device_and_the_scheduler_outside(monkeypatch):
    def build(family, dtype=torch.float32, seed=0):
        return types.SimpleNamespace(family=family, weight=torch.empty(3, dtype=dtype), scheduler=_Scheduler())

    monkeypatch.setattr(models, "random_pipeline", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    path = ROOT / "tests" / "gpu" / "random_on_cuda.py"
    for _ in range(2):  # imported by a second plugin list too: wrapped once
        spec = importlib.util.spec_from_file_location("gpu_check_plugin", path)
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
    assert models.random_pipeline.__wrapped__ is build
    # the wrapper's own module (the first import): built on meta here, no GPU needed and no memory taken
    monkeypatch.setitem(models.random_pipeline.__globals__, "DEVICE", "meta")
    pipe = models.random_pipeline("sdxl")
    assert pipe.family == "sdxl" and pipe.weight.device.type == "meta"
    assert pipe.scheduler.device == "cpu" and pipe.scheduler.config == {"beta_start": 0.001}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.random_pipeline("sd15").weight.device.type == "cpu"  # no CUDA: built as before

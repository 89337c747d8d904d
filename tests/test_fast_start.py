"""Fast start: ``import diffspeed`` and the CLI's cheap paths (version, help, listings, input errors) never import
torch or diffusers. Each case runs in a fresh interpreter, since this test session has loaded torch long ago."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import diffspeed

# runs main(argv) and reports the exit status and which heavy modules got imported, as the last stdout line
PROBE = """
import json, sys
from diffspeed.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "loaded": [m for m in ("torch", "diffusers") if m in sys.modules]}))
"""


def _probe(argv: list[str], cwd) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_import_diffspeed_does_not_import_torch(tmp_path):
    code = ("import sys, diffspeed; diffspeed.__version__; diffspeed.DiffspeedError; "
            "assert not {'torch', 'diffusers'} & set(sys.modules), sorted({'torch', 'diffusers'} & set(sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_public_name_resolves():
    for name in diffspeed.__all__:
        assert getattr(diffspeed, name) is not None, name
    assert set(diffspeed.__all__) <= set(dir(diffspeed))
    assert callable(diffspeed.generate) and callable(diffspeed.bench) and diffspeed.bench.__name__ == "diffspeed.bench"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffspeed.nope  # noqa: B018


def test_importing_the_generate_module_keeps_the_generate_function(tmp_path):
    code = ("import diffspeed, diffspeed.generate as g, inspect; "
            "assert inspect.isfunction(diffspeed.generate), diffspeed.generate")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["generate", "--help"], ["bench", "--help"],
                                  ["convert", "--help"]], ids=" ".join)
def test_version_and_help_without_torch(tmp_path, argv):
    result, _ = _probe(argv, tmp_path)
    assert result == {"code": 0, "loaded": []}


@pytest.mark.parametrize("argv", [["optimizations"], ["presets"]], ids=" ".join)
def test_listings_without_torch(tmp_path, argv):
    result, _ = _probe(argv, tmp_path)
    assert result == {"code": 0, "loaded": []}


@pytest.mark.parametrize(("argv", "field"), [
    (["generate", "x", "--steps", "0"], "steps"),
    (["generate", "x", "--sampler", "Fastest"], "sampler"),
    (["generate", "x", "--device", "tpu"], "device"),
    (["generate", "x", "--out", "file.txt"], "out"),
    (["bench", "--out", "file.txt"], "out"),
    (["bench", "--device", "tpu"], "device"),
    (["generate", "x", "--steps", "abc"], "--steps"),
    (["generate", "x", "--lora", "tiny-sd-lora-monochrome:abc"], "lora weight"),
    (["generate", "x", "--recipe", "file.txt"], "recipe"),
    (["generate", "x", "--opt", "deepcache:interval=0"], "deepcache.interval"),
    (["generate", "x", "--opt", "sampler:steps=3", "--steps", "2"], "steps"),
    (["generate", "x", "--init-image", "missing.png"], "init_image"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_validation_errors_without_torch(tmp_path, argv, field):
    (tmp_path / "file.txt").write_text("not a folder")
    result, err = _probe(argv, tmp_path)
    assert result == {"code": 2, "loaded": []}
    assert err.count("\n") == 1 and err.startswith("diffspeed: error: ") and field in err, err


def test_a_real_run_keeps_stderr_for_diffspeed(tmp_path):
    """Deferring quiet_loading (so validation stays torch-free) still silences the libraries once a model loads:
    no loading progress bars, no 5.7 KB peft warning for the shipped LoRA."""
    proc = subprocess.run([sys.executable, "-m", "diffspeed", "generate", "a red circle at center on a blue "
                           "background", "--steps", "1", "--seed", "1", "--lora", "tiny-sd-lora-monochrome:0.8",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Loading pipeline components" not in proc.stderr and "PEFT" not in proc.stderr, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("*.png"))) == 1

import subprocess
import sys

import pytest

from diffspeed.cli import main
from diffspeed.pngmeta import read_parameters

PROMPT = "a yellow star at center on a purple background"


def test_generate_writes_png_with_parameters(tmp_path, capsys):
    rc = main(["generate", PROMPT, "--seed", "3", "--steps", "4", "--sampler", "Euler a", "--out", str(tmp_path),
               "--batch-size", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-3.png", "00001-4.png"]
    meta = read_parameters(pngs[1])
    assert meta["prompt"] == PROMPT and meta["Seed"] == "4" and meta["Sampler"] == "Euler a"
    assert "s/image" in out and "it/s" in out


@pytest.mark.parametrize(("args", "field"), [
    (["--width", "100"], "width"), (["--height", "8"], "height"), (["--steps", "0"], "steps"),
    (["--sampler", "Fastest"], "sampler"), (["--model", "missing.safetensors"], "model"),
    (["--cfg-scale", "-2"], "cfg_scale"), (["--batch-size", "0"], "batch_size"),
    (["--init-image", "nowhere.png"], "init_image"), (["--mask", "nowhere.png"], "mask_image"),
    (["--denoising-strength", "2"], "denoising_strength"), (["--hires-scale", "9"], "hires_scale"),
    (["--hires-upscaler", "magic"], "hires_upscaler"), (["--lora", "missing.safetensors"], "lora"),
    (["--lora", "x.safetensors:50"], "lora weight"), (["--preset", "turbo"], "preset"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, field):
    rc = main(["generate", PROMPT, "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and field in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


def test_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    assert main(["generate", PROMPT, "--model", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint" in err


def test_console_script_usage_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffspeed", "generate", PROMPT, "--steps", "abc"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--steps" in proc.stderr


def test_generate_img2img_inpaint_and_hires_from_the_command_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 70, 220)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), np.uint8)
    m[20:44, 20:44] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--seed", "1", "--steps", "4", "--out", str(out), "--init-image", str(init),
                 "--denoising-strength", "0.5"]) == 0
    assert main(["generate", PROMPT, "--seed", "1", "--steps", "4", "--out", str(out), "--init-image", str(init),
                 "--mask", str(mask)]) == 0
    assert main(["generate", PROMPT, "--seed", "1", "--steps", "4", "--out", str(out), "--hires-scale", "1.5",
                 "--hires-upscaler", "lanczos"]) == 0
    a, b, c = (read_parameters(p) for p in sorted(out.glob("*.png")))
    assert a["Denoising strength"] == "0.5" and a["Size"] == "64x64"
    assert b["Mask blur"] == "4" and b["Denoising strength"] == "0.75"
    assert c["Size"] == "96x96" and c["Hires upscaler"] == "Lanczos" and c["Hires upscale"] == "1.5"


@pytest.mark.parametrize(("args", "field"), [
    (["--steps", "0"], "steps"), (["--runs", "0"], "runs"), (["--warmup", "99"], "warmup"),
    (["--size", "100"], "width"), (["--preset", "turbo"], "preset"), (["--queue", "nowhere.json"], "queue"),
    (["--prompts", "9"], "prompts"), (["--opt", "warp_drive"], "warp_drive"), (["--recipe", "none.toml"], "recipe"),
    (["--sampler", "Fastest"], "sampler"),
])
def test_bench_bad_input_is_one_line_exit_2(tmp_path, capsys, args, field):
    rc = main(["bench", "--out", str(tmp_path / "b"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and field in err and "Traceback" not in err, err
    assert not (tmp_path / "b" / "results.json").exists()


def test_generate_with_a_preset_and_list_presets(tmp_path, capsys):
    assert main(["generate", PROMPT, "--seed", "3", "--steps", "12", "--preset", "fastest", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "optimizations: precision, deepcache, cfg_cutoff" in out and "deepcache_cached_calls=" in out
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in ("quality", "balanced", "fastest", "low-vram-8gb", "low-vram-6gb", "low-vram-4gb"):
        assert f"{name}: " in listing
    assert listing.count("    cuda: ") == 6 and listing.count("    cpu: ") == 6

import os
import subprocess
import sys

import pytest

from diffspeed import cli
from diffspeed.cli import main
from diffspeed.errors import DiffspeedRuntimeError
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
    # which recipe "fastest" is depends on this machine's hardware class (bf16 or not): ask the library
    from diffspeed.presets import preset_recipe

    names = ", ".join(c.name for c in preset_recipe("fastest", "cpu").optimizations)
    assert f"optimizations: {names}\n" in out and "deepcache_cached_calls=" in out
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in ("quality", "balanced", "fastest", "low-vram-8gb", "low-vram-6gb", "low-vram-4gb"):
        assert f"{name}: " in listing
    assert listing.count("        recipe: ") == 6  # one recipe per preset, for this machine's hardware class


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffspeed: error: ") and "Traceback" not in err, err
    return err


def _failing_generate(monkeypatch, exc: BaseException):
    def cmd_generate(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_generate", cmd_generate)


@pytest.mark.parametrize(("exc", "code", "words"), [
    (RuntimeError("boom\nsecond line"), 1, "RuntimeError: boom (run with --debug for the traceback)"),
    (DiffspeedRuntimeError("write failed: disk full"), 1, "write failed: disk full"),
    (MemoryError(), 1, "out of memory while generating; try --preset low-vram-6gb"),
    (KeyError("x"), 1, "KeyError: 'x'"),
])
def test_runtime_failures_exit_1_with_one_line(tmp_path, capsys, monkeypatch, exc, code, words):
    _failing_generate(monkeypatch, exc)
    assert main(["generate", PROMPT, "--out", str(tmp_path)]) == code
    assert words in _one_line(capsys)


def test_torch_out_of_memory_names_a_preset_that_fits(tmp_path, capsys, monkeypatch):
    import torch

    _failing_generate(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert main(["generate", PROMPT, "--out", str(tmp_path)]) == 1
    err = _one_line(capsys)
    assert "out of memory while generating" in err and "low-vram-6gb" in err and "--width" in err


def test_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    _failing_generate(monkeypatch, KeyboardInterrupt())
    assert main(["generate", PROMPT, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "diffspeed: interrupted\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, where):
    _failing_generate(monkeypatch, RuntimeError("boom"))
    args = ["generate", PROMPT, "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", *args] if where == "before" else [*args, "--debug"])


def test_bench_exits_1_when_an_entry_failed_and_still_writes_the_report(tmp_path, capsys, monkeypatch):
    from diffspeed.bench import runner

    def bench(model, *, out, **kwargs):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write("# the report\n")
        return {"entries": [{"name": "baseline", "status": "ok"}, {"name": "planted-crash", "status": "failed"}]}

    monkeypatch.setattr(runner, "bench", bench)
    out = tmp_path / "b"
    assert main(["bench", "--out", str(out), "--quiet", "--preset", "quality", "--steps", "2"]) == 1
    captured = capsys.readouterr()
    assert "# the report" in captured.out and (out / "report.md").exists()
    assert captured.err.count("\n") == 1 and "1 bench entry failed: planted-crash" in captured.err


@pytest.mark.parametrize("case", ["file", "under-a-file", "uncreatable"])
def test_generate_out_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(cli, "cmd_generate", lambda args: pytest.fail("generated although --out is unusable"))
    (tmp_path / "taken").write_text("keep me")
    out = {"file": tmp_path / "taken", "under-a-file": tmp_path / "taken" / "sub",
           "uncreatable": "/proc/diffspeed-out"}[case]
    assert main(["generate", PROMPT, "--out", str(out)]) == 2
    assert "out: " in _one_line(capsys) and (tmp_path / "taken").read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_generate_out_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["generate", PROMPT, "--out", str(folder / "new")]) == 2
        assert "cannot write" in _one_line(capsys)
    finally:
        folder.chmod(0o755)


def test_out_check_leaves_nothing_behind(tmp_path):
    cli.check_out_dir(str(tmp_path / "a" / "b"), "out")
    assert list(tmp_path.iterdir()) == []  # the folder is created by the save, not by the check


def test_bench_out_naming_a_file_is_one_line_exit_2(tmp_path, capsys):
    taken = tmp_path / "report.txt"
    taken.write_text("keep me")
    assert main(["bench", "--out", str(taken), "--quiet"]) == 2
    assert "is a file" in _one_line(capsys) and taken.read_text() == "keep me"


@pytest.mark.parametrize(("args", "words"), [
    (["--device", "tpu"], "device must be one of cpu, cuda"),
    (["--lora", "tiny-sd-lora-monochrome:abc"], "lora weight 'abc' is not a number"),
    (["--recipe", "{bad_utf8}"], "byte offset 11"),
    (["--recipe", "{nested}"], "nests brackets too deeply"),
    (["--init-image", "{bomb}"], "init_image: "),
    (["--init-image", "{bad_utf8}"], "init_image: cannot read"),
])
def test_hostile_and_malformed_input_is_one_line_exit_2(tmp_path, capsys, args, words):
    from tests.pipelines.test_workflows import png_header

    files = {"{bad_utf8}": tmp_path / "r.toml", "{nested}": tmp_path / "n.json", "{bomb}": tmp_path / "bomb.png"}
    files["{bad_utf8}"].write_bytes(b'name = "caf\xe9"\n')
    files["{nested}"].write_text("[" * 100_000)
    files["{bomb}"].write_bytes(png_header(40_000, 40_000))
    args = [str(files.get(a, a)) for a in args]
    assert main(["generate", PROMPT, "--out", str(tmp_path / "out"), *args]) == 2
    assert words in _one_line(capsys)


def test_help_shows_defaults(capsys):
    for command in ("generate", "bench", "convert", "presets", "optimizations"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert command == "presets" or command == "optimizations" or "(default: " in text, command
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: tiny-sd)" in text and "(default: outputs)" in text and "(default: 1)" in text
    assert "else DPM++ 2M)" in text and "sampler steps, else 20)" in text


def test_main_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and "130  interrupted" in out and "--debug" in out


def test_generate_shows_the_slow_dtype_warning_in_one_line(tmp_path, capsys, monkeypatch):
    """quiet_loading hides library UserWarnings while a command runs; diffspeed's own SlowDtypeWarning still
    reaches the user, as one line."""
    from diffspeed import hardware

    monkeypatch.setattr(hardware, "is_fast", lambda profile, dtype: (False, f"{dtype} matmul 61x slower (test)"))
    assert main(["generate", PROMPT, "--seed", "1", "--steps", "1", "--opt", "precision:unet=bf16",
                 "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "SlowDtype" in line or "slower than fp32" in line]
    assert lines == ["diffspeed: warning: precision: bf16 compute is slower than fp32 on this cpu (bf16 matmul 61x "
                     "slower (test)); set precision.compute = \"fp32\" to keep the memory saving at fp32 speed"], err

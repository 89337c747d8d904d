"""``diffspeed tune`` on the command line: bad input is one line and exit 2 (without torch); a run writes a recipe
that ``diffspeed generate --recipe`` loads unchanged; none fitting is exit 1 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import diffspeed
import diffspeed.tune.run as run_module
from diffspeed.cli import build_recipe, main
from diffspeed.core import Recipe
from tests.tune.planted import PROFILE, PlantedMeasure


@pytest.mark.parametrize(("args", "field"), [
    (["--min-ssim", "2"], "min_ssim"), (["--min-psnr", "-1"], "min_psnr"),
    (["--min-adherence", "1.5"], "min_adherence"),
    (["--max-memory", "lots"], "max_memory"), (["--max-memory", "0MB"], "max_memory"),
    (["--include", "deepcach"], "include"), (["--exclude", "tome,nope"], "exclude"),
    (["--include", "tome", "--exclude", "tome"], "exclude"), (["--time-budget", "soon"], "time_budget"),
    (["--size", "100"], "size"), (["--size", "64x"], "size"), (["--steps", "0"], "steps"),
    (["--sampler", "Fastest"], "sampler"), (["--runs", "0"], "runs"), (["--min-ssim", "x"], "--min-ssim"),
    (["--model", "random:sd15", "--min-adherence", "0.8"], "min_adherence"), (["--device", "tpu"], "device"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, field):
    try:
        rc = main(["tune", "--out", str(tmp_path / "t"), *args])
    except SystemExit as exit:  # argparse's own errors (a value that is not a number)
        rc = exit.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("diffspeed: error: ") and field in err, err
    assert not (tmp_path / "t").exists()


def test_bad_input_does_not_import_torch(tmp_path):
    code = ("import json, sys\nfrom diffspeed.cli import main\nrc = main(['tune', '--min-ssim', '2'])\n"
            "print(json.dumps([rc, [m for m in ('torch', 'diffusers') if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [2, []], proc.stderr


@pytest.fixture
def planted(monkeypatch):
    """The CLI's tune() on the planted world instead of real bench runs."""
    real = run_module.tune

    def tune(*args, **kwargs):
        m = PlantedMeasure(kwargs["options"].seed)
        return real(*args, measure=m, clock=m.clock, profile=PROFILE, **kwargs)

    monkeypatch.setattr(run_module, "tune", tune)


def test_a_run_writes_a_recipe_that_generate_loads_unchanged(tmp_path, capsys, planted):
    out = tmp_path / "tuned-run"
    rc = main(["tune", "--max-memory", "800MB", "--min-ssim", "0.9", "--time-budget", "10m", "--out", str(out),
               "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 0 and stdout.startswith("chosen: ") and "front: " in stdout
    path = out / "tuned.toml"
    data = json.loads((out / "results.json").read_text())
    chosen = Recipe.from_dict({"optimization": data["choice"]["recipe"]})
    loaded = build_recipe(str(path), [])  # what `diffspeed generate --recipe tuned.toml` does with it
    assert loaded.optimizations == chosen.optimizations and loaded.name == "tuned"
    assert "x the baseline" in loaded.description
    again = tmp_path / "again.toml"
    Recipe.load(path).save(again)
    assert again.read_text() == path.read_text()  # load -> save changes nothing
    from diffspeed.server.app import _recipe  # the server's per-request recipe: the file's text, unchanged

    served = _recipe(None, None, path.read_text())
    assert served.optimizations == chosen.optimizations
    for name in ("report.md", "report.html", "measurements.jsonl"):
        assert (out / name).is_file()


def test_nothing_fits_is_exit_1_with_one_line(tmp_path, capsys, planted):
    rc = main(["tune", "--max-memory", "100MB", "--time-budget", "5m", "--out", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1 and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and "no candidate meets --max-memory 100MB; closest: " in captured.err
    assert not (tmp_path / "tuned.toml").exists() and (tmp_path / "report.md").is_file()


def test_python_api():
    assert callable(diffspeed.tune) and diffspeed.tune.__name__ == "diffspeed.tune"
    m = PlantedMeasure(0)
    result = diffspeed.tune("tiny-sd", measure=m, clock=m.clock, profile=PROFILE, progress=False, write=False,
                            max_memory="800MB", min_ssim=0.9, time_budget="10m")
    assert result.choice is not None and result.front and result.choice in result.front
    assert json.loads(json.dumps(run_module.TuneResult.to_dict(result), default=str))["choice"]["key"]
    from diffspeed.errors import DiffspeedError

    with pytest.raises(DiffspeedError, match="unknown setting 'budget'"):
        diffspeed.tune("tiny-sd", budget=3)

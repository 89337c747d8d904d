"""``diffspeed.bench``: one real bench on tiny-sd (every entry in its own process) checked for what the
report promises -- a stable, complete schema; the same recipe twice is exact; a planted pause is counted in the
entry's stats and included in its timing; a recipe that fails mid-run is recorded as failed while the rest go
on. No test compares two entries' wall clocks: load on the machine can reorder them."""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from diffspeed.bench.peers import tomesd_package
from diffspeed.bench.runner import SCHEMA, Entry, bench, pareto_front
from diffspeed.errors import DiffspeedError
from diffspeed.optim.attention import AttentionConfig
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.vae_tiling import VaeTilingConfig

PLUGIN = str(Path(__file__).with_name("plugin_planted.py"))
THREADS = int(os.environ["DIFFSPEED_TEST_THREADS"])  # set by conftest.py for this run; workers get the same

TOP_KEYS = {"schema", "created", "command", "environment", "hardware", "settings", "fidelity_note", "noise", "entries",
            "pareto", "files"}
ENTRY_KEYS = {"name", "kind", "source", "what", "slug", "recipe", "peer", "settings", "status", "error", "phase",
              "images", "seconds_per_image", "stats", "derived", "events", "ratios", "fidelity", "log", "adherence",
              "sampling"}
OK_KEYS = {"load_s", "setup_s", "first_call_s", "timing", "memory", "width", "height"}
TIMING_KEYS = {"mean_s", "median_s", "min_s", "max_s", "stdev_s", "it_per_s", "n"}
FIDELITY_KEYS = {"psnr_db", "ssim", "ms_ssim", "ms_ssim_scales", "lpips", "notes", "per_image_psnr_db"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    entries = [Entry("planted slow", "recipe", "test", {"optimization": [{"name": "test_sleep", "seconds": 0.25}]}),
               Entry("planted failure", "recipe", "test", {"optimization": [{"name": "test_fail", "at_call": 6}]}),
               Entry.of_recipe([CfgCutoffConfig(fraction=0.0)], "no guidance"),
               Entry.of_recipe([AttentionConfig(backend="xformers")], "xformers"),
               Entry.of_recipe([VaeTilingConfig(tile_size=8192)], "tiles larger than the image"),
               Entry.of_peer(tomesd_package(0.5))]
    with pytest.MonkeyPatch.context() as mp:  # the hardware probe's cache goes here, not to the user's
        mp.setenv("DIFFSPEED_CACHE_DIR", str(out / "probe-cache"))
        data = bench("tiny-sd", entries=entries, steps=3, runs=2, warmup=1, prompts=2, plugins=[PLUGIN],
                     threads=THREADS, out=out, progress=False, command="pytest bench")
    return data, out


def by_name(data):
    return {e["name"]: e for e in data["entries"]}


def test_results_json_is_strict_complete_and_matches_the_return_value(run):
    data, out = run
    def refuse(token):
        raise ValueError(f"non-strict JSON constant {token}")
    disk = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert set(disk) == TOP_KEYS and disk["schema"] == SCHEMA == "diffspeed.bench/1"
    assert [e["name"] for e in disk["entries"]] == ["baseline", "planted slow", "planted failure", "no guidance",
                                                     "xformers", "tiles larger than the image", "tomesd ratio 0.5",
                                                     "baseline again"]
    assert disk["noise"]["baseline_again_speed"] == disk["entries"][-1]["ratios"]["speed"] > 0
    for e in disk["entries"]:
        assert ENTRY_KEYS <= set(e), e["name"]
        if e["status"] == "ok":
            assert OK_KEYS <= set(e) and set(e["timing"]) == TIMING_KEYS and set(e["fidelity"]) == FIDELITY_KEYS
            assert e["timing"]["n"] == 2 * 2 and len(e["seconds_per_image"]) == 4
            assert e["timing"]["min_s"] <= e["timing"]["median_s"] <= e["timing"]["max_s"]
            assert e["memory"]["peak_mb"] > 100 and e["memory"]["device"] == "cpu"
            assert {"speed", "memory"} == set(e["ratios"]) and len(e["images"]) == 2
            assert all((out / p).is_file() for p in e["images"])
    env, settings = disk["environment"], disk["settings"]
    assert env["torch"] and env["diffusers"] and env["device"] == "cpu" and disk["command"] == "pytest bench"
    assert settings["model"] == "tiny-sd" and settings["width"] == 64 and len(settings["queue"]) == 2
    assert settings["isolation"] == "one process per entry"
    assert settings["cfg"] == 3.0 and settings["cfg_source"] == "model card"  # tiny-sd's card, not the web UI's 7
    assert settings["adherence"]  # the tiny queue's prompts are colour-check captions: every ok row is scored
    for e in disk["entries"]:
        assert e["sampling"]["steps"] == 3 and e["sampling"]["cfg"] == 3.0, e["name"]
        assert (e["adherence"] is not None) == (e["status"] == "ok"), e["name"]
        if e["adherence"]:
            assert e["adherence"]["images"] == 2 and 0 <= e["adherence"]["background"] <= 1
    hw = disk["hardware"]  # where the numbers came from: half-precision speed differs 100x between CPUs
    assert hw["kind"] == "cpu" and hw["capability"] in ("DEFAULT", "AVX2", "AVX512") and hw["cores"] >= 1
    assert hw["torch_version"] == env["torch"] and hw["source"] in ("probe", "cache")
    assert all(hw["measured"][d][op] > 0 for d in ("bf16", "fp16") for op in ("matmul", "conv"))
    assert list((out / "probe-cache").glob("probe-cpu-*.json")) and not list(out.glob(".*.tmp"))
    from diffspeed.bench.report import load_results

    assert load_results(out)["entries"] == json.loads(json.dumps(data["entries"]))  # the same, inf included


def test_an_entry_that_did_nothing_is_shown_as_no_effect(run):
    """The effect check in the bench: vae_tiling with tiles larger than the image applies, runs, tiles nothing."""
    data, out = run
    row = by_name(data)["tiles larger than the image"]
    assert row["status"] == "ok" and row["stats"]["no_effect:vae_tiling"] >= 1
    assert any(e.startswith("vae_tiling: no effect") for e in row["events"])
    assert "no effect: vae_tiling" in (out / "report.md").read_text()
    assert not any(k.startswith("no_effect:") for k in by_name(data)["no guidance"]["stats"])


def test_same_recipe_twice_is_exact(run):
    """The noise check at the end runs the baseline's (empty) recipe again in a new process."""
    entries = by_name(run[0])
    again = entries["baseline again"]["fidelity"]
    assert again["psnr_db"] == math.inf and again["ssim"] == 1.0 and again["ms_ssim"] == 1.0
    assert entries["baseline"]["ratios"]["speed"] == 1.0 and entries["baseline"]["fidelity"]["psnr_db"] == math.inf
    no_cfg = entries["no guidance"]
    assert no_cfg["status"] == "ok" and 5 < no_cfg["fidelity"]["psnr_db"] < 60 and no_cfg["fidelity"]["ssim"] < 1
    assert no_cfg["derived"]["cfg_off_fraction"] == 1.0


def test_planted_pause_is_counted_and_included_in_the_timing(run):
    """The bench records what the planted work did: one 0.25 s pause per UNet call, counted into the stats of
    the last run's images, and every timed image took at least its pauses (a sleep never ends early). Lower
    bounds only, so a busy machine cannot flip the result."""
    data, _ = run
    slow = by_name(data)["planted slow"]
    stats, images = slow["stats"], len(data["settings"]["queue"])
    assert stats["test_sleep_calls"] == stats["denoiser_calls"] >= 3 * images  # >= 3 steps per image
    pauses_per_image = stats["test_sleep_calls"] / images
    assert min(slow["seconds_per_image"]) >= pauses_per_image * 0.25
    assert slow["timing"]["min_s"] == min(slow["seconds_per_image"]) and slow["fidelity"]["psnr_db"] == math.inf


def test_failure_mid_run_is_recorded_and_the_bench_goes_on(run):
    data, out = run
    entries = by_name(data)
    failed = entries["planted failure"]
    assert failed["status"] == "failed" and failed["phase"] == "timed"
    assert "RuntimeError: planted failure at UNet call 6" in failed["error"]
    assert failed["fidelity"] is None and failed["ratios"] == {}
    assert entries["no guidance"]["status"] == "ok" and entries["tomesd ratio 0.5"]["status"] == "ok"
    skipped = entries["xformers"]
    assert skipped["status"] == "skipped" and "xformers" in skipped["error"]
    md = (out / "report.md").read_text()
    assert "failed: RuntimeError: planted failure" in md and "skipped:" in md


def test_reports_hold_the_table_grids_and_plots(run):
    data, out = run
    files = data["files"]
    assert len(files["grids"]) == 2 and files["scatter"] and files["memory_plot"]
    for rel in files["grids"] + [files["scatter"], files["memory_plot"], "report.md", "report.html"]:
        assert (out / rel).is_file() and (out / rel).stat().st_size > 1000, rel
    md = (out / "report.md").read_text()
    for e in data["entries"]:
        assert f"| {e['name']} |" in md or f"| **{e['name']}** |" in md
    assert "machine: cpu" in md and "torch 2" in md and "command: pytest bench" in md
    assert f"hardware: CPU {data['hardware']['name']}, capability {data['hardware']['capability']}" in md
    assert "bf16 matmul" in md and "the time of fp32" in md
    assert set(data["pareto"]) <= {e["name"] for e in data["entries"] if e["status"] == "ok"}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser_check(html: Path) -> str:
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    start = dom.find('data-check="')
    return dom[start + 12:dom.find('"', start + 12)] if start >= 0 else "no verdict in the DOM"


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (apt-get install chromium)")
def test_html_report_opens_in_a_headless_browser_without_errors(run, tmp_path):
    _, out = run
    assert _browser_check(out / "report.html") == "ok"
    broken = tmp_path / "copy"  # the check can fail: the same page without its grids
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("grids"))
    verdict = _browser_check(broken / "report.html")
    assert verdict.startswith("errors: image failed") and "grids/prompt-2.png" in verdict


def test_a_worker_that_hangs_is_killed_and_recorded(tmp_path):
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")
    data = bench("tiny-sd", entries=[], steps=1, runs=1, warmup=0, prompts=1, plugins=[str(hang)], timeout=4,
                 out=tmp_path / "out", progress=False)
    (base,) = data["entries"]
    assert base["status"] == "failed" and "timed out after 4 s" in base["error"]
    assert data["pareto"] == [] and "failed: timed out" in (tmp_path / "out" / "report.md").read_text()


def test_pareto_front_keeps_only_undominated_entries():
    def row(name, speed, psnr):
        return {"name": name, "status": "ok", "ratios": {"speed": speed, "memory": 1.0},
                "fidelity": {"psnr_db": psnr}}
    rows = [row("baseline", 1.0, math.inf), row("a", 2.0, 30.0), row("b", 1.5, 25.0), row("c", 3.0, 20.0),
            {"name": "d", "status": "failed", "ratios": {}, "fidelity": None}]
    assert pareto_front(rows, fidelity=True) == ["baseline", "a", "c"]


def test_bad_settings_name_the_field():
    for kwargs, field in (({"steps": 0}, "steps"), ({"runs": 0}, "runs"), ({"size": 100}, "width"),
                          ({"cfg": -1.0}, "cfg_scale"), ({"prompts": 9}, "prompts")):
        with pytest.raises(DiffspeedError) as err:
            bench("tiny-sd", entries=[], progress=False, **kwargs)
        assert err.value.field == field, kwargs


def test_bench_is_public_api():
    import diffspeed
    import diffspeed.bench.metrics as metrics  # the callable package still has its modules

    assert callable(diffspeed.bench) and callable(metrics.fidelity) and "fastest" in diffspeed.PRESETS
    assert [c.name for c in diffspeed.preset_recipe("fastest").optimizations] == ["precision", "deepcache",
                                                                                  "cfg_cutoff"]
    with pytest.raises(DiffspeedError):  # the call is bench() itself: its checks run
        diffspeed.bench("tiny-sd", steps=0, progress=False)


def test_preset_entries_resolve_with_the_profile():
    from diffspeed.bench.runner import preset_entries
    from diffspeed.hardware import HardwareProfile

    avx2 = HardwareProfile("cpu", "AMD EPYC 7B12", "AVX2", ("avx2",), cores=2, source="injected")
    amx = HardwareProfile("cpu", "Xeon 8480+", "AVX512", ("avx512f", "amx_bf16"), cores=2, source="injected")
    fp32, = preset_entries(["fastest"], "cpu", avx2)
    bf16, = preset_entries(["fastest"], "cpu", amx)
    assert "cpu-fp32: AVX2" in fp32.source and "precision" not in fp32.describe()
    assert "cpu-bf16: AVX512" in bf16.source and "precision(unet=bf16" in bf16.describe()

import json

from diffspeed.bench.runner import report_markdown, run_bench, save_report
from diffspeed.optim.attention import AttentionConfig
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig


def test_bench_reports_ratios_against_same_run_baseline(tiny_sd, tmp_path):
    suite = [("cfg_cutoff 0.0", [CfgCutoffConfig(fraction=0.0)]),
             ("xformers", [AttentionConfig(backend="xformers")])]
    data = run_bench(tiny_sd, "tiny-sd", suite, steps=2, size=64, cfg=7.0, repeats=1)
    base, cut, xf = data["results"]
    assert base["name"] == "baseline" and base["stats"]["unconditional_evals"] == base["stats"]["denoiser_calls"]
    assert cut["stats"].get("unconditional_evals", 0) == 0 and cut["psnr_db"] > 5
    assert xf["skipped"] and "xformers" in xf["skipped"]
    assert data["environment"]["torch"] and data["command"]
    md, js = save_report(data, tmp_path / "bench")
    text = md.read_text()
    assert "| baseline |" in text and "1.00x" in text and "skipped:" in text
    assert json.loads(js.read_text())["model"] == "tiny-sd"
    assert report_markdown(data) == text

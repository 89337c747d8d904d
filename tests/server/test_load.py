"""The server under concurrent load: tools/load_test.py, small, against a live server with a small queue.

24 txt2img requests (tiny-sd, 64x64, 4 steps) from 12 clients against max_queue=4, max_batch=4: more clients
than the queue and the running batch hold, so some get 429 and retry. Every request must end in exactly one
200 with its own image (right seed and prompt, none lost or duplicated, the server's counters agreeing), every
429 must carry Retry-After, batches of more than one request must form, and each image must equal (within one
level) the same request run alone afterwards.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import running

TOOL = Path(__file__).resolve().parents[2] / "tools" / "load_test.py"
REQUESTS, CLIENTS, STEPS = 24, 12, 4


def _tool():
    name = "diffspeed_tools_load_test"
    if name not in sys.modules:  # tools/ is not a package; dataclasses need the module registered
        spec = importlib.util.spec_from_file_location(name, TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def load_test():
    return _tool()


@pytest.fixture(scope="module")
def loaded(load_test, tmp_path_factory):
    """One load run (and its alone re-run) against a fresh server; plus a few urllib-client requests after."""
    from diffspeed.server.config import ServerConfig

    config = ServerConfig(max_queue=4, max_batch=4, outputs_dir=str(tmp_path_factory.mktemp("load-outputs")))
    specs = load_test.make_requests(REQUESTS, steps=STEPS, size=64)
    with running(config) as url:
        run = load_test.measure(url, specs, clients=CLIENTS, timeout=120.0, retry_cap=0.5, warmup=1)
        extra = load_test.make_requests(4, steps=STEPS, size=64, seed0=50_000)
        run["urllib"] = asyncio.run(load_test.run_load(url, extra, clients=4, timeout=120.0, force_urllib=True))
    run["checks"] = {c["name"]: c for c in run["checks"]}
    return run


def _ok(run, name):
    c = run["checks"][name]
    assert c["ok"], c["detail"]


def test_no_5xx_and_each_request_answered_once(loaded):
    _ok(loaded, "no_5xx")
    _ok(loaded, "all_200")
    _ok(loaded, "server_counts")  # done == 24, nothing failed, rejected == the 429s seen
    assert loaded["summary"]["statuses"].keys() <= {"200", "429"}


def test_images_distinct_and_carry_their_seed_and_prompt(loaded):
    _ok(loaded, "distinct_images")
    _ok(loaded, "seed_and_prompt")
    assert len({r["sha256"] for r in loaded["requests"]}) == REQUESTS


def test_each_image_equals_its_run_alone(loaded):
    _ok(loaded, "equal_to_alone")
    alone = loaded["summary"]["alone"]
    assert alone["compared"] == REQUESTS and alone["max_abs_diff"] <= 1


def test_full_queue_answers_429_with_retry_after(loaded):
    s = loaded["summary"]
    assert s["n429"] > 0, "12 clients against max_queue=4 should have met a full queue"
    _ok(loaded, "retry_after")
    assert s["server_metrics"]["rejected"] == s["n429"]


def test_batches_of_more_than_one_formed(loaded):
    m = loaded["summary"]["server_metrics"]
    assert m["max_batch_seen"] > 1 and m["mean_batch"] > 1, m
    assert max(int(k) for k in loaded["summary"]["batched_with_seen"]) >= 1
    assert max(int(k.split("-")[-1]) for k in m["batch_sizes"]) <= 4  # never more than max_batch


def test_urllib_client_gets_the_same_answers(loaded):
    outcomes = loaded["urllib"]["outcomes"]
    assert loaded["urllib"]["client"] == "urllib"
    assert [o.status for o in outcomes] == [200] * 4
    assert [o.seed_seen for o in outcomes] == [50_000 + i for i in range(4)]


# ------------------------------------------------------------------------------------------------ pure parts
def test_metrics_delta_reads_the_batch_histogram(load_test):
    def text(ones, fours, jobs):
        return "\n".join([
            "# TYPE diffspeed_batch_size histogram",
            f'diffspeed_batch_size_bucket{{le="1.0"}} {ones}', f'diffspeed_batch_size_bucket{{le="2.0"}} {ones}',
            f'diffspeed_batch_size_bucket{{le="4.0"}} {ones + fours}',
            f'diffspeed_batch_size_bucket{{le="+Inf"}} {ones + fours}',
            f"diffspeed_batch_size_count {ones + fours}", f"diffspeed_batch_size_sum {ones + 4 * fours}",
            f'diffspeed_jobs_total{{outcome="done"}} {jobs}', f"diffspeed_images_total {jobs}",
            "diffspeed_rejected_total 3.0"])

    before, after = load_test.parse_metrics(text(1, 0, 1)), load_test.parse_metrics(text(2, 3, 14))
    d = load_test.metrics_delta(before, after)
    assert d == {"batches": 4, "mean_batch": 13 / 4, "max_batch_seen": 4, "batch_sizes": {"1": 1, "3-4": 3},
                 "jobs": {"done": 13}, "images": 13, "rejected": 0}


def test_percentile_and_prompts(load_test):
    assert load_test.percentile([], 50) is None
    assert load_test.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert load_test.percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    assert len(set(load_test.prompts())) == len(load_test.prompts()) == 648
    with pytest.raises(ValueError):
        load_test.make_requests(649)

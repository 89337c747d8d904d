"""The server's routes, limits, queue behaviour and per-request recipes, against tiny-sd."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from diffspeed.server.config import Limits, ServerConfig

from .conftest import free_port, running

TXT = {"prompt": "a red circle on a white background", "steps": 6, "width": 64, "height": 64, "seed": 1,
       "sampler_name": "Euler"}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(b64png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB"), dtype=np.int16)


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ plain routes
def test_txt2img_response_shape_and_info(app_client):
    r = app_client.post("/sdapi/v1/txt2img", json=TXT)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 1
    assert pixels(body["images"][0]).shape == (64, 64, 3)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [1] and "Steps: 6, Sampler: Euler" in info["infotexts"][0]
    assert info["diffspeed"]["seconds"] > 0 and info["diffspeed"]["recipe"] == []
    assert body["parameters"]["prompt"] == TXT["prompt"]


def test_unknown_keys_are_ignored_and_wrong_types_name_the_field(app_client):
    assert app_client.post("/sdapi/v1/txt2img", json={**TXT, "no_such_key": [1, 2]}).status_code == 200
    r = app_client.post("/sdapi/v1/txt2img", json={**TXT, "steps": "many", "cfg_scale": {}})
    assert r.status_code == 422
    assert {tuple(d["loc"]) for d in r.json()["detail"]} == {("body", "steps"), ("body", "cfg_scale")}


def test_every_problem_is_listed_with_its_field(app_client):
    r = app_client.post("/sdapi/v1/txt2img", json={**TXT, "steps": 0, "width": 100, "sampler_name": "Euler b"})
    assert r.status_code == 422
    assert {d["loc"][-1] for d in r.json()["detail"]} >= {"steps", "width", "sampler_name"}
    r = app_client.post("/sdapi/v1/txt2img", json={**TXT, "tiling": True, "restore_faces": True})
    assert {d["loc"][-1] for d in r.json()["detail"]} == {"tiling", "restore_faces"}  # would draw another picture


@pytest.mark.parametrize(("change", "field"), [
    ({"width": 4096}, "width"), ({"steps": 1000}, "steps"), ({"batch_size": 9}, "batch_size"),
    ({"prompt": "x" * 5000}, "prompt"),
])
def test_server_limits(app_client, change, field):
    r = app_client.post("/sdapi/v1/txt2img", json={**TXT, **change})
    assert r.status_code == 422 and field in json.dumps(r.json()["detail"])


def test_models_and_paths_on_the_server_disk_cannot_be_named(app_client, tmp_path):
    r = app_client.post("/sdapi/v1/img2img", json={**TXT, "init_images": ["/etc/hosts"]})
    assert r.status_code == 422 and "init_images" in json.dumps(r.json())
    r = app_client.post("/sdapi/v1/txt2img", json={**TXT, "override_settings": {"sd_model_checkpoint": "/etc"}})
    assert r.status_code == 422 and "sd_model_checkpoint" in json.dumps(r.json())
    r = app_client.post("/sdapi/v1/txt2img", json={**TXT, "prompt": "x <lora:../../etc/passwd:1>"})
    assert r.status_code == 422


def test_a_decompression_bomb_is_refused_unread(app_client):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    r = app_client.post("/sdapi/v1/img2img", json={**TXT, "init_images": [base64.b64encode(bomb).decode()]})
    assert r.status_code in (413, 422) and "pixels" in json.dumps(r.json())


def test_img2img_and_inpaint(app_client):
    init = Image.new("RGB", (64, 64), (30, 70, 220))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = app_client.post("/sdapi/v1/img2img", json={**TXT, "init_images": [b64(init)], "denoising_strength": 0.5})
    assert r.status_code == 200
    r = app_client.post("/sdapi/v1/img2img", json={**TXT, "init_images": [b64(init)], "mask": b64(mask),
                                                    "inpaint_full_res": False, "inpainting_fill": 1})
    assert r.status_code == 200
    out = pixels(r.json()["images"][0])
    assert np.abs(out[:8, :8] - np.asarray(init)[:8, :8]).max() <= 2  # outside the mask: the original


def test_lists_options_png_info_and_docs(app_client):
    for route in ("samplers", "schedulers", "sd-models", "loras", "upscalers", "latent-upscale-modes", "scripts",
                  "memory", "options", "progress"):
        assert app_client.get(f"/sdapi/v1/{route}").status_code == 200, route
    models = app_client.get("/sdapi/v1/sd-models").json()
    assert {"tiny-sd", "tiny-sdxl"} <= {m["model_name"] for m in models}
    assert all("/" not in m["filename"] for m in models)  # no server paths
    assert app_client.get("/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]
    assert app_client.get("/docs").status_code == 200
    assert "<title>" in app_client.get("/").text
    image = app_client.post("/sdapi/v1/txt2img", json=TXT).json()["images"][0]
    info = app_client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert info["info"].startswith(TXT["prompt"]) and info["parameters"]["Seed"] == "1"
    r = app_client.post("/sdapi/v1/options", json={"no_such_option": 1})
    assert r.status_code == 422 and "no_such_option" in json.dumps(r.json())


def test_options_switch_the_model_through_the_ram_cache(tmp_path):
    from fastapi.testclient import TestClient

    from diffspeed.server.app import create_app

    app = create_app(ServerConfig(outputs_dir=str(tmp_path)))
    with TestClient(app) as client:
        state = app.state.diffspeed
        sdxl = next(m["title"] for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "tiny-sdxl")
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": sdxl}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == sdxl
        info = json.loads(client.post("/sdapi/v1/txt2img", json=TXT).json()["info"])
        assert info["sd_model_name"] == "tiny-sdxl"
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd"})
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"})
        stats = state.resolver.models.stats
        assert stats.misses == 2 and stats.hits >= 2  # each model read from disk once


def test_save_images_writes_under_the_outputs_folder_only(app_client):
    before = set(app_client.outputs.rglob("*.png"))
    r = app_client.post("/sdapi/v1/txt2img", json={**TXT, "save_images": True, "send_images": False})
    assert r.status_code == 200 and r.json()["images"] == []
    new = set(app_client.outputs.rglob("*.png")) - before
    assert len(new) == 1 and all(app_client.outputs in p.parents for p in new)


def test_metrics_are_prometheus_text(app_client):
    app_client.post("/sdapi/v1/txt2img", json=TXT)
    text = app_client.get("/metrics").text
    for name in ("diffspeed_queue_depth", "diffspeed_running_jobs", "diffspeed_images_total",
                 "diffspeed_request_latency_seconds_bucket", "diffspeed_batch_size_bucket", "diffspeed_rejected_total"):
        assert name in text


# ------------------------------------------------------------------------------------------ security
def test_basic_auth_on_every_route(tmp_path):
    from fastapi.testclient import TestClient

    from diffspeed.server.app import create_app

    app = create_app(ServerConfig(api_auth=(("ann", "s3cret"), ("bob", "pw")), outputs_dir=str(tmp_path)))
    with TestClient(app) as client:
        for route in ("/", "/docs", "/openapi.json", "/metrics", "/sdapi/v1/options", "/static/app.js"):
            r = client.get(route)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), route
        assert client.get("/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
        assert client.get("/sdapi/v1/options", auth=("bob", "pw")).status_code == 200
        assert client.post("/sdapi/v1/txt2img", json=TXT, auth=("ann", "s3cret")).status_code == 200


def test_body_limit_is_413(tmp_path):
    from fastapi.testclient import TestClient

    from diffspeed.server.app import create_app

    app = create_app(ServerConfig(limits=Limits(max_body_bytes=4096), outputs_dir=str(tmp_path)))
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json={**TXT, "negative_prompt": "x" * 10_000})
        assert r.status_code == 413
        chunks = (b'{"prompt": "' + b"y" * 1000 for _ in range(10))  # streamed, no Content-Length
        r = client.post("/sdapi/v1/txt2img", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_non_loopback_host_without_auth_warns_and_a_busy_port_is_one_line(capsys):
    import socket

    from diffspeed.cli import main

    assert ServerConfig(host="0.0.0.0").exposed and not ServerConfig().exposed
    assert not ServerConfig(host="::1").exposed and ServerConfig(host="example.org").exposed
    with socket.create_server(("0.0.0.0", 0)) as busy:
        code = main(["serve", "--host", "0.0.0.0", "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err
    assert "without --api-auth" in err and code == 1 and "port" in err and "Traceback" not in err
    assert main(["serve", "--api-auth", "nopassword"]) == 2


# ------------------------------------------------------------------------------------------ queue behaviour
@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    config = ServerConfig(max_queue=2, max_batch=4, outputs_dir=str(tmp_path_factory.mktemp("o")),
                          limits=Limits(max_steps=1000))
    with running(config) as url:
        yield url


def _post(url: str, body: dict, timeout: float = 120):
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=timeout)


def _start_long_job(url: str, pool: ThreadPoolExecutor, task: str = "long"):
    """A 1000-step request that runs until interrupted; returns its future once it is running."""
    future = pool.submit(_post, url, {**TXT, "steps": 1000, "force_task_id": task})
    wait_until(lambda: future.done() or requests.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"])
    assert not future.done(), future.result().text
    return future


def test_full_queue_is_429_with_retry_after_and_interrupt_returns_the_partial_image(small_server):
    url = small_server
    with ThreadPoolExecutor(8) as pool:
        long = _start_long_job(url, pool)
        waiting = [pool.submit(_post, url, {**TXT, "seed": 10 + i, "force_task_id": f"w{i}"}) for i in range(2)]
        wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["queue"]["depth"] == 2)
        full = _post(url, {**TXT, "seed": 99})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        progress = requests.get(f"{url}/sdapi/v1/progress").json()
        assert progress["state"]["job_count"] == 3 and 0 < progress["progress"] < 1
        assert requests.post(f"{url}/sdapi/v1/interrupt").status_code == 200
        out = long.result(60)
        assert out.status_code == 200 and len(out.json()["images"]) == 1  # what it made so far
        assert all(w.result(60).status_code == 200 for w in waiting)  # nothing lost


def test_a_queued_request_can_be_cancelled(small_server):
    url = small_server
    with ThreadPoolExecutor(4) as pool:
        long = _start_long_job(url, pool, task="long2")
        queued = pool.submit(_post, url, {**TXT, "force_task_id": "to-cancel"})
        wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["queue"]["depth"] == 1)
        assert requests.post(f"{url}/diffspeed/v1/cancel/to-cancel").status_code == 200
        assert queued.result(30).status_code == 409
        assert requests.post(f"{url}/diffspeed/v1/cancel/long2").status_code == 409  # running: interrupt it
        requests.post(f"{url}/sdapi/v1/interrupt")
        assert long.result(60).status_code == 200


def test_batched_requests_equal_each_run_alone(small_server):
    url = small_server
    bodies = [{**TXT, "prompt": p, "seed": s} for p, s in (("a red circle on a white background", 3),
                                                           ("a blue square on a green background", 4),
                                                           ("a yellow star on a black background", 5))]
    alone = [pixels(_post(url, b).json()["images"][0]) for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        long = _start_long_job(url, pool, task="gate")  # the three queue up behind it, then run as one batch
        futures = [pool.submit(_post, url, b) for b in bodies[:2]]
        wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["queue"]["depth"] == 2)
        requests.post(f"{url}/sdapi/v1/interrupt")
        long.result(60)
        together = [f.result(60).json() for f in futures]
    assert all(json.loads(t["info"])["diffspeed"]["batched_with"] == 1 for t in together)
    for a, t in zip(alone, together):
        assert np.abs(a - pixels(t["images"][0])).max() <= 1


def test_two_recipes_at_once_each_get_what_they_get_alone(small_server):
    """10 rounds of a 'fastest' request and a plain one sent together: each equals its own run alone."""
    url = small_server
    fast = {**TXT, "steps": 12, "seed": 7, "alwayson_scripts": {"diffspeed": {"args": ["fastest"]}}}
    plain = {**TXT, "steps": 12, "seed": 7}
    ref_fast = pixels(_post(url, fast).json()["images"][0])
    ref_plain = pixels(_post(url, plain).json()["images"][0])
    assert np.abs(ref_fast - ref_plain).max() > 8  # the recipes really differ
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            a, b = pool.submit(_post, url, fast), pool.submit(_post, url, plain)
            ra, rb = a.result(120).json(), b.result(120).json()
            assert np.array_equal(pixels(ra["images"][0]), ref_fast)
            assert np.array_equal(pixels(rb["images"][0]), ref_plain)
            assert json.loads(ra["info"])["diffspeed"]["preset"] == "fastest"
            assert json.loads(rb["info"])["diffspeed"]["recipe"] == []


# ------------------------------------------------------------------------------------------ shutdown
def test_sigterm_answers_every_request(tmp_path):
    """`diffspeed serve` gets SIGTERM with one request running and two queued: the running one finishes (200),
    the queued ones get 503, none is left without an answer, and the process exits 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffspeed.cli", "serve", "--port", str(port), "--outputs-dir",
                             str(tmp_path), "--max-steps", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=120)
        with ThreadPoolExecutor(4) as pool:
            running_one = pool.submit(_post, url, {**TXT, "steps": 400})
            wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] > 0)
            queued = [pool.submit(_post, url, {**TXT, "seed": i}) for i in range(2)]
            wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["queue"]["depth"] == 2)
            proc.send_signal(signal.SIGTERM)
            codes = sorted(f.result(120).status_code for f in [running_one, *queued])
        assert codes == [200, 503, 503]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in output, output


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/sdapi/v1/options", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False



def test_a_prompt_lora_applies_to_its_request_only(app_client):
    plain = app_client.post("/sdapi/v1/txt2img", json={**TXT, "seed": 21}).json()
    lora = app_client.post("/sdapi/v1/txt2img", json={**TXT, "seed": 21,
                                                       "prompt": TXT["prompt"] + " <lora:tiny-sd-lora-monochrome:1>"})
    assert lora.status_code == 200, lora.text
    info = json.loads(lora.json()["info"])
    assert info["infotexts"][0].startswith(TXT["prompt"] + "\n")  # the tag is not in the prompt
    assert 'Lora weights: "tiny_sd_lora_monochrome: 1.0"' in info["infotexts"][0]
    colour = pixels(lora.json()["images"][0])
    assert np.abs(colour - pixels(plain["images"][0])).max() > 8  # the LoRA changed the picture
    again = app_client.post("/sdapi/v1/txt2img", json={**TXT, "seed": 21}).json()
    assert np.array_equal(pixels(again["images"][0]), pixels(plain["images"][0]))  # and is gone again
    assert "Lora" not in json.loads(again["info"])["infotexts"][0]


def test_a_request_past_its_timeout_is_504_and_the_server_goes_on(tmp_path):
    from fastapi.testclient import TestClient

    from diffspeed.server.app import create_app

    app = create_app(ServerConfig(request_timeout=1.0, limits=Limits(max_steps=1000), outputs_dir=str(tmp_path)))
    with TestClient(app) as client:
        started = time.monotonic()
        r = client.post("/sdapi/v1/txt2img", json={**TXT, "steps": 1000})
        assert r.status_code == 504 and time.monotonic() - started < 30
        assert client.post("/sdapi/v1/txt2img", json=TXT).status_code == 200


def test_a_client_that_leaves_takes_its_queued_request_with_it(small_server):
    url = small_server
    with ThreadPoolExecutor(2) as pool:
        long = _start_long_job(url, pool, task="long3")
        with pytest.raises(requests.exceptions.Timeout):
            requests.post(f"{url}/sdapi/v1/txt2img", json={**TXT, "force_task_id": "gone"}, timeout=1.0)
        wait_until(lambda: requests.get(f"{url}/sdapi/v1/progress").json()["queue"]["depth"] == 0, timeout=10)
        assert requests.get(f"{url}/sdapi/v1/progress").json()["state"]["job"] == "long3"  # still running
        requests.post(f"{url}/sdapi/v1/interrupt")
        assert long.result(60).status_code == 200
    assert 'diffspeed_jobs_total{outcome="JobCancelled"}' in requests.get(f"{url}/metrics").text

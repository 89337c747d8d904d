"""``diffspeed serve --ray``: the same app on Ray Serve replicas.

The fast part checks the pieces without Ray (exceptions rebuilt as their own types, progress and stats merged
over replicas, the builder's arguments). The slow part starts a local 2-CPU Ray cluster on loopback, deploys
2 tiny-sd replicas (1 CPU each) and drives them with the ``webuiapi`` client: images bit-identical to the
single-process server for the same requests (unbatched on both sides), progress and interrupt answered.
"""

from __future__ import annotations

import base64
import io
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from diffspeed.errors import DiffspeedError
from diffspeed.server import ray_serve
from diffspeed.server.jobs import JobTimeout, QueueFull, TaskIdInUse
from diffspeed.server.ray_serve import RemoteError, local_error, merged_progress, merged_stats

BASE = {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "width": 64, "height": 64,
        "steps": 4, "sampler_name": "Euler", "cfg_scale": 3.0}


# ------------------------------------------------------------------------------------------------ without Ray
@pytest.mark.parametrize("err", [
    QueueFull("full", retry_after=7),
    JobTimeout("too late"),
    TaskIdInUse("taken", field="force_task_id"),
    DiffspeedError("bad", field="width"),
])
def test_errors_cross_pickling_as_their_own_type(err):
    carried = pickle.loads(pickle.dumps(RemoteError.wrap(err)))
    back = local_error(carried)
    assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)


def test_a_wrapped_cause_and_back_pressure_are_unwrapped():
    class Wrapper(Exception):  # stands for RayTaskError, whose .cause is the replica's exception
        def __init__(self, cause):
            self.cause = cause

    back = local_error(Wrapper(RemoteError.wrap(QueueFull("full", retry_after=3))))
    assert isinstance(back, QueueFull) and back.retry_after == 3

    class Dual(Wrapper, RemoteError):  # Ray raises RayTaskError(cause type): both, with other args
        pass

    back = local_error(Dual(RemoteError.wrap(JobTimeout("late"))))
    assert type(back) is JobTimeout and str(back) == "late"

    class BackPressureError(Exception):
        retry_after_s = None

    assert isinstance(local_error(BackPressureError()), QueueFull)


def _snap(job="", depth=0, running=0, job_state=None):
    snap = ray_serve._idle()
    snap["state"] = {**snap["state"], "job": job}
    snap["queue"] = {"depth": depth, "running": running, "position": None}
    snap["job_state"] = job_state
    return snap


def test_progress_comes_from_the_replica_holding_the_task():
    snaps = [_snap(depth=2), _snap(job="t1", depth=1, running=1, job_state="running")]
    assert merged_progress(snaps, "t1")["job_state"] == "running"
    assert merged_progress(snaps, "t1")["queue"] == {"depth": 3, "running": 1, "position": None}
    assert merged_progress(snaps, None)["state"]["job"] == "t1"
    assert merged_progress(snaps, None)["state"]["job_count"] == 4
    assert merged_progress([_snap(), _snap()], "nope")["job_state"] is None
    reused = [_snap(job="t2", job_state="queued"), _snap(job="t2", job_state="done")]  # an id used again
    assert merged_progress(reused, "t2")["job_state"] == "queued"
    assert merged_progress(reused[::-1], "t2")["job_state"] == "queued"
    assert merged_progress([], None)["progress"] == 0.0
    one = {"depth": 1, "running": 0, "done": 2, "recent_batch_sizes": [1], "closing": False}
    stats = merged_stats([one, {**one, "done": 3}])
    assert stats["done"] == 5 and stats["replicas"] == 2 and stats["recent_batch_sizes"] == [1, 1]


def test_replica_counts_are_checked():
    with pytest.raises(DiffspeedError):
        ray_serve.check_replicas(0, None, None)
    with pytest.raises(DiffspeedError):
        ray_serve.check_replicas(1, 3, 2)
    ray_serve.check_replicas(1, 0, 2)


def test_build_app_reads_the_rayservice_args():
    """deploy/rayservice.yaml's serveConfigV2 args -> the model deployment's replicas, GPUs and limits."""
    pytest.importorskip("ray.serve")
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    manifest = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "rayservice.yaml").read_text())
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "diffspeed.server.ray_serve:build_app"
    args = application["args"]
    app = ray_serve.build_app(args)
    model = app._bound_deployment.init_args[1]._bound_deployment  # Ray's internals: only to look
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (args["min_replicas"], args["max_replicas"])
    assert scaling.target_ongoing_requests == args["max_batch"]
    assert model.ray_actor_options["num_gpus"] == args["num_gpus"]
    assert model._deployment_config.max_ongoing_requests == args["max_queue"] + args["max_batch"]
    fixed = ray_serve.build_app({"replicas": "2", "cpus_per_replica": 1})._bound_deployment.init_args[1]
    assert fixed._bound_deployment.num_replicas == 2
    assert fixed._bound_deployment.ray_actor_options == {"num_cpus": 1.0}
    with pytest.raises(DiffspeedError, match="bogus"):
        ray_serve.build_app({"bogus": 1})


# ------------------------------------------------------------------------------------------------ on Ray
def _png_pixels(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def _generate_all(url: str, seeds: list[int]) -> dict[int, np.ndarray]:
    """txt2img for every seed, 4 at a time (so both replicas work), through the webuiapi client."""
    import webuiapi

    host, port = url.removeprefix("http://").rsplit(":", 1)

    def one(seed):
        api = webuiapi.WebUIApi(host=host, port=int(port))
        result = api.txt2img(**BASE, seed=seed, alwayson_scripts={})
        return seed, _png_pixels(result.json["images"][0]), result.info

    with ThreadPoolExecutor(4) as pool:
        return {seed: (pixels, info) for seed, pixels, info in pool.map(one, seeds)}


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory):
    """2 tiny-sd replicas (1 CPU each, unbatched) behind the ingress, on a free loopback port."""
    pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from diffspeed.server.config import ServerConfig
    from tests.server.conftest import free_port

    config = ServerConfig(max_batch=1, outputs_dir=str(tmp_path_factory.mktemp("ray-outputs")))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.deployment_app(config, replicas=2, num_gpus=0), name=ray_serve.APP_NAME,
                  route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_two_replicas_give_the_single_process_images(ray_url, tmp_path):
    from diffspeed.server.config import ServerConfig
    from tests.server.conftest import running

    seeds = [11, 12, 13, 14, 15, 16]
    t0 = time.monotonic()
    on_ray = _generate_all(ray_url, seeds)
    ray_s = time.monotonic() - t0
    with running(ServerConfig(max_batch=1, outputs_dir=str(tmp_path))) as url:
        alone = _generate_all(url, seeds)
    for seed in seeds:
        assert np.array_equal(on_ray[seed][0], alone[seed][0]), seed
        assert on_ray[seed][1]["seed"] == alone[seed][1]["seed"] == seed
    print(f"ray: {len(seeds)} images in {ray_s:.1f} s")
    import requests

    metrics = requests.get(f"{ray_url}/metrics", timeout=10).text  # the replicas' queue events, gathered
    assert f'diffspeed_jobs_total{{outcome="done"}} {len(seeds)}.0' in metrics
    assert f"diffspeed_batch_size_count {len(seeds)}.0" in metrics


@pytest.mark.slow
def test_progress_and_interrupt_answer_across_replicas(ray_url):
    import requests

    body = {**BASE, "steps": 150, "seed": 5, "force_task_id": "ray-long"}
    done = {}
    thread = threading.Thread(target=lambda: done.update(r=requests.post(f"{ray_url}/sdapi/v1/txt2img",
                                                                         json=body, timeout=120)))
    thread.start()
    deadline = time.monotonic() + 60
    state = None
    while time.monotonic() < deadline:
        snap = requests.get(f"{ray_url}/sdapi/v1/progress", params={"id_task": "ray-long"}, timeout=10).json()
        state = snap["state"]
        if state["sampling_step"] >= 1:
            break
        time.sleep(0.1)
    assert state is not None and state["job"] == "ray-long" and state["sampling_steps"] == 150
    answer = requests.post(f"{ray_url}/sdapi/v1/interrupt", timeout=10)
    assert answer.status_code == 200, answer.text
    thread.join(120)
    assert done["r"].status_code == 200  # an interrupted job returns what it made
    steps_run = done["r"].json()
    assert steps_run["images"]
    final = requests.get(f"{ray_url}/sdapi/v1/progress", params={"id_task": "ray-long"}, timeout=10).json()
    assert final["progress"] == 1.0 and final["state"]["sampling_step"] < 150  # stopped early
    metrics = requests.get(f"{ray_url}/metrics", timeout=10)
    assert metrics.status_code == 200


@pytest.mark.slow
def test_cancel_and_client_disconnect_reach_the_queued_job(ray_url):
    """Both replicas busy: a queued job is cancelled by its id (409 to its client), and one whose client
    leaves is dropped from its replica's queue, as in one process."""
    import requests

    url = f"{ray_url}/sdapi/v1"
    answers = {}

    def post(name, timeout=120, **fields):
        try:
            answers[name] = requests.post(f"{url}/txt2img", json={**BASE, **fields}, timeout=timeout)
        except requests.exceptions.RequestException as err:
            answers[name] = err

    def state_of(task):
        return requests.get(f"{url}/progress", params={"id_task": task}, timeout=10).json()

    def until(check, seconds=60):
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.1)

    threads = [threading.Thread(target=post, args=(f"busy{i}",), kwargs={"steps": 150, "seed": i, "width": 256,
                                                                          "height": 256, "force_task_id": f"busy{i}"})
               for i in range(2)]
    for n, t in enumerate(threads, 1):  # one at a time: the router then sends the second to the idle replica
        t.start()
        until(lambda n=n: state_of("busy0")["queue"]["running"] == n, 30)
    threads.append(threading.Thread(target=post, args=("queued",), kwargs={"seed": 7, "force_task_id": "queued"}))
    threads.append(threading.Thread(target=post, args=("gone",), kwargs={"seed": 8, "force_task_id": "gone",
                                                                         "timeout": 3}))
    threads[2].start()
    threads[3].start()
    until(lambda: (state_of("queued")["queue"]["position"] or 0) >= 1)
    assert requests.post(f"{ray_url}/diffspeed/v1/cancel/queued", timeout=10).status_code == 200
    assert requests.post(f"{ray_url}/diffspeed/v1/cancel/nobody", timeout=10).status_code == 409
    threads[3].join(30)
    # dropped while queued: finished (progress 1) though both replicas are still on their long jobs
    until(lambda: state_of("gone")["progress"] == 1.0, 30)
    assert state_of("gone")["state"]["job"] == "gone" and state_of(None)["queue"]["running"] == 2
    requests.post(f"{url}/interrupt", timeout=10)
    for t in threads:
        t.join(120)
    assert answers["queued"].status_code == 409, answers["queued"].text
    assert isinstance(answers["gone"], requests.exceptions.Timeout)
    assert answers["busy0"].status_code == answers["busy1"].status_code == 200


@pytest.mark.slow
def test_429_when_every_replica_is_full(ray_url):
    """One replica taking 1 running + 1 queued job, 1 more waiting at the handle: the rest get 429."""
    import requests
    from ray import serve

    from diffspeed.server.config import ServerConfig

    config = ServerConfig(max_batch=1, max_queue=1)
    serve.run(ray_serve.deployment_app(config, replicas=1, num_gpus=0, cpus_per_replica=0, max_queued_requests=1),
              name="small", route_prefix="/small", blocking=False)
    body = {**BASE, "steps": 40, "seed": 3}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{ray_url}/small/sdapi/v1/txt2img", json=body, timeout=120),
                                range(8)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)
    metrics = requests.get(f"{ray_url}/small/metrics", timeout=10).text
    assert f"diffspeed_rejected_total {codes.count(429)}.0" in metrics, metrics
    serve.delete("small")

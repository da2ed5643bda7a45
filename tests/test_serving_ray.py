"""`kedavra serve --ray-replicas N`: the same A1111 API over Ray Serve replicas (kedavra.serving.ray_workers).

On a local Ray instance of 2 CPUs, two replicas of one CPU each hold a tiny random-weight model (fp32, one torch
thread), behind uvicorn in this process on a free loopback port, as tests/test_serving.py serves the single-process
worker: the same PNG bytes as that server, the queue's bound (503 + Retry-After), /progress and /interrupt across
processes, a client that hangs up, model switches reaching every replica (and a model that fails to load leaving the
old one), a replica killed in the middle of a burst of requests with none lost or mixed up, and replicas a local
instance cannot place refused. The --ray-* flags' checks run without Ray (the rest skips without it).
Throughput with 1 and 2 replicas: scripts/benchmark_ray_serving.py (docs/scaling.md).
"""

import contextlib
import functools
import json
import socket
import sys
import threading
import time

import httpx
import pytest

from kedavra.api import load
from kedavra.cli import main
from kedavra.viz.sample_image import draw_sample_image

uvicorn = pytest.importorskip("uvicorn")
from test_serving import (  # noqa: E402
    SIZE,
    STEPS,
    WAIT_S,
    b64_png,
    decode_png,
    load_test_server,
    make_worker,
    serve,
    wait_until,
)

from kedavra.serving.app import ServerConfig  # noqa: E402
from kedavra.serving.connections import uvicorn_options  # noqa: E402
from kedavra.serving.ray_deployment import RayOptions, ReplicaSpec  # noqa: E402

REPLICAS = 2
# A replacement replica is a new process that imports torch and loads the model: over 60 s on a 2-core AVX2-only
# EPYC with other tests' work beside it (seen 8 December 2026)
REPLACE_S = 240.0
QUEUE_SIZE = 3  # requests waiting for a replica: with 2 replicas running one job each, about the 6th is refused
LONG_STEPS = 60  # 0.3-2 s a job at 32 px on one thread (AMD EPYC Zen 5 to Zen 4): for jobs that run to the end
MAX_STEPS = 150  # the API's maximum: for a batch that an interrupt must reach while it runs
LONG_BATCHES = 20  # n_iter of a job that must outlast a client's timeout (20 x 60 steps: 6 s or more)
BODY_LIMIT = 2**20
QUEUE_FULL_RETRIES = 30


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Two tiny models with different weights, and a file named like a model that is not one."""
    folder = tmp_path_factory.mktemp("models")
    load_test_server.make_tiny_model(folder / "tiny.safetensors", seed=0)
    load_test_server.make_tiny_model(folder / "other.safetensors", seed=1)
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint")
    return folder


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of 2 CPUs with Ray Serve started (no HTTP proxy), for this module."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    ray.init(num_cpus=REPLICAS, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    yield ray
    serve.shutdown()
    ray.shutdown()


@contextlib.contextmanager
def serve_app(app):
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port; yields the base URL (as test_serving.serve)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_options()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the test server to start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S * 2)
        sock.close()


@pytest.fixture(scope="module")
def ray_server(ray_cluster, models_dir):
    """The Ray-backed server: 2 replicas of the tiny model, one job each at a time, QUEUE_SIZE waiting."""
    from kedavra.serving.ray_workers import RayWorker, create_ray_app

    spec = ReplicaSpec(models_dir / "tiny.safetensors", models_dir, functools.partial(load, dtype="fp32"), threads=1)
    worker = RayWorker(spec, RayOptions(replicas=REPLICAS), queue_size=QUEUE_SIZE)
    with serve_app(create_ray_app(worker, ServerConfig(api_key=None, max_body_bytes=BODY_LIMIT))) as url:
        yield url, worker


@pytest.fixture
def client(ray_server):
    with httpx.Client(base_url=ray_server[0], timeout=WAIT_S * 2) as http:
        yield http


def post_together(url: str, bodies: list[dict], retry_when_full: bool = False) -> list[httpx.Response]:
    """POST every body to txt2img at once, each from its own thread; the responses in the bodies' order.
    retry_when_full: send again after Retry-After (at most 1 s here) when the queue is full, as a client should."""
    responses: list = [None] * len(bodies)

    def post(index: int) -> None:
        for _ in range(QUEUE_FULL_RETRIES):
            responses[index] = httpx.post(f"{url}/sdapi/v1/txt2img", json=bodies[index], timeout=WAIT_S * 4)
            full = responses[index].status_code == 503 and "the queue is full" in responses[index].text
            if not (retry_when_full and full):
                return
            time.sleep(min(1.0, float(responses[index].headers["Retry-After"])))

    threads = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 4)
    return responses


def replica_actors(ray) -> list[str]:
    """The names of the generation replicas' Ray actors (Ray Serve names them SERVE_REPLICA::app#deployment#id)."""
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::kedavra#GenerationReplica#")]


def running_replicas() -> int:
    from ray import serve

    application = serve.status().applications.get("kedavra")
    if application is None:
        return 0
    return application.deployments["GenerationReplica"].replica_states.get("RUNNING", 0)


# ---- flags, without Ray ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--ray-address", "auto"], "--ray-address needs --ray-replicas"),
    (["--ray-replicas", "0"], "--ray-replicas must be an integer >= 1, got 0"),
    (["--ray-replicas", "2", "--ray-max-replicas", "1"], "--ray-max-replicas must be an integer >= 2, got 1"),
    (["--ray-replicas", "2", "--ray-min-replicas", "3"], "--ray-min-replicas must be an integer from 1 to 2, got 3"),
    (["--ray-replicas", "2", "--ray-max-ongoing", "0"], "--ray-max-ongoing must be an integer >= 1, got 0"),
    (["--ray-replicas", "2", "--queue-size", "0"], "--queue-size must be an integer with --ray-replicas"),
    (["--ray-replicas", "2", "--ray-max-replicas", "4", "--ray-autoscaling", "{nope"],
     "--ray-autoscaling must be a JSON object"),
    (["--ray-replicas", "2", "--ray-max-replicas", "4", "--ray-autoscaling", '{"max_replicas": 8}'],
     "give max_replicas as --ray-max-replicas"),
    (["--ray-replicas", "2", "--ray-autoscaling", '{"upscale_delay_s": 1}'], "--ray-autoscaling needs"),
    (["--ray-replicas", "2", "--taesd", "taesd_decoder.pth"], "--taesd does nothing with --ray-replicas"),
])
def test_ray_flags_are_checked_before_anything_loads(flags, message, capsys):
    """A bad --ray-* flag ends the command before Ray or the model is touched (the model named does not exist)."""
    assert main(["serve", "--model", "/no/such/model.safetensors", *flags]) == 2
    assert message in capsys.readouterr().err


def test_without_ray_the_flag_says_how_to_install_it(models_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "kedavra.serving.ray_workers", raising=False)
    assert main(["serve", "--model", str(models_dir / "tiny.safetensors"), "--ray-replicas", "2"]) == 2
    assert 'pip install "ray[serve]"' in capsys.readouterr().err


def test_autoscaling_options_become_ray_serves():
    fixed = RayOptions(replicas=3, cpus_per_replica=2, gpus_per_replica=1).deployment_options(queue_size=5)
    assert fixed == {"num_replicas": 3, "max_ongoing_requests": 1, "max_queued_requests": 5,
                     "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}}
    scaled = RayOptions(replicas=2, max_replicas=6, max_ongoing=2, autoscaling={"upscale_delay_s": 5})
    assert scaled.deployment_options(queue_size=8)["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 6, "initial_replicas": 2, "target_ongoing_requests": 2,
        "upscale_delay_s": 5}


# ---- the server on Ray Serve -----------------------------------------------------------------------------------------


def test_replicas_make_the_single_process_servers_png_bytes(ray_server, client, models_dir):
    """The same request gives the same PNG bytes (pixels and parameters chunk) and info from the replicas as from
    the single-process server, across processes: batches, n_iter and img2img included."""
    url, worker = ray_server
    txt2img = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 21, "steps": STEPS, "width": SIZE,
               "height": SIZE, "sampler_name": "DPM++ 2M", "batch_size": 2, "n_iter": 2}
    img2img = {"prompt": "a blue square", "seed": 5, "steps": STEPS, "init_images": [b64_png(draw_sample_image(SIZE))],
               "denoising_strength": 0.6}
    with serve(make_worker(models_dir), ServerConfig(api_key=None, max_body_bytes=BODY_LIMIT)) as single:
        expected = [httpx.post(f"{single}/sdapi/v1/{endpoint}", json=body, timeout=WAIT_S).json()
                    for endpoint, body in (("txt2img", txt2img), ("img2img", img2img))]
    answers = [client.post(f"/sdapi/v1/{endpoint}", json=body) for endpoint, body in
               (("txt2img", txt2img), ("img2img", img2img))]
    for answer, reference in zip(answers, expected, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["images"] == reference["images"]
        info, reference_info = json.loads(answer.json()["info"]), json.loads(reference["info"])
        assert {**info, "job_timestamp": None} == {**reference_info, "job_timestamp": None}
    assert json.loads(answers[0].json()["info"])["all_seeds"] == [21, 22, 23, 24]
    # the HTTP side checks requests against the replicas' model without holding its weights
    assert next(worker.pipeline.model.unet.parameters()).is_meta
    refused = client.post("/sdapi/v1/txt2img", json={"width": SIZE + 1, "steps": STEPS})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "width"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny.safetensors [")
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    single = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(draw_sample_image(16)),
                                                               "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert single.status_code == 200 and decode_png(single.json()["image"]).size == (32, 32)


def test_progress_and_interrupt_reach_the_replicas(ray_server, client):
    """/progress shows the running job as its replica reports it; /interrupt stops it after its current step, and
    its request is answered with the batch already finished, as by the single-process server."""
    url, worker = ray_server
    answer = None

    def post() -> None:
        nonlocal answer
        answer = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=WAIT_S * 2,
                            json={"prompt": "long", "seed": 8, "steps": MAX_STEPS, "n_iter": 2})

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    progress = {}

    def second_batch_running() -> bool:
        progress.update(client.get("/sdapi/v1/progress").json())
        return progress["state"]["job_no"] == 1 and progress["state"]["sampling_step"] > 0

    wait_until(second_batch_running, "the second batch to run")
    assert progress["state"]["job_count"] == 2 and progress["state"]["sampling_steps"] == MAX_STEPS
    assert progress["current_image"] is None  # replicas decode no previews
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
    thread.join(WAIT_S)
    assert answer.status_code == 200
    info = json.loads(answer.json()["info"])
    assert info["interrupted"] is True and info["all_seeds"] == [8] and len(answer.json()["images"]) == 1
    wait_until(lambda: worker.running() == 0, "the replicas to be idle")
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": False}


def test_a_client_that_hangs_up_stops_its_job_on_the_replica(ray_server):
    """A client that leaves cancels its Ray Serve request: the replica stops the job after its current step, long
    before the job would have ended (LONG_BATCHES x LONG_STEPS steps)."""
    url, worker = ray_server
    before = worker.counts["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "gone", "steps": LONG_STEPS, "n_iter": LONG_BATCHES},
                   timeout=1.0)
    hung_up = time.monotonic()
    wait_until(lambda: worker.running() + worker.queued() == 0, "the job to stop")
    assert time.monotonic() - hung_up < 3.0 and worker.counts["cancelled"] == before + 1
    answer = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "next", "seed": 2, "steps": STEPS}, timeout=WAIT_S)
    assert answer.status_code == 200


def test_a_full_queue_is_503_with_retry_after(ray_server):
    """Two replicas each run one job and about QUEUE_SIZE wait in Ray Serve's queue: a burst beyond that is refused
    at once with 503 and Retry-After, and the others are answered. Ray Serve's router counts a burst loosely (a
    request it is offering to a busy replica is not counted meanwhile), so a few more than REPLICAS + QUEUE_SIZE may
    get in; three times that many requests are always partly refused."""
    url, worker = ray_server
    before = worker.counts["rejected"]
    bodies = [{"prompt": f"queue {i}", "seed": i, "steps": LONG_STEPS // 2} for i in range(3 * (REPLICAS + QUEUE_SIZE))]
    responses = post_together(url, bodies)
    accepted = [response for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code == 503]
    assert len(accepted) + len(refused) == len(bodies)
    assert REPLICAS <= len(accepted) < len(bodies)
    assert all(int(response.headers["Retry-After"]) >= 1 for response in refused)
    assert all("the queue is full" in response.json()["detail"] for response in refused)
    assert worker.counts["rejected"] == before + len(refused)


def test_a_model_switch_reaches_every_replica(ray_server, client):
    """sd_model_checkpoint reconfigures both replicas (two jobs at once run on both); a model that fails to load is
    answered 422 and leaves the model that was running on every replica."""
    url, _ = ray_server
    try:
        switched = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
        assert switched.status_code == 200, switched.text
        answers = post_together(url, [{"prompt": "x", "seed": i, "steps": LONG_STEPS // 2} for i in range(2)])
        assert [json.loads(a.json()["info"])["sd_model_name"] for a in answers] == ["other", "other"]
        broken = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors"})
        assert broken.status_code == 422 and "could not load broken.safetensors" in broken.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("other.safetensors [")
        answers = post_together(url, [{"prompt": "x", "seed": i, "steps": LONG_STEPS // 2} for i in range(2)])
        assert [json.loads(a.json()["info"])["sd_model_name"] for a in answers] == ["other", "other"]
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny.safetensors"})
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny.safetensors [")


def test_a_replica_killed_mid_burst_loses_no_request(ray_server, ray_cluster):
    """A replica's process killed while both run a job of a burst of 4 (whose clients send again when the queue is
    full, as clients should: Ray Serve's count of a burst is loose): the job runs again on the other replica, every
    request is answered 200 with its own seed and prompt (the retried one's PNG bytes equal those of its twin
    request, which ran untouched), and Ray Serve starts a replica in place of the dead one."""
    url, worker = ray_server
    before = worker.counts["retried"]
    bodies = [{"prompt": f"twin {i % 2}", "seed": 40 + i % 2, "steps": LONG_STEPS} for i in range(REPLICAS + 2)]
    responses: list = []
    burst = threading.Thread(target=lambda: responses.extend(post_together(url, bodies, retry_when_full=True)),
                             daemon=True)
    burst.start()
    wait_until(lambda: worker.running() == REPLICAS, "both replicas to run a job")
    ray_cluster.kill(ray_cluster.get_actor(replica_actors(ray_cluster)[0], namespace="serve"), no_restart=True)
    burst.join(WAIT_S * 4)
    assert [response.status_code for response in responses] == [200] * len(bodies), [r.text for r in responses]
    for body, response in zip(bodies, responses, strict=True):
        plan = {"index": 0, "endpoint": "txt2img", "body": {**body, "width": SIZE, "height": SIZE}}
        assert load_test_server.check_answer(plan, response.json()) == []
    images = [response.json()["images"][0] for response in responses]
    assert images[0] == images[2] and images[1] == images[3] and images[0] != images[1]
    assert worker.counts["retried"] == before + 1
    deadline = time.monotonic() + REPLACE_S
    while running_replicas() < REPLICAS or len(replica_actors(ray_cluster)) < REPLICAS:
        assert time.monotonic() < deadline, "Ray Serve did not replace the dead replica"
        time.sleep(0.2)
    again = post_together(url, [{"prompt": "after", "seed": 1, "steps": STEPS} for _ in range(REPLICAS)])
    assert [response.status_code for response in again] == [200] * REPLICAS



def test_replicas_beyond_the_local_instance_are_refused(ray_cluster):
    """On a local Ray instance (2 CPUs here) replicas that cannot all be placed are refused at start, naming the
    numbers, instead of waiting for room that never comes."""
    from kedavra.serving.ray_workers import check_room

    check_room(RayOptions(replicas=REPLICAS))
    with pytest.raises(ValueError, match="--ray-replicas 3 x --ray-cpus-per-replica 1 needs 3 CPUs; the local Ray "
                                         "instance has 2"):
        check_room(RayOptions(replicas=3))
    with pytest.raises(ValueError, match="needs 1 GPUs"):
        check_room(RayOptions(replicas=1, gpus_per_replica=1))

"""A bounded load test of `kedavra serve` on the loopback: many concurrent clients, every answer checked.

    .venv/bin/python scripts/load_test_server.py                        # 32 clients, 400 requests, tiny model
    .venv/bin/python scripts/load_test_server.py --clients 8 --requests 40 --json report.json

Starts `kedavra serve` as a subprocess on 127.0.0.1 (a tiny random-weight model written to a temporary folder,
or --model), then sends a fixed number of requests from --clients threads and stops by itself (at the latest
after --deadline-s). Traffic goes to 127.0.0.1 only. Checked for every request:
  - the server answers throughout (a monitor polls /sdapi/v1/progress every MONITOR_INTERVAL_S and must always
    get an answer);
  - nothing is lost or mixed up: each answer's seed, prompt and size are the request's, its infotext parses
    back (kedavra.formats.png_info.parse_parameters) and equals the PNG's own "parameters" chunk;
  - the same seed gives the same PNG bytes under load: a quarter of the requests repeat REPEATED_SEEDS;
  - memory stays flat: the server's resident set (VmRSS from /proc) sampled as requests complete, mean of the
    first quarter of the run against the last quarter.
503 answers (queue full) are retried after their Retry-After, as a client should; a few requests are abandoned
on purpose (the client hangs up after ABANDON_AFTER_S) to exercise cancellation. Reports latency p50/p95 and
throughput. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from PIL import Image

from kedavra.formats.png_info import PARAMETERS_KEYWORD, parse_parameters

HOST = "127.0.0.1"  # loopback only: this script never sends traffic anywhere else
SAMPLERS = ("Euler a", "DPM++ 2M", "Euler", "DDIM")  # cycled over the requests
REPEATED_SEEDS = (11, 22, 33, 44)  # every REPEAT_EVERY-th request uses one of these, with a fixed prompt
REPEAT_EVERY = 4
IMG2IMG_EVERY = 10  # request i with i % 10 == 9 is image to image
ABANDON_EVERY = 40  # request i with i % 40 == 17 hangs up after ABANDON_AFTER_S
ABANDON_AFTER_S = 0.05
MONITOR_INTERVAL_S = 0.5
MONITOR_TIMEOUT_S = 5.0  # a progress poll slower than this counts as the server not answering
MAX_RETRIES = 1000  # 503 retries of one request before it counts as failed
MEMORY_GROWTH_LIMIT = 0.10  # last-quarter mean RSS may exceed the first quarter's by at most 10 %
STARTUP_TIMEOUT_S = 180.0
WEIGHT_STD = 0.05  # the tiny model's random weights (as tests/test_generate_cli.py)
MAX_SEED = 2**32 - 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """The tiny preset with weights ~ N(0, WEIGHT_STD²) drawn from `seed`, saved in kedavra's format."""
    import torch

    from kedavra.checkpoint import save_model
    from kedavra.networks.model import ModelConfig, StableDiffusion

    torch.manual_seed(seed)
    model = StableDiffusion(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=WEIGHT_STD)
    save_model(model, path)
    return path


def init_image_b64(size: int) -> str:
    from kedavra.viz.sample_image import draw_sample_image

    buffer = io.BytesIO()
    draw_sample_image(size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def plan_request(index: int, steps: int, size: int, image: str) -> dict:
    """Request `index`: its endpoint, body, and whether the client abandons it."""
    rng = random.Random(index)
    if index % REPEAT_EVERY == 0:
        seed = REPEATED_SEEDS[(index // REPEAT_EVERY) % len(REPEATED_SEEDS)]
        prompt, sampler = f"repeated seed {seed}", SAMPLERS[seed % len(SAMPLERS)]
    else:
        seed, prompt = rng.randrange(MAX_SEED), f"request {index}: a red circle above a blue square"
        sampler = SAMPLERS[index % len(SAMPLERS)]
    body = {"prompt": prompt, "negative_prompt": "blurry", "seed": seed, "steps": steps, "width": size,
            "height": size, "sampler_name": sampler, "cfg_scale": 5}
    endpoint = "txt2img"
    if index % IMG2IMG_EVERY == IMG2IMG_EVERY - 1:
        endpoint, body["init_images"], body["denoising_strength"] = "img2img", [image], 0.6
    return {"index": index, "endpoint": endpoint, "body": body, "abandon": index % ABANDON_EVERY == 17}


def check_answer(plan: dict, answer: dict) -> list[str]:
    """What is wrong with the answer to `plan` (empty if nothing)."""
    body, problems = plan["body"], []
    info = json.loads(answer["info"])
    if info["all_seeds"] != [body["seed"]] or info["prompt"] != body["prompt"]:
        problems.append(f"seed/prompt mixed up: asked {body['seed']} {body['prompt']!r}, got {info['all_seeds']} "
                        f"{info['prompt']!r}")
    if answer["parameters"].get("seed") != body["seed"] or answer["parameters"].get("prompt") != body["prompt"]:
        problems.append("the echoed parameters are not the request's")
    if len(answer["images"]) != 1 or len(info["infotexts"]) != 1:
        return [*problems, f"expected 1 image, got {len(answer['images'])}"]
    parsed = parse_parameters(info["infotexts"][0])
    if (parsed.prompt, parsed.seed, parsed.steps, parsed.width) != (body["prompt"], body["seed"], body["steps"],
                                                                      body["width"]):
        problems.append(f"infotext does not match the request: {info['infotexts'][0]!r}")
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    if image.size != (body["width"], body["height"]):
        problems.append(f"image is {image.size}, asked {body['width']}x{body['height']}")
    if image.text.get(PARAMETERS_KEYWORD) != info["infotexts"][0]:
        problems.append("the PNG's parameters chunk differs from the infotext")
    return problems


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def run_load_test(base_url: str, *, clients: int, requests: int, steps: int = 2, size: int = 32,
                  pid: int | None = None, deadline_s: float = 600.0, headers: dict | None = None) -> dict:
    """Send `requests` requests from `clients` threads to the server at base_url; the report (see module doc)."""
    if not base_url.startswith(f"http://{HOST}:"):
        raise ValueError(f"the load test only targets {HOST} (the loopback), got {base_url}")
    image = init_image_b64(size)
    plans = [plan_request(i, steps, size, image) for i in range(requests)]
    lock = threading.Lock()
    state = {"next": 0, "completed": 0, "rejected_503": 0, "abandoned": 0}
    problems: list[str] = []
    latencies: list[float] = []  # the successful attempt: queue wait + generation
    end_to_end: list[float] = []  # from the first attempt, 503 back-offs included
    digests: dict[tuple, set] = {}
    memory: list[tuple[int, int]] = []  # (completed so far, RSS bytes)
    monitor = {"polls": 0, "failures": 0, "latencies": []}
    started = time.monotonic()
    stop = threading.Event()

    def take() -> dict | None:
        with lock:
            if state["next"] >= len(plans) or time.monotonic() - started > deadline_s:
                return None
            state["next"] += 1
            return plans[state["next"] - 1]

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=deadline_s, headers=headers) as http:
            while (plan := take()) is not None:
                send(http, plan)

    def send(http: httpx.Client, plan: dict) -> None:
        first = time.monotonic()
        for _ in range(MAX_RETRIES):
            attempt = time.monotonic()
            try:
                response = http.post(f"/sdapi/v1/{plan['endpoint']}", json=plan["body"],
                                     timeout=ABANDON_AFTER_S if plan["abandon"] else deadline_s)
            except httpx.TimeoutException:
                if plan["abandon"]:
                    with lock:
                        state["abandoned"] += 1
                    return
                raise
            if response.status_code == 503:
                with lock:
                    state["rejected_503"] += 1
                time.sleep(min(float(response.headers.get("Retry-After", 1)), 5.0))
                continue
            done = time.monotonic()
            found = [f"HTTP {response.status_code}: {response.text[:200]}"] if response.status_code != 200 else \
                check_answer(plan, response.json())
            with lock:
                problems.extend(f"request {plan['index']}: {p}" for p in found)
                if not found:
                    latencies.append(done - attempt)
                    end_to_end.append(done - first)
                    body = plan["body"]
                    png = base64.b64decode(response.json()["images"][0])
                    digests.setdefault((plan["endpoint"], body["prompt"], body["seed"]), set()).add(
                        hashlib.sha256(png).hexdigest())
                state["completed"] += 1
            return
        with lock:
            problems.append(f"request {plan['index']}: still refused after {MAX_RETRIES} tries")

    def watch() -> None:
        with httpx.Client(base_url=base_url, timeout=MONITOR_TIMEOUT_S, headers=headers) as http:
            while not stop.is_set():
                asked = time.monotonic()
                try:
                    http.get("/sdapi/v1/progress", params={"skip_current_image": True}).raise_for_status()
                    monitor["latencies"].append(time.monotonic() - asked)
                except httpx.HTTPError:
                    monitor["failures"] += 1
                monitor["polls"] += 1
                if pid is not None:
                    with lock:
                        memory.append((state["completed"], rss_bytes(pid)))
                stop.wait(MONITOR_INTERVAL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(deadline_s + 60)
    wall = time.monotonic() - started
    stop.set()
    watcher.join()

    expected = requests - state["abandoned"]
    if state["completed"] < expected:
        problems.append(f"only {state['completed']} of {expected} requests were answered within {deadline_s} s")
    if monitor["failures"]:
        problems.append(f"the server did not answer {monitor['failures']} of {monitor['polls']} progress polls")
    differing = {key: len(found) for key, found in digests.items() if len(found) > 1}
    if differing:
        problems.append(f"the same seed gave different PNG bytes: {differing}")
    report = {
        "clients": clients, "requests": requests, "steps": steps, "size": size,
        "completed": state["completed"], "abandoned": state["abandoned"], "rejected_503": state["rejected_503"],
        "wall_s": round(wall, 1), "throughput_per_s": round(state["completed"] / wall, 2),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "end_to_end_p50_s": round(percentile(end_to_end, 0.5), 3),
        "end_to_end_p95_s": round(percentile(end_to_end, 0.95), 3),
        "progress_polls": monitor["polls"], "progress_p95_s": round(percentile(monitor["latencies"], 0.95), 3),
        "repeated_seed_groups": sum(1 for key in digests if key[2] in REPEATED_SEEDS),
        "repeated_seed_requests": sum(1 for p in plans if p["body"]["seed"] in REPEATED_SEEDS),
    }
    if memory:
        quarter = max(1, requests // 4)
        first = [rss for done, rss in memory if done < quarter] or [memory[0][1]]
        last = [rss for done, rss in memory if done >= requests - quarter] or [memory[-1][1]]
        report.update(rss_first_quarter_mib=round(statistics.fmean(first) / 2**20, 1),
                      rss_last_quarter_mib=round(statistics.fmean(last) / 2**20, 1),
                      rss_peak_mib=round(max(rss for _, rss in memory) / 2**20, 1))
        if statistics.fmean(last) > statistics.fmean(first) * (1 + MEMORY_GROWTH_LIMIT):
            problems.append(f"memory grew: {report['rss_first_quarter_mib']} MiB in the first quarter, "
                            f"{report['rss_last_quarter_mib']} MiB in the last")
    report["problems"] = problems
    return report


def start_server(model: Path, port: int, queue_size: int, threads: int | None, flags: Sequence[str] = (),
                 quiet: bool = False, timeout_s: float = STARTUP_TIMEOUT_S) -> subprocess.Popen:
    """`kedavra serve` on HOST:port (with `flags`; `quiet`: its output discarded), once it answers within
    timeout_s."""
    command = [sys.executable, "-m", "kedavra", "serve", "--model", str(model), "--host", HOST, "--port", str(port),
               "--queue-size", str(queue_size), "--precision", "fp32", "--log-level", "warning", *flags]
    if threads is not None:
        command += ["--threads", str(threads)]
    output = subprocess.DEVNULL if quiet else None
    server = subprocess.Popen(command, stdout=output, stderr=output)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"kedavra serve exited with status {server.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/sdapi/v1/options", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"kedavra serve did not answer within {timeout_s:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (the tiny model's is 32)")
    parser.add_argument("--model", type=Path, help="model to serve (default: a tiny random-weight model)")
    parser.add_argument("--queue-size", type=int, default=8, help="the server's --queue-size (default 8)")
    parser.add_argument("--threads", type=int, help="the server's --threads")
    parser.add_argument("--deadline-s", type=float, default=600.0, help="stop sending after this long")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_tiny_model(Path(folder) / "tiny.safetensors")
        port = free_port()
        server = start_server(model, port, args.queue_size, args.threads)
        try:
            report = run_load_test(f"http://{HOST}:{port}", clients=args.clients, requests=args.requests,
                                   steps=args.steps, size=args.size, pid=server.pid, deadline_s=args.deadline_s)
            report["server_alive_after"] = server.poll() is None
            if not report["server_alive_after"]:
                report["problems"].append("the server exited during the test")
        finally:
            server.terminate()
            server.wait(30)
    for key, value in report.items():
        if key != "problems":
            print(f"{key:24} {value}")
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    print("OK" if not report["problems"] else f"FAILED: {len(report['problems'])} problems")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

"""Throughput of `kedavra serve` on Ray Serve with 1 and 2 replicas, against the single-process server.

    .venv/bin/python scripts/benchmark_ray_serving.py                       # tiny model, 20 steps, 48 requests
    .venv/bin/python scripts/benchmark_ray_serving.py --steps 2 --json report.json

Each configuration starts `kedavra serve` as a subprocess on 127.0.0.1 (with --ray-replicas, on a local Ray
instance it starts itself), sends a few warm-up requests, then runs scripts/load_test_server.py's bounded load test
(every answer checked: seed, prompt, infotext, the same PNG bytes for a repeated seed; 503s retried after their
Retry-After; a few clients hang up on purpose), and stops the server. Configurations:

    single, 1 thread     the in-process worker, --threads 1
    single, 2 threads    the in-process worker, --threads 2 (all of a 2-core machine's cores on one job)
    ray, 1 replica       --ray-replicas 1 (one CPU, one torch thread)
    ray, 2 replicas      --ray-replicas 2 (one CPU, one torch thread each)

Everything runs on this machine, the load generator included, so the figures are bounded by its cores: on 2 cores the
HTTP process, Ray's own processes and the clients share them with the replicas. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

HOST = "127.0.0.1"  # loopback only
STARTUP_TIMEOUT_S = 300.0  # a Ray instance and its replicas take tens of seconds to start on 2 cores
WARM_UP_REQUESTS = 4
CONFIGURATIONS = {
    "single, 1 thread": ["--threads", "1"],
    "single, 2 threads": ["--threads", "2"],
    "ray, 1 replica": ["--ray-replicas", "1", "--ray-cpus-per-replica", "1"],
    "ray, 2 replicas": ["--ray-replicas", "2", "--ray-cpus-per-replica", "1"],
}


def load_test_module():
    """scripts/load_test_server.py as a module (its load test, its tiny model)."""
    path = Path(__file__).resolve().parent / "load_test_server.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(tester, model: Path, flags: list[str], args) -> dict:
    """The load test's report for one configuration (after a warm-up the report leaves out)."""
    port = tester.free_port()
    server = tester.start_server(model, port, args.queue_size, None, flags, quiet=True,
                                  timeout_s=STARTUP_TIMEOUT_S)
    try:
        url = f"http://{HOST}:{port}"
        tester.run_load_test(url, clients=2, requests=WARM_UP_REQUESTS, steps=args.steps, size=args.size)
        report = tester.run_load_test(url, clients=args.clients, requests=args.requests, steps=args.steps,
                                      size=args.size, pid=server.pid, deadline_s=args.deadline_s)
    finally:
        server.send_signal(2)  # SIGINT, as Ctrl-C: the server stops its replicas and its Ray instance
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per request (default 20)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (the tiny model's is 32)")
    parser.add_argument("--queue-size", type=int, default=8, help="the servers' --queue-size (default 8)")
    parser.add_argument("--model", type=Path, help="model to serve (default: a tiny random-weight model)")
    parser.add_argument("--only", choices=list(CONFIGURATIONS), action="append", help="run only these configurations")
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args()
    tester = load_test_module()
    reports = {}
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or tester.make_tiny_model(Path(folder) / "tiny.safetensors")
        for name in args.only or CONFIGURATIONS:
            print(f"{name}: kedavra serve {' '.join(CONFIGURATIONS[name])}", flush=True)
            reports[name] = measure(tester, model, CONFIGURATIONS[name], args)
    print(f"\n{args.requests} requests of {args.steps} steps at {args.size} px from {args.clients} clients")
    print(f"{'configuration':20} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'503s':>5}  checks")
    for name, report in reports.items():
        checks = "OK" if not report["problems"] else f"{len(report['problems'])} problems"
        print(f"{name:20} {report['throughput_per_s']:7.2f} {report['latency_p50_s']:7.3f} "
              f"{report['latency_p95_s']:7.3f} {report['rejected_503']:5}  {checks}")
        for problem in report["problems"]:
            print(f"  PROBLEM: {problem}")
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 0 if not any(report["problems"] for report in reports.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

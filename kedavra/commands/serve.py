"""`kedavra serve`: AUTOMATIC1111's HTTP API and a web page for one model, on this machine by default.

    kedavra serve --model v1-5-pruned-emaonly.safetensors               # http://127.0.0.1:7860/
    kedavra serve --models-dir ~/models --port 7861                     # the first model there; switch by name
    KEDAVRA_API_KEY=... kedavra serve --model m.safetensors --host 0.0.0.0   # others reach it, with the key

    kedavra serve --model m.safetensors --ray-replicas 2                # two replicas of the model on Ray Serve

Binding anything but a loopback address needs an API key; with a key, every API request must carry it. With
--ray-replicas the model runs on Ray Serve replicas behind the same API (kedavra.serving.ray_workers;
docs/scaling.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

import torch

from kedavra.api import choose_model, load, resolve_model
from kedavra.pipeline.device import check_device, parse_precision

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # A1111's port, so its clients find the server where they look
DEFAULT_QUEUE_SIZE = 8  # requests waiting behind the running one before new ones get 503
DEFAULT_MAX_BODY_MB = 20  # a few base64 PNGs at 2048 px fit, a runaway upload does not
DEFAULT_PREVIEW_EVERY = 4  # steps between live previews: a full VAE decode costs about as much as a step or more
API_KEY_ENV = "KEDAVRA_API_KEY"
MAX_PORT = 65535

EXAMPLES = """examples:
  kedavra serve --model v1-5-pruned-emaonly.safetensors
  kedavra serve --models-dir ~/models --queue-size 4
  KEDAVRA_API_KEY=$(openssl rand -hex 16) kedavra serve --model m.safetensors --host 0.0.0.0
  curl -s localhost:7860/sdapi/v1/txt2img -H 'Content-Type: application/json' -d '{"prompt": "a cat", "steps": 20}'
  kedavra serve --model m.safetensors --ray-replicas 2 --ray-cpus-per-replica 1
  kedavra serve --model m.safetensors --ray-address auto --ray-replicas 4 --ray-gpus-per-replica 1
"""
# the --ray-* flags other than --ray-replicas, by RayOptions field (kedavra.serving.ray_deployment)
RAY_FLAGS = {"address": "--ray-address", "cpus_per_replica": "--ray-cpus-per-replica",
             "gpus_per_replica": "--ray-gpus-per-replica", "max_ongoing": "--ray-max-ongoing",
             "min_replicas": "--ray-min-replicas", "max_replicas": "--ray-max-replicas",
             "autoscaling": "--ray-autoscaling"}
RAY_INSTALL = 'pip install "ray[serve]"'


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve AUTOMATIC1111's HTTP API (/sdapi/v1) and a web page for a model",
        description="Serve a Stable Diffusion model over AUTOMATIC1111's HTTP API (/sdapi/v1: txt2img, img2img,\n"
                    "progress, interrupt, samplers, sd-models, options) and a web page at /. The API is described\n"
                    "at /docs. One generation runs at a time; the others wait in a bounded queue.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="PATH_OR_NAME",
                       help="checkpoint file, diffusers folder or embedded model name (default: the first model in "
                            "--models-dir, else the embedded kedavra-shapes)")
    model.add_argument("--models-dir", metavar="DIR",
                       help="a folder of models (.safetensors, .ckpt, diffusers folders) listed by /sdapi/v1/sd-models "
                            "and selectable by name through the sd_model_checkpoint option")
    model.add_argument("--lora-dir", metavar="DIR",
                       help="where prompts' <lora:NAME:WEIGHT> tags find NAME (A1111's models/Lora; default: "
                            "--models-dir's Lora subfolder when there is one); /sdapi/v1/loras lists it")
    model.add_argument("--embeddings-dir", metavar="DIR",
                       help="textual-inversion embeddings a prompt uses by name (A1111's embeddings/; default: "
                            "--models-dir's embeddings subfolder when there is one); /sdapi/v1/embeddings lists them")
    model.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, mps (default: CUDA if present)")
    model.add_argument("--precision", default="auto", metavar="auto|fp32|bf16|fp16|int8",
                       help="network precision (default auto: bf16 where the hardware runs it fast, else fp32; int8: "
                            "the U-Net's large layers as int8 products on the CPU, opt-in, docs/benchmark.md)")
    model.add_argument("--threads", type=int, metavar="N", help="torch threads for generation (default: torch's)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}; anything but a loopback address needs "
                             "--api-key)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    server.add_argument("--api-key", metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' (or basic auth, password KEY) on every API "
                             f"request (default: ${API_KEY_ENV}, else none)")
    server.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                        help=f"requests that may wait behind the running one; more get 503 with Retry-After "
                             f"(default {DEFAULT_QUEUE_SIZE})")
    server.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                        help=f"largest request body in MiB; larger ones get 413 (default {DEFAULT_MAX_BODY_MB})")
    server.add_argument("--max-side-factor", type=float, metavar="F",
                        help="largest width / height a request may ask for, as a multiple of the model's native side "
                             "(default 4)")
    server.add_argument("--max-cost", type=float, metavar="N",
                        help="most work one batch may ask for, in native-size image steps: (width·height / native²) "
                             "x steps x batch_size (default 4800: every A1111 slider at twice the native side)")
    server.add_argument("--preview-every", type=int, default=DEFAULT_PREVIEW_EVERY, metavar="STEPS",
                        help=f"decode a live preview for /sdapi/v1/progress at most every STEPS steps "
                             f"(default {DEFAULT_PREVIEW_EVERY})")
    server.add_argument("--taesd", metavar="PATH",
                        help="decode /progress previews with this tiny autoencoder (taesd_decoder.pth, "
                             "taesdxl_decoder.pth or a diffusers AutoencoderTiny folder) instead of the full VAE")
    server.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default info)")
    ray = parser.add_argument_group("Ray Serve", "run the model on several Ray Serve replicas behind this server "
                                                 f"(needs {RAY_INSTALL}; docs/scaling.md)")
    ray.add_argument("--ray-replicas", type=int, metavar="N",
                     help="replicas of the model, each loading it and running one job at a time (default: no Ray, "
                          "one worker thread in this process)")
    ray.add_argument("--ray-address", metavar="ADDRESS",
                     help="'auto' or HOST:PORT of a running Ray cluster (default: start a local Ray instance)")
    ray.add_argument("--ray-cpus-per-replica", type=float, metavar="F",
                     help="CPUs Ray reserves for each replica (default 1; --threads defaults to it)")
    ray.add_argument("--ray-gpus-per-replica", type=float, metavar="F",
                     help="GPUs each replica takes (default 0; 1 puts each replica on a GPU of its own)")
    ray.add_argument("--ray-max-ongoing", type=int, metavar="N",
                     help="jobs a replica holds at once, the running one included (Ray Serve's "
                          "max_ongoing_requests; default 1); --queue-size bounds those waiting for a replica")
    ray.add_argument("--ray-min-replicas", type=int, metavar="N",
                     help="autoscale: never fewer replicas than N (default 1 once autoscaling)")
    ray.add_argument("--ray-max-replicas", type=int, metavar="N",
                     help="autoscale: up to N replicas as requests wait (default --ray-replicas once autoscaling)")
    ray.add_argument("--ray-autoscaling", metavar="JSON",
                     help="other keys of Ray Serve's autoscaling_config, e.g. '{\"target_ongoing_requests\": 1, "
                          "\"downscale_delay_s\": 300}' (with --ray-min-replicas / --ray-max-replicas)")
    parser.set_defaults(func=run)


def server_config(host: str, api_key: str | None, max_body_mb: float, max_side_factor: float | None = None,
                  max_cost: float | None = None):
    """The app's ServerConfig; refuses to listen beyond the loopback without an API key."""
    from kedavra.serving.app import ServerConfig, is_loopback
    from kedavra.serving.tasks import Admission

    if not is_loopback(host) and api_key is None:
        raise ValueError(f"refusing to listen on {host} without an API key: anyone who reaches this machine could "
                         f"use the server. Give --api-key KEY (or set {API_KEY_ENV}), or listen on {DEFAULT_HOST}")
    if not 0 < max_body_mb < float("inf"):
        raise ValueError(f"--max-body-mb must be a positive number, got {max_body_mb}")
    defaults = Admission()
    admission = Admission(defaults.side_factor if max_side_factor is None else max_side_factor,
                          defaults.max_cost if max_cost is None else max_cost)
    return ServerConfig(api_key=api_key, max_body_bytes=int(max_body_mb * 2**20), loopback_only=is_loopback(host),
                        admission=admission)


def check_counts(args) -> None:
    """The integer options, refused before the model loads."""
    if not 0 <= args.port <= MAX_PORT:
        raise ValueError(f"--port must be from 0 to {MAX_PORT}, got {args.port}")
    if args.queue_size < 0:
        raise ValueError(f"--queue-size must be 0 or more, got {args.queue_size}")
    if args.preview_every < 1:
        raise ValueError(f"--preview-every must be 1 or more steps, got {args.preview_every}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be 1 or more, got {args.threads}")


def ray_options(args):
    """The --ray-* flags as RayOptions (kedavra.serving.ray_deployment), or None without --ray-replicas; checked
    before anything loads."""
    given = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in RAY_FLAGS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    if args.ray_replicas is None:
        if given:
            raise ValueError(f"{RAY_FLAGS[next(iter(given))]} needs --ray-replicas N (the number of replicas)")
        return None
    if args.taesd is not None:
        raise ValueError("--taesd does nothing with --ray-replicas: the replicas decode no live previews")
    if "autoscaling" in given:
        try:
            given["autoscaling"] = json.loads(given["autoscaling"])
        except json.JSONDecodeError as error:
            raise ValueError(f"--ray-autoscaling must be a JSON object, got {args.ray_autoscaling!r} ({error})") \
                from None
    from kedavra.serving.ray_deployment import RayOptions

    options = RayOptions(replicas=args.ray_replicas, **given)
    options.deployment_options(args.queue_size)  # --queue-size 0 has no Ray Serve counterpart
    return options


def adapter_folder(flag: str, given: str | None, models_dir: Path | None, subfolder: str) -> Path | None:
    """A LoRA or embeddings folder: the flag's (which must exist), else `subfolder` of --models-dir if it exists."""
    if given is not None:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{flag} {given!r} does not exist or is not a folder")
        return folder
    if models_dir is not None and (models_dir / subfolder).is_dir():
        return models_dir / subfolder
    return None


def load_model(path: Path, taesd: str | None = None, **options):
    """A model's pipeline for the server (kedavra.api.load), with the --taesd preview decoder when it fits the model
    (a model it does not fit, switched to later, previews through its VAE: said on stderr)."""
    pipe = load(path, **options)
    if taesd is not None:
        try:
            pipe.load_preview_decoder(taesd)
        except ValueError as error:
            print(f"kedavra serve: note: previews of {Path(path).name} use its VAE: {error}", file=sys.stderr)
    return pipe


def run(args) -> int:
    try:
        import uvicorn

        from kedavra.serving.app import create_app
        from kedavra.serving.connections import raise_open_file_limit, uvicorn_options
        from kedavra.serving.worker import ModelCatalog, Worker
    except ImportError as error:
        raise ValueError(f"kedavra serve needs fastapi and uvicorn ({error}): pip install fastapi uvicorn") from None

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    config = server_config(args.host, api_key, args.max_body_mb, args.max_side_factor, args.max_cost)
    check_counts(args)
    on_ray = ray_options(args)
    models_dir = Path(args.models_dir).expanduser() if args.models_dir is not None else None
    if args.model is not None:
        model_path = resolve_model(args.model)
    else:
        listed = ModelCatalog(models_dir).entries()
        model_path = listed[0].path if listed else resolve_model(choose_model(None, None))
    lora_dir = adapter_folder("--lora-dir", args.lora_dir, models_dir, "Lora")
    embeddings_dir = adapter_folder("--embeddings-dir", args.embeddings_dir, models_dir, "embeddings")
    if on_ray is not None:
        return run_on_ray(args, on_ray, config, model_path, models_dir, lora_dir, embeddings_dir)
    catalog = ModelCatalog(models_dir, initial=model_path)
    device, dtype = check_device(args.device), parse_precision(args.precision)
    if args.taesd is not None and not Path(args.taesd).expanduser().exists():
        raise ValueError(f"--taesd {args.taesd}: no such file or folder")
    loader = functools.partial(load_model, device=device, dtype=dtype, lora_dir=lora_dir,
                               embeddings_dir=embeddings_dir, taesd=args.taesd)
    entry = catalog.identify(catalog.entries()[0])
    first = load(model_path, device=device, dtype=dtype, lora_dir=lora_dir, embeddings_dir=embeddings_dir)
    if args.taesd is not None:
        first.load_preview_decoder(args.taesd)  # raises, naming why, for the model the server starts with
    worker = Worker(first, entry, catalog, loader, queue_size=args.queue_size,
                    preview_every=args.preview_every, threads=args.threads)
    app = create_app(worker, config)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"kedavra serve: {entry.title} at http://{shown}:{args.port}/ (API {shown}:{args.port}/sdapi/v1, "
          f"description /docs){'; API key required' if api_key else ''}", file=sys.stderr)
    raise_open_file_limit()  # idle sockets must not run the process out of descriptors before they time out
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options())
    return 0


def run_on_ray(args, options, config, model_path: Path, models_dir: Path | None, lora_dir: Path | None,
               embeddings_dir: Path | None) -> int:
    """`kedavra serve --ray-replicas N`: this process serves the API; the model runs on Ray Serve replicas (on this
    machine, or on the cluster at --ray-address), each loading it with the server's options."""
    import uvicorn

    from kedavra.serving.connections import raise_open_file_limit, uvicorn_options
    from kedavra.serving.ray_deployment import ReplicaSpec

    try:
        from kedavra.serving.ray_workers import RayWorker, check_room, connect, create_ray_app, disconnect
    except ImportError as error:
        raise ValueError(f"--ray-replicas needs Ray Serve ({error}): {RAY_INSTALL}") from None
    if args.device is not None:
        try:
            torch.device(args.device)  # the replicas check that their machine has it
        except RuntimeError:
            raise ValueError(f"unknown --device {args.device!r}; e.g. cpu, cuda, cuda:1") from None
    loader = functools.partial(load, device=args.device, dtype=parse_precision(args.precision), lora_dir=lora_dir,
                               embeddings_dir=embeddings_dir)
    threads = args.threads if args.threads is not None else max(1, math.floor(options.cpus_per_replica))
    spec = ReplicaSpec(model_path, models_dir, loader, threads=threads)
    started_here = connect(options.address)
    worker = None
    try:
        if started_here:
            check_room(options)
        worker = RayWorker(spec, options, queue_size=args.queue_size)
        app = create_ray_app(worker, config)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"kedavra serve: {worker.model.title} on {options.replicas} Ray Serve replicas, at "
              f"http://{shown}:{args.port}/ (API {shown}:{args.port}/sdapi/v1, description /docs)"
              f"{'; API key required' if config.api_key else ''}", file=sys.stderr)
        raise_open_file_limit()
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options())
    finally:
        if worker is not None:
            worker.stop()  # nothing when the app's shutdown has stopped it
        disconnect(started_here)
    return 0

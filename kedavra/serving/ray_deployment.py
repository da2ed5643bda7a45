"""What runs on the Ray cluster behind `kedavra serve --ray-replicas N`: the replicas that hold the model.

    RayWorker (kedavra.serving.ray_workers, in the HTTP process)
        --Ray Serve DeploymentHandle, streaming--> GenerationReplica.run(job_id, work) on one of N replicas
            a Worker (kedavra.serving.worker) over the replica's own Pipeline
        <-- JobUpdate(progress) every PROGRESS_POLL_S while the job runs, then JobUpdate(result or error)
    RayWorker.interrupt --> ReplicaBoard.interrupt(job ids) <-- looked at by the replicas running those jobs
    RayWorker's model switch --> ReplicaBoard.select(name), then every replica's switch_model(name)

`GenerationReplica` is the class Ray Serve deploys (serve.deployment(GenerationReplica, **options)): each replica
loads the model the board names and runs the jobs routed to it on a Worker of its own, so a generation runs the
single-process server's code and gives the same PNG bytes for the same checked request. A job's errors travel
inside its stream, so that the HTTP side answers them as the single-process server does (422 for a ValueError).
A model switch reaches every replica through Ray Serve's broadcast, and waits there behind the job the replica
holds; a model that fails to load leaves the old one loaded (the Worker's rule), said in the replica's answer.

`ReplicaBoard` is a small Ray actor the HTTP process owns, what every replica must know from it: the model to run
(a replica that starts later, by autoscaling or in place of a dead one, loads the model selected now, not the first
one) and the jobs A1111's /interrupt stopped (a replica running one sees it at its next look, every
PROGRESS_POLL_S, and stops it after its current step).

`RayOptions` are the deployment's settings from `kedavra serve`'s --ray-* flags. Nothing here imports ray: Ray Serve
wraps the classes when kedavra.serving.ray_workers deploys them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedavra.adapters.textual_inversion import EmbeddingLibrary, LoadReport
from kedavra.networks.model import ModelConfig
from kedavra.pipeline.pipeline import Pipeline
from kedavra.serving.extras import ExtrasRunner
from kedavra.serving.schemas import ProgressResponse
from kedavra.serving.worker import GenerationTask, Job, ModelCatalog, ModelEntry, Worker
from kedavra.validation import check_int, check_number

PROGRESS_POLL_S = 0.25  # how often a replica reports a running job's progress and looks for its interrupt
# autoscaling_config keys kedavra sets from its own flags (--ray-replicas, --ray-min-replicas, --ray-max-replicas)
AUTOSCALING_FLAG_KEYS = {"min_replicas": "--ray-min-replicas", "max_replicas": "--ray-max-replicas",
                         "initial_replicas": "--ray-replicas"}


@dataclass(frozen=True)
class RayOptions:
    """The deployment's settings (`kedavra serve --ray-*`; docs/scaling.md).

    replicas           replicas at start (Ray Serve's num_replicas, or initial_replicas when autoscaling)
    address            the Ray cluster to join ("auto", HOST:PORT), or None: a local Ray instance started here
    cpus_per_replica   ray_actor_options num_cpus; gpus_per_replica: num_gpus (1: one GPU each)
    max_ongoing        jobs one replica holds at once (max_ongoing_requests): the running one and max_ongoing - 1
                       waiting at it; requests beyond every replica's share wait in the handle's queue, whose bound
                       is kedavra serve's --queue-size (max_queued_requests)
    min_replicas, max_replicas
                       autoscale between them (None, None: a fixed number of replicas); `autoscaling`: other keys of
                       Ray Serve's autoscaling_config (target_ongoing_requests, upscale_delay_s, ...) as they are
    """

    replicas: int = 1
    address: str | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    autoscaling: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_int("--ray-replicas", self.replicas, low=1)
        check_number("--ray-cpus-per-replica", self.cpus_per_replica, low=0)
        check_number("--ray-gpus-per-replica", self.gpus_per_replica, low=0)
        check_int("--ray-max-ongoing", self.max_ongoing, low=1)
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ValueError(f"--ray-address must be 'auto' or HOST:PORT of a Ray cluster, got {self.address!r}")
        if not isinstance(self.autoscaling, Mapping):
            raise ValueError(f"--ray-autoscaling must be a JSON object, got {self.autoscaling!r}")
        for key, flag in AUTOSCALING_FLAG_KEYS.items():
            if key in self.autoscaling:
                raise ValueError(f"--ray-autoscaling: give {key} as {flag}, not in the JSON")
        if self.autoscaling and not self.autoscaled:
            raise ValueError("--ray-autoscaling needs --ray-max-replicas (or --ray-min-replicas): without them the "
                             "number of replicas is fixed")
        if self.autoscaled:
            low, high = self.scaling_range
            check_int("--ray-min-replicas", low, low=1, high=self.replicas)
            check_int("--ray-max-replicas", high, low=self.replicas)

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def scaling_range(self) -> tuple[int, int]:
        """(min, max) replicas: --ray-min-replicas (default 1) and --ray-max-replicas (default --ray-replicas)."""
        return (1 if self.min_replicas is None else self.min_replicas,
                self.replicas if self.max_replicas is None else self.max_replicas)

    def deployment_options(self, queue_size: int) -> dict[str, Any]:
        """serve.deployment's options; queue_size: requests that may wait for a replica (max_queued_requests)."""
        check_int("--queue-size", queue_size, low=1, note=" with --ray-replicas (Ray Serve's max_queued_requests)")
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing, "max_queued_requests": queue_size,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica}}
        if self.autoscaled:
            low, high = self.scaling_range
            options["autoscaling_config"] = {"target_ongoing_requests": self.max_ongoing, **self.autoscaling,
                                             "min_replicas": low, "max_replicas": high,
                                             "initial_replicas": self.replicas}
        else:
            options["num_replicas"] = self.replicas
        return options


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica needs: the models it may load (the catalog's folder and first model) and how.

    load: path -> Pipeline, run in the replica (kedavra.api.load with the server's device, precision, LoRA and
    embeddings folders); threads: torch threads for its generations (None: torch's default)."""

    initial: Path
    models_dir: Path | None
    load: Callable[[Path], Pipeline]
    threads: int | None = None


@dataclass(frozen=True)
class ReplicaModel:
    """What a replica runs, for the HTTP side's checks and listings: the model, its config, its LoRA folder and
    textual-inversion embeddings, and why the last switch failed (None when it did not)."""

    entry: ModelEntry
    config: ModelConfig
    lora_dir: Path | None
    embeddings: EmbeddingLibrary
    embeddings_report: LoadReport
    switch_error: str | None = None


@dataclass(frozen=True)
class JobUpdate:
    """One message of a job's stream: the replica's progress while the job runs, then its result or its error."""

    progress: ProgressResponse | None = None
    result: Any = None
    error: BaseException | None = None


class ReplicaStopped(RuntimeError):
    """The replica stopped (it is shutting down) before the job finished: the HTTP side runs the job elsewhere."""


class ReplicaBoard:
    """What every replica must know from the HTTP side: the model to run (a listed name) and the jobs A1111's
    /interrupt stopped, until the replica running each one has seen it (a Ray actor; module docstring)."""

    def __init__(self, model: str):
        self._model = model
        self._interrupted: set[str] = set()

    def select(self, model: str) -> None:
        """The model replicas load from now on, those that start later included."""
        self._model = model

    def model(self) -> str:
        return self._model

    def interrupt(self, job_ids: list[str]) -> None:
        self._interrupted.update(job_ids)

    def take(self, job_id: str) -> bool:
        """True (once) when `job_id` was interrupted."""
        if job_id in self._interrupted:
            self._interrupted.discard(job_id)
            return True
        return False

    def forget(self, job_ids: list[str]) -> None:
        """Drop marks no replica will take (their jobs finished first)."""
        self._interrupted.difference_update(job_ids)


class GenerationReplica:
    """One Ray Serve replica: the model the board names, on a Worker of its own (module docstring)."""

    async def __init__(self, spec: ReplicaSpec, board, max_ongoing: int):
        self.spec = spec
        self.board = board  # the ReplicaBoard's actor handle
        self.max_ongoing = max_ongoing  # RayOptions.max_ongoing: the jobs Ray Serve sends here at once
        self.catalog = ModelCatalog(spec.models_dir, initial=spec.initial)
        self.switch_error: str | None = None
        self.worker = await asyncio.to_thread(self._start_worker, self.catalog.find(await board.model.remote()))

    def _start_worker(self, entry: ModelEntry) -> Worker:
        entry = self.catalog.identify(entry)
        worker = Worker(self.spec.load(entry.path), entry, self.catalog, self.spec.load,
                        queue_size=self.max_ongoing, threads=self.spec.threads)
        worker.start()
        return worker

    async def switch_model(self, name: str) -> ReplicaModel:
        """Load the listed model `name` once the job this replica holds is done (a switch queued on its Worker); a
        model that fails to load leaves the one that was running, and the answer says why."""
        entry = self.catalog.find(name)
        try:
            await asyncio.wrap_future(self.worker.submit_model_switch(entry).future)
        except Exception as error:  # the Worker went back to the model that was running
            self.switch_error = f"could not load {entry.filename}: {error}"
        else:
            self.switch_error = None
        return self.describe()

    def describe(self) -> ReplicaModel:
        """The model this replica runs (see ReplicaModel)."""
        worker = self.worker
        pipe = worker.pipeline
        if pipe is None:
            raise RuntimeError(f"no model is loaded: {self.switch_error}")
        embeddings = EmbeddingLibrary(pipe.embeddings.widths)  # a copy without the library's per-tokenizer cache
        for embedding in pipe.embeddings.values():
            embeddings.add(embedding)
        return ReplicaModel(worker.model, pipe.config, pipe.lora_dir, embeddings, pipe.embeddings_report,
                            self.switch_error)

    async def run(self, job_id: str, work: GenerationTask | Callable[[Job], Any]):
        """Run one job on this replica's Worker (a generation task, or other work such as the Extras tab's),
        streaming JobUpdates (module docstring). When the caller cancels the request (its client left), the job
        is dropped if it waits and stopped after its current step if it runs."""
        worker = self.worker
        job = worker.submit_generation(work) if isinstance(work, GenerationTask) else worker.submit_work(work)
        waiter = asyncio.wrap_future(job.future)
        try:
            while not (await asyncio.wait({waiter}, timeout=PROGRESS_POLL_S))[0]:
                if not job.future.running():
                    continue
                if await self.board.take.remote(job_id):
                    job.cancelled.set()  # as Worker.interrupt: stop after the current step
                yield JobUpdate(progress=worker.progress(want_image=False))
            if waiter.cancelled():
                yield JobUpdate(error=ReplicaStopped("the replica stopped before the job ran"))
            elif waiter.exception() is not None:
                yield JobUpdate(error=waiter.exception())
            else:
                yield JobUpdate(result=waiter.result())
        finally:
            if not job.future.done():
                worker.cancel(job)

    def __del__(self):
        """Ray Serve's graceful shutdown: the requests have drained; the worker thread stops."""
        if getattr(self, "worker", None) is not None:
            self.worker.stop()


class SharedExtrasRunner(ExtrasRunner):
    """An ExtrasRunner that travels by reference: unpickled in a replica it is that process's one runner, so the
    Extras tab's work, shipped to a replica with its runner, keeps the upscaler network loaded between requests."""

    def __reduce__(self):
        return process_extras_runner, ()


_process_runner: ExtrasRunner | None = None
_process_runner_lock = threading.Lock()


def process_extras_runner() -> SharedExtrasRunner:
    """This process's SharedExtrasRunner (made on first use)."""
    global _process_runner
    with _process_runner_lock:
        if _process_runner is None:
            _process_runner = SharedExtrasRunner()
        return _process_runner

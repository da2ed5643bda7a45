"""`kedavra serve --ray-replicas N`: the HTTP process's worker when the model runs on Ray Serve replicas.

    the routes (kedavra.serving.routes, unchanged) --submit--> RayWorker --Ray Serve handle--> N GenerationReplica
    (kedavra.serving.ray_deployment), each a Worker over its own copy of the model, on this machine or a cluster

`RayWorker` offers the routes what kedavra.serving.worker.Worker does (submit_generation, submit_work,
submit_model_switch, cancel, interrupt, progress, queued, pipeline, model, catalog, counts, start, stop), so every
route, check and answer stays as it is. The HTTP process holds no weights: its `pipeline` is the replicas' model
built on PyTorch's meta device (`weightless_pipeline`), enough to check a request against the model's config and to
list its LoRAs and embeddings.

Ray Serve sends each job to a replica with room, at most --ray-max-ongoing jobs at a replica at once; the others wait
in the handle's queue of at most --queue-size (Ray Serve's max_queued_requests), and one more is answered 503 with
Retry-After, as by the single-process server. A job whose replica dies (its process killed, its node lost) runs
again from the start on another replica: generation is deterministic once the HTTP side has fixed the seed, so it
makes the images the first run would have made. A job so retried waits for room rather than being refused, up to
REQUEUE_DEADLINE_S; a second loss, or no room by then, answers 503 saying which. Ray reports a replica's death to the
calls waiting on it, so no request waits on a dead replica.

What differs from the single-process server: several jobs run at once, so /progress shows the one running longest,
without a live preview (current_image is null: replicas do not decode previews), and /interrupt stops every running
job; a model switch reaches every replica, and new requests get 503 until all have loaded it.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
import uuid
from collections import deque
from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from typing import Any

import ray
import torch
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from kedavra.networks.model import StableDiffusion
from kedavra.pipeline.pipeline import Pipeline
from kedavra.serving.app import ServerConfig, create_app
from kedavra.serving.errors import unavailable
from kedavra.serving.ray_deployment import (
    GenerationReplica,
    JobUpdate,
    RayOptions,
    ReplicaBoard,
    ReplicaModel,
    ReplicaSpec,
    ReplicaStopped,
    process_extras_runner,
)
from kedavra.serving.schemas import ProgressResponse, ProgressState
from kedavra.serving.worker import (
    DURATION_WINDOW,
    MAX_RETRY_AFTER_S,
    GenerationTask,
    Job,
    ModelCatalog,
    ModelEntry,
    QueueFull,
)

APP_NAME = "kedavra"  # the Ray Serve application (one kedavra server per Ray cluster)
DEPLOYMENT_NAME = "GenerationReplica"
MAX_REPLICA_LOSSES = 2  # a job whose replica died runs once more; a second loss answers 503
REPLICA_LOSSES = (RayActorError, ReplicaUnavailableError, ReplicaStopped)  # how Ray says a replica went away
REQUEUE_WAIT_S = 0.5  # a retried job that finds the queue full tries again after this long
REQUEUE_DEADLINE_S = 120.0  # ... for at most this long
BROADCAST_TIMEOUT_S = 600.0  # replicas answer a broadcast (describe, switch_model) once the job they hold is done
STOP_TIMEOUT_S = 30.0


def runs_on_a_replica(job: Job) -> Any:
    """A RayWorker job's `work`: the job runs on a replica, never in this process."""
    raise RuntimeError("this job runs on a Ray Serve replica")


def _resolve(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    """Put `result` or `error` in job.future, unless the job was cancelled meanwhile (its client left)."""
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    except InvalidStateError:
        pass


def weightless_pipeline(model: ReplicaModel) -> Pipeline:
    """A Pipeline of the replicas' model without its weights (on PyTorch's meta device, taking no memory), for what
    the HTTP side does with one: check requests against the config, list the LoRA folder and the embeddings."""
    with torch.device("meta"):
        network = StableDiffusion(model.config)
    pipe = Pipeline(network, device="meta", dtype=torch.float32, optimize=False, lora_dir=model.lora_dir)
    pipe.embeddings, pipe.embeddings_report = model.embeddings, model.embeddings_report
    return pipe


@dataclass(eq=False)
class _RemoteJob:
    """A job's life on the HTTP side: its id (for interrupts), what it runs, its task here, and its progress."""

    id: str
    work: GenerationTask | Any
    task: Any = None  # the concurrent Future of its coroutine on the RayWorker's loop
    started: float | None = None  # when a replica first reported it running
    progress: ProgressResponse | None = None
    interrupted: bool = False


class RayWorker:
    """The routes' worker over Ray Serve replicas (module docstring). Constructing it deploys the replicas (Ray must
    be connected: `connect`) and returns once they have loaded the first model.

    spec: what each replica loads and how; options: the deployment's settings; queue_size: requests that may wait
    for a replica (Ray Serve's max_queued_requests)."""

    def __init__(self, spec: ReplicaSpec, options: RayOptions, *, queue_size: int):
        self.spec, self.options = spec, options
        self.queue_size = queue_size
        self._options = options.deployment_options(queue_size)
        self.catalog = ModelCatalog(spec.models_dir, initial=spec.initial)
        self.counts = {"completed": 0, "interrupted": 0, "cancelled": 0, "failed": 0, "rejected": 0, "retried": 0}
        self.model: ModelEntry | None = None
        self.pipeline: Pipeline | None = None
        self._jobs: dict[Job, _RemoteJob] = {}
        self._lock = threading.Lock()
        self._switching = threading.Lock()  # one model switch at a time
        self._durations: deque[float] = deque(maxlen=DURATION_WINDOW)
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kedavra-ray", daemon=True)
        entry = self.catalog.entries()[0]
        self._board = ray.remote(num_cpus=0)(ReplicaBoard).remote(entry.filename)
        try:
            self._deploy()
            self._use(self._broadcast("describe")[0], entry)
        except Exception as error:
            reason = self._failure()
            self._undeploy()
            if isinstance(error, RuntimeError) and reason:
                raise ValueError(f"the Ray Serve replicas did not start: {reason}") from None
            raise

    # -- the routes' side --

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Refuse new jobs, cancel the others, remove the replicas (Ray Serve stops them) and the board."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            jobs = list(self._jobs.items())
        for job, remote in jobs:
            self._cancel(job, remote)
        self._undeploy()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def submit_generation(self, task: GenerationTask) -> Job:
        """Send `task` to a replica; its future gets the GenerationOutcome, or QueueFull (503) when Ray Serve's
        queue is full."""
        return self._submit(task)

    def submit_work(self, work) -> Job:
        """Send other work (the Extras tab's: a picklable callable of a Job) to a replica, as a job of its own."""
        return self._submit(work)

    def submit_model_switch(self, entry: ModelEntry) -> Job[ModelEntry]:
        """Switch every replica to the listed model `entry` (`_switch`); the job's result: `entry` with its hashes."""
        job = Job(runs_on_a_replica)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
        asyncio.run_coroutine_threadsafe(self._settle(job, asyncio.to_thread(self._switch, entry)), self._loop)
        return job

    def cancel(self, job: Job) -> None:
        """The client left: drop `job` if it waits, stop it after its current step if it runs."""
        with self._lock:
            remote = self._jobs.get(job)
        if remote is not None and not job.future.done():
            self._count("cancelled")
            self._cancel(job, remote)

    def interrupt(self) -> bool:
        """A1111's /interrupt: stop every running job after its current step; False when none runs."""
        with self._lock:
            running = [remote for remote in self._jobs.values() if remote.started is not None]
            for remote in running:
                remote.interrupted = True
        if running:
            self._board.interrupt.remote([remote.id for remote in running])
        return bool(running)

    def queued(self) -> int:
        """Jobs sent and not yet running (waiting in Ray Serve's queue or at a replica)."""
        with self._lock:
            return sum(1 for remote in self._jobs.values() if remote.started is None)

    def running(self) -> int:
        """Jobs running on replicas now."""
        with self._lock:
            return sum(1 for remote in self._jobs.values() if remote.started is not None)

    def progress(self, want_image: bool = True) -> ProgressResponse:
        """A1111's progress of the job running longest, as its replica last reported it (without a preview), and
        the jobs waiting as `state.queued`."""
        with self._lock:
            remotes = list(self._jobs.values())
        waiting = sum(1 for remote in remotes if remote.started is None)
        running = sorted((r for r in remotes if r.started is not None and r.progress is not None),
                         key=lambda remote: remote.started)
        if not running:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState(queued=waiting),
                                    textinfo="Waiting" if waiting else None)
        shown = running[0].progress
        return shown.model_copy(update={"state": shown.state.model_copy(update={"queued": waiting}),
                                        "current_image": None})

    # -- jobs, on this worker's event loop --

    def _submit(self, work) -> Job:
        job, remote = Job(runs_on_a_replica), _RemoteJob(uuid.uuid4().hex, work)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._jobs[job] = remote
        remote.task = asyncio.run_coroutine_threadsafe(self._serve(job, remote), self._loop)
        return job

    def _cancel(self, job: Job, remote: _RemoteJob) -> None:
        job.future.cancel()
        if remote.task is not None:
            remote.task.cancel()  # cancels its Ray Serve request: the replica drops or stops the job

    async def _serve(self, job: Job, remote: _RemoteJob) -> None:
        """Run `remote` on the replicas and settle `job.future` with what came of it."""
        try:
            await self._settle(job, self._run_on_replicas(remote), remote)
        finally:
            with self._lock:
                self._jobs.pop(job, None)
            if remote.interrupted:
                self._board.forget.remote([remote.id])  # in case the job ended before its replica looked

    async def _settle(self, job: Job, work, remote: _RemoteJob | None = None) -> None:
        """Await `work` (a job's last JobUpdate, or a switch's ModelEntry) and put what came of it in job.future,
        counting the outcome as Worker does."""
        submitted = time.monotonic()
        try:
            result = await work
            if isinstance(result, JobUpdate) and result.error is not None:
                raise result.error
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        except Exception as error:
            self._count("rejected" if isinstance(error, QueueFull) else "failed")
            _resolve(job, error=error)
            return
        if isinstance(result, JobUpdate):
            result = result.result
        self._count("interrupted" if getattr(result, "interrupted", False) else "completed")
        if remote is not None:
            with self._lock:
                self._durations.append(time.monotonic() - (remote.started or submitted))
        _resolve(job, result=result)

    async def _run_on_replicas(self, remote: _RemoteJob) -> JobUpdate:
        """The job's last update from a replica; again on another replica when its replica dies (module docstring)."""
        losses, deadline = 0, math.inf
        while True:
            try:
                return await self._run_once(remote)
            except BackPressureError:
                if losses == 0:
                    raise QueueFull(self.queued() - 1, self._retry_after()) from None
                if time.monotonic() > deadline:
                    raise unavailable(f"the replica running this request died, and no other had room for it "
                                      f"within {REQUEUE_DEADLINE_S:g} s; try again", self._retry_after()) from None
                await asyncio.sleep(REQUEUE_WAIT_S)
            except DeploymentUnavailableError as error:
                raise unavailable(f"the generation replicas are unavailable: {getattr(error, 'message', error)}",
                                  self._retry_after()) from None
            except REPLICA_LOSSES as error:
                losses += 1
                if losses >= MAX_REPLICA_LOSSES:
                    raise unavailable(f"the replica running this request died ({type(error).__name__}), and so did "
                                      "the one it was retried on; try again", self._retry_after()) from None
                self._count("retried")
                deadline = time.monotonic() + REQUEUE_DEADLINE_S
                with self._lock:
                    remote.started, remote.progress = None, None

    async def _run_once(self, remote: _RemoteJob) -> JobUpdate:
        """One run of the job on the replica Ray Serve picks: its progress recorded, its last update returned."""
        response = self._stream.run.remote(remote.id, remote.work)
        try:
            async for update in response:
                if update.progress is None:
                    if isinstance(update.error, ReplicaStopped):
                        raise update.error
                    return update
                with self._lock:
                    remote.progress = update.progress
                    remote.started = remote.started or time.monotonic()
        except asyncio.CancelledError:
            response.cancel()
            raise
        raise ReplicaStopped("the replica's stream ended without the job's result")

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: recent job durations x jobs waiting, over the replicas."""
        with self._lock:
            typical = statistics.fmean(self._durations) if self._durations else 1.0
            waiting = sum(1 for remote in self._jobs.values() if remote.started is None)
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(typical * (waiting + 1) / self.options.replicas)))

    # -- the deployment --

    def _deploy(self) -> None:
        """Deploy the replicas; returns once every one has loaded the model the board names."""
        deployment = serve.deployment(GenerationReplica, name=DEPLOYMENT_NAME, **self._options)
        handle = serve.run(deployment.bind(self.spec, self._board, self.options.max_ongoing), name=APP_NAME,
                           route_prefix=None)
        self._handle, self._stream = handle, handle.options(stream=True)

    def _failure(self) -> str:
        """The last line of what Ray Serve says about a deployment that failed (the replicas' exception), or ""."""
        application = serve.status().applications.get(APP_NAME)
        deployment = application.deployments.get(DEPLOYMENT_NAME) if application is not None else None
        lines = [line.strip() for line in (deployment.message if deployment is not None else "").splitlines()]
        return next((line for line in reversed(lines) if line), "")

    def _undeploy(self) -> None:
        if ray.is_initialized():
            serve.delete(APP_NAME)
            ray.kill(self._board)

    def _broadcast(self, method: str, *args) -> list[ReplicaModel]:
        """Every replica's answer to `method` (describe, switch_model), each given once the job it holds is done."""
        return self._handle.broadcast(method, *args).results(timeout_s=BROADCAST_TIMEOUT_S)

    def _use(self, described: ReplicaModel, entry: ModelEntry) -> None:
        self.model = self.catalog.identify(entry)
        self.pipeline = weightless_pipeline(described)

    def _switch(self, entry: ModelEntry) -> ModelEntry:
        """Every replica loads `entry` after the job it holds (replicas started later load it too: the board names
        it); new requests get 503 meanwhile (routes: a model is loading). A model that fails to load leaves the old
        one on every replica and raises ValueError (answered 422)."""
        with self._switching:
            previous, self.pipeline = self.model, None
            try:
                ray.get(self._board.select.remote(entry.filename))
                models = self._broadcast("switch_model", entry.filename)
                failed = [model.switch_error for model in models if model.switch_error is not None]
                if failed:
                    raise ValueError(failed[0])
            except Exception:
                ray.get(self._board.select.remote(previous.filename))
                self._use(self._broadcast("switch_model", previous.filename)[0], previous)
                raise
            self._use(models[0], entry)
            return self.model


def connect(address: str | None) -> bool:
    """Connect to the Ray cluster at `address` ("auto": the one this machine is part of; HOST:PORT), or start a
    local Ray instance (None); then start Ray Serve there without its HTTP proxy (kedavra's own server takes the
    requests). True when a local instance was started here (`disconnect` stops it)."""
    if address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    serve.start(proxy_location="Disabled")
    return address is None


def check_room(options: RayOptions) -> None:
    """Refuse replicas the Ray instance cannot place (a local one: it gains no machines), naming the numbers, rather
    than wait for them without end."""
    total = ray.cluster_resources()
    for resource, flag, each in (("CPU", "--ray-cpus-per-replica", options.cpus_per_replica),
                                 ("GPU", "--ray-gpus-per-replica", options.gpus_per_replica)):
        needed = each * options.replicas
        if needed > total.get(resource, 0):
            raise ValueError(f"--ray-replicas {options.replicas} x {flag} {each:g} needs {needed:g} {resource}s; the "
                             f"local Ray instance has {total.get(resource, 0):g}: ask for fewer replicas or less each, "
                             "or join a cluster with --ray-address")


def disconnect(started_here: bool) -> None:
    """Leave the Ray cluster; stop Ray Serve and Ray too when `connect` started them here."""
    if started_here:
        serve.shutdown()
    ray.shutdown()


def create_ray_app(worker: RayWorker, config: ServerConfig) -> FastAPI:
    """create_app over `worker`, with an Extras runner that stays loaded in each replica (SharedExtrasRunner)."""
    app = create_app(worker, config)
    app.state.extras = process_extras_runner()
    return app

"""The generation queue: one worker thread owns the pipeline and runs one job at a time.

    HTTP handlers --submit--> bounded queue --> worker thread --> Pipeline --> PNG bytes --> the handler's future

Requests wait in a FIFO of at most `queue_size` jobs behind the running one; a request that finds it full is
refused at once (`QueueFull`, answered 503 with Retry-After), never parked without bound. A job leaves the queue
when its client goes away (`cancel`); a running job stops after its current sampler step when cancelled or
interrupted, through the step callback, or inside the step between the networks' blocks (`interruptible`).
Every image's randomness comes from its own seeded generator inside the
pipeline, so a request's images do not depend on what ran before it or beside it.

The models a server may switch between are those a `ModelCatalog` lists: the model it started with and the
files and diffusers folders directly inside --models-dir. A request names one of them by its listed name; no
path from a request is ever opened.
"""

from __future__ import annotations

import base64
import functools
import gc
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

import torch

from kedavra.api import model_identity
from kedavra.diffusion.samplers import StepCallback, StepRecord
from kedavra.formats.png_info import SHORT_HASH_LENGTH, encode_png, format_parameters, sha256_file
from kedavra.pipeline.device import release_memory
from kedavra.pipeline.infotext import request_parameters
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import GenerationRequest
from kedavra.serving.interrupts import Interrupted, interruptible
from kedavra.serving.schemas import ProgressResponse, ProgressState
from kedavra.validation import MAX_SEED, check_int, check_optional_int

MODEL_SUFFIXES = (".safetensors", ".ckpt")  # single-file checkpoints kedavra.checkpoint reads
DIFFUSERS_INDEX = "model_index.json"  # what makes a folder a diffusers model
DURATION_WINDOW = 20  # recent job durations averaged for Retry-After
FULL_COLLECTION_EVERY = 100  # jobs between collections that also scan the frozen objects (Worker._collect)
MAX_RETRY_AFTER_S = 3600  # Retry-After never asks a client to wait longer than this
JOB_TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"  # A1111's shared.state.job_timestamp
T = TypeVar("T")  # what a job's work returns


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs; `retry_after` (seconds) estimates when a slot frees."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the queue is full ({queued} requests waiting); retry after {retry_after} s")
        self.queued = queued
        self.retry_after = retry_after


# ---- models -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model a server can run: its listed name, where it is, and its hashes once computed (A1111's fields)."""

    filename: str  # the name it is listed and chosen by: "v1-5-pruned-emaonly.safetensors", a folder's name
    path: Path
    model_name: str  # A1111's model_name: the file name without extension, or the folder name
    short_hash: str | None = None  # A1111's AutoV2 hash (png_info.model_hash)
    sha256: str | None = None

    @property
    def title(self) -> str:
        """A1111's title: "name.safetensors [0123456789]" once hashed, else the name."""
        return f"{self.filename} [{self.short_hash}]" if self.short_hash else self.filename


class ModelCatalog:
    """The models a server may load: `initial` (the --model) and the models directly inside `models_dir`.

    Hashes are computed when a model is loaded (as A1111 does) and kept while the file's size and time stay."""

    def __init__(self, models_dir: Path | None, initial: Path | None = None):
        if models_dir is not None and not models_dir.is_dir():
            raise ValueError(f"--models-dir {models_dir} is not a folder")
        self.models_dir = models_dir
        self.initial = initial
        self._hashes: dict[tuple[Path, int, int], tuple[str | None, str | None]] = {}
        self._lock = threading.Lock()

    def entries(self) -> list[ModelEntry]:
        """Every listed model, the initial one first; a name that appears twice keeps its first entry."""
        paths = [self.initial] if self.initial is not None else []
        if self.models_dir is not None:
            for path in sorted(self.models_dir.iterdir()):
                is_file_model = path.is_file() and path.suffix.lower() in MODEL_SUFFIXES
                if not path.name.startswith(".") and (is_file_model or (path / DIFFUSERS_INDEX).is_file()):
                    paths.append(path)
        entries: dict[str, ModelEntry] = {}
        for path in paths:
            if path.name not in entries and path.resolve() not in {e.path.resolve() for e in entries.values()}:
                entries[path.name] = self._with_known_hashes(path)
        return list(entries.values())

    def find(self, name: str) -> ModelEntry:
        """The listed model called `name` (its title, file name, model name or hash); ValueError listing them."""
        entries = self.entries()
        for entry in entries:
            if name in (entry.title, entry.filename, entry.model_name, entry.short_hash, entry.sha256):
                return entry
        listed = ", ".join(repr(e.title) for e in entries)
        raise ValueError(f"no listed model is called {name!r}; models are chosen by their listed name, never by a "
                         f"path (listed: {listed})")

    def identify(self, entry: ModelEntry) -> ModelEntry:
        """`entry` with its hashes, computing them if needed (reads the whole file: seconds for a checkpoint)."""
        key = _file_key(entry.path)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            if entry.path.is_file():
                sha256 = sha256_file(entry.path)
                known = (sha256[:SHORT_HASH_LENGTH], sha256)
            else:  # a diffusers folder: A1111's hash of its U-Net weights where there is one file
                known = (model_identity(entry.path)[1], None)
            with self._lock:
                self._hashes[key] = known
        return replace(entry, short_hash=known[0], sha256=known[1])

    def _with_known_hashes(self, path: Path) -> ModelEntry:
        model_name = path.stem if path.is_file() else path.name
        with self._lock:
            short_hash, sha256 = self._hashes.get(_file_key(path), (None, None))
        return ModelEntry(path.name, path, model_name, short_hash, sha256)


def _file_key(path: Path) -> tuple[Path, int, int]:
    status = path.stat()
    return path.resolve(), status.st_size, status.st_mtime_ns


# ---- jobs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationTask:
    """One HTTP request, resolved and checked against the loaded model: `request` for each batch (seed: the first
    image's, never None), run n_iter times.

    Batch k starts at seed + k·batch_size (A1111's numbering), so image i of the request has seed + i."""

    request: GenerationRequest
    n_iter: int = 1
    refiner: ModelEntry | None = None  # a listed model that takes over the run (A1111's refiner_checkpoint)


@dataclass(frozen=True)
class GenerationOutcome:
    """What a generation job made: PNG files (with their parameters chunk), their seeds and infotexts."""

    images: list[bytes]
    seeds: list[int]
    infotexts: list[str]
    interrupted: bool  # stopped early: holds only the batches finished before
    model: ModelEntry
    job_timestamp: str
    parameters: dict[str, str] = field(default_factory=dict)  # the pipeline's additions, e.g. "Lora hashes"
    subseeds: list[int] = field(default_factory=list)  # each image's variation seed (with a variation strength)


@dataclass(eq=False)
class Job(Generic[T]):
    """One piece of work for the worker thread, `work(job)`, and the future its result (a T) arrives in."""

    work: Callable[[Job[T]], T]
    future: Future[T] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    timestamp: str = field(default_factory=lambda: time.strftime(JOB_TIMESTAMP_FORMAT))


@dataclass
class _Progress:
    """The running job's place, for /sdapi/v1/progress (guarded by the worker's lock)."""

    job: Job | None = None
    started: float = 0.0
    job_no: int = 0
    job_count: int = 0
    step: int = 0
    steps: int = 0
    preview: str | None = None  # base64 PNG of the last decoded x0 prediction
    preview_step: int = -1
    textinfo: str | None = None


def batch_seeds(request: GenerationRequest, batch: int) -> GenerationRequest:
    """The request of batch `batch` of an n_iter run, numbered as A1111 numbers its images
    (modules/processing.py): image i of the run has seed + i, or, with a variation strength, the same seed and
    variation seed subseed + i."""
    step = batch * request.num_images
    if request.subseed_strength:
        return request.replace(subseed=(request.subseed + step) % (MAX_SEED + 1))
    return request.replace(seed=(request.seed + step) % (MAX_SEED + 1))


class Worker:
    """Owns a Pipeline and runs queued jobs on one thread, in order (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, model: ModelEntry, catalog: ModelCatalog,
                 load: Callable[[Path], Pipeline], *, queue_size: int = 8, preview_every: int = 1,
                 threads: int | None = None):
        self.pipeline = pipeline
        self.model = model
        self.catalog = catalog
        self.queue_size = check_int("queue_size", queue_size, low=0)
        self.preview_every = check_int("preview_every", preview_every, low=1, note=" (steps)")
        self.threads = check_optional_int("threads", threads, low=1, none_means="torch's default")
        self._load = load
        self._refiner: tuple[Path, Pipeline] | None = None  # the last refiner loaded, kept for the next request
        self._pending: deque[Job] = deque()
        self._condition = threading.Condition()
        self._progress = _Progress()
        self._preview_wanted = False
        self._stopping = False
        self._durations: deque[float] = deque(maxlen=DURATION_WINDOW)
        self._jobs_since_full_collection = 0
        self.counts = {"completed": 0, "interrupted": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._thread = threading.Thread(target=self._loop, name="kedavra-worker", daemon=True)

    # -- the handlers' side --

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, interrupt the running one, and wait for the thread."""
        with self._condition:
            self._stopping = True
            while self._pending:
                self._pending.popleft().future.cancel()
            if self._progress.job is not None:
                self._progress.job.cancelled.set()
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit_generation(self, task: GenerationTask) -> Job[GenerationOutcome]:
        """Queue `task`; QueueFull when `queue_size` jobs already wait."""
        return self._submit(Job(functools.partial(self._generate, task)))

    def submit_work(self, work: Callable[[Job], T]) -> Job[T]:
        """Queue other work for the worker thread (the Extras tab's upscaling), in turn with the generations, so
        that two heavy jobs never share the CPU; QueueFull as above."""
        return self._submit(Job(work))

    def submit_model_switch(self, entry: ModelEntry) -> Job[ModelEntry]:
        """Queue a switch to the listed model `entry` (its result: `entry` with its hashes); QueueFull as above."""
        return self._submit(Job(lambda job: self._switch_model(entry)))

    def cancel(self, job: Job) -> None:
        """Drop `job` if it waits; stop it after its current step if it runs; nothing if it has finished."""
        with self._condition:
            if job in self._pending:
                self._pending.remove(job)
                job.future.cancel()
                self.counts["cancelled"] += 1
            elif self._progress.job is job:
                job.cancelled.set()

    def interrupt(self) -> bool:
        """A1111's /interrupt: stop the running job after its current step; False when none runs."""
        with self._condition:
            if self._progress.job is None:
                return False
            self._progress.job.cancelled.set()
            return True

    def queued(self) -> int:
        with self._condition:
            return len(self._pending)

    def progress(self, want_image: bool = True) -> ProgressResponse:
        """A1111's progress: the share of the running job done, time left relative to time spent, its state."""
        with self._condition:
            p = self._progress
            self._preview_wanted = want_image and p.job is not None
            queued = len(self._pending)
            if p.job is None:
                return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState(queued=queued),
                                        textinfo="Waiting" if queued else None)
            done = p.job_no / p.job_count + (p.step / p.steps) / p.job_count if p.steps else p.job_no / p.job_count
            elapsed = time.monotonic() - p.started
            eta = elapsed / done - elapsed if done > 0 else 0.0  # A1111's eta_relative
            state = ProgressState(interrupted=p.job.cancelled.is_set(), job=f"job {p.job_no + 1}/{p.job_count}",
                                  job_count=p.job_count, job_timestamp=p.job.timestamp, job_no=p.job_no,
                                  sampling_step=p.step, sampling_steps=p.steps, queued=queued)
            return ProgressResponse(progress=done, eta_relative=eta, state=state,
                                    current_image=p.preview if want_image else None, textinfo=p.textinfo)

    def _submit(self, job: Job[T]) -> Job[T]:
        with self._condition:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.queue_size and (self._progress.job is not None or self._pending):
                self.counts["rejected"] += 1
                raise QueueFull(len(self._pending), self._retry_after())
            self._pending.append(job)
            self._condition.notify()
        return job

    def _retry_after(self) -> int:
        typical = statistics.fmean(self._durations) if self._durations else 1.0
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(typical * (len(self._pending) + 1))))

    # -- the worker thread's side --

    def _loop(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while True:
            with self._condition:
                while not self._pending and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._progress = _Progress(job=job, started=time.monotonic(), job_count=1)
                self._preview_wanted = False
            started = time.monotonic()
            if job.future.set_running_or_notify_cancel():
                self._run(job)
                self._collect()
            with self._condition:
                self._progress = _Progress()
                self._durations.append(time.monotonic() - started)

    def _collect(self) -> None:
        """Memory back near its baseline after a job (release_memory), then everything still alive frozen out of
        the collector (gc.freeze): the next job's collection scans only what that job made (measured: 0.12 s per
        collection with the embedded model loaded, 3 µs frozen). Every FULL_COLLECTION_EVERY jobs, and before a
        model is dropped, the frozen objects are handed back (gc.unfreeze) so that cyclic garbage among them goes."""
        self._jobs_since_full_collection += 1
        if self._jobs_since_full_collection >= FULL_COLLECTION_EVERY:
            gc.unfreeze()
            self._jobs_since_full_collection = 0
        release_memory(self.pipeline.device if self.pipeline is not None else None)
        gc.freeze()

    def _run(self, job: Job) -> None:
        """Run `job`, its result or exception into its future; the job counts itself as completed or
        interrupted, a failure is counted here."""
        try:
            result = job.work(job)
        except Exception as error:  # handed to the request's handler, which answers it; the worker goes on
            self._count("failed")
            job.future.set_exception(error)
            return
        job.future.set_result(result)

    def _count(self, outcome: str) -> None:
        with self._condition:
            self.counts[outcome] += 1

    def _switch_model(self, entry: ModelEntry) -> ModelEntry:
        with self._condition:
            self._progress.textinfo = f"Loading {entry.filename}"
        if entry.path.resolve() != self.model.path.resolve():
            gc.unfreeze()  # the old model's objects collectable again (_collect)
            self.pipeline = None  # let the old weights go before the new ones load
            try:
                self.pipeline = self._load(entry.path)
                self.model = self.catalog.identify(entry)
            except Exception:
                self.pipeline = self._load(self.model.path)  # back to the model that was running
                raise
        self._count("completed")
        return self.model

    def _generate(self, task: GenerationTask, job: Job[GenerationOutcome]) -> GenerationOutcome:
        request, pipe, model = task.request, self.pipeline, self.model
        if pipe is None:
            raise RuntimeError(f"no model is loaded: loading one failed, and so did reloading {model.filename}")
        refiner, refiner_text = self._refiner_pipeline(task.refiner), None
        if task.refiner is not None:
            entry = self.catalog.identify(task.refiner)
            refiner_text = f"{entry.model_name} [{entry.short_hash}]" if entry.short_hash else entry.model_name
        passes = 2 if request.hires is not None else 1  # A1111 counts the hires pass as a job of its own
        with self._condition:
            self._progress.job_count = task.n_iter * passes
        images, seeds, subseeds, infotexts, interrupted, parameters = [], [], [], [], False, {}
        for batch in range(task.n_iter):
            if job.cancelled.is_set():
                interrupted = True
                break
            with self._condition:
                self._progress.job_no, self._progress.step, self._progress.steps = batch * passes, 0, 0
            batch_request = batch_seeds(request, batch)
            try:
                with interruptible(job, pipe, refiner):
                    result = pipe.generate(batch_request, callback=self._step_callback(job, pipe), refiner=refiner)
            except Interrupted:
                interrupted = True
                break
            parameters = result.parameters
            for index, (image, image_seed) in enumerate(zip(result.images, result.seeds, strict=True)):
                params = request_parameters(batch_request, index, image_seed, request.width, request.height,
                                            model.model_name, model.short_hash, refiner_text, parameters)
                images.append(encode_png(image, params))
                seeds.append(image_seed)
                infotexts.append(format_parameters(params))
            subseeds += batch_request.image_seeds(batch_request.seed)[1] or []
        self._count("interrupted" if interrupted else "completed")
        return GenerationOutcome(images, seeds, infotexts, interrupted, model, job.timestamp, parameters, subseeds)

    def _refiner_pipeline(self, entry: ModelEntry | None) -> Pipeline | None:
        """The refiner's pipeline, loaded once and kept while requests keep asking for the same one."""
        if entry is None:
            return None
        if self._refiner is None or self._refiner[0] != entry.path.resolve():
            with self._condition:
                self._progress.textinfo = f"Loading refiner {entry.filename}"
            gc.unfreeze()  # the old refiner's objects collectable again (_collect)
            self._refiner = None  # let the old refiner's weights go first
            self._refiner = (entry.path.resolve(), self._load(entry.path))
        return self._refiner[1]

    def _step_callback(self, job: Job, pipe: Pipeline) -> StepCallback:
        """The pipeline's step callback for `job`: the one place that reads its `StepRecord`."""

        def on_step(step: StepRecord) -> None:
            if step.index == 0:
                with self._condition:
                    if self._progress.step > 0:  # the sampler starts again within a batch: the hires pass
                        self._progress.job_no += 1
                        self._progress.preview, self._progress.preview_step = None, -1
            self._record_step(job, pipe, step.index + 1, step.count, step.x0)

        return on_step

    def _record_step(self, job: Job, pipe: Pipeline, done: int, steps: int, x0_hat: torch.Tensor) -> None:
        """Step `done` of `steps` has run: stop if `job` was cancelled, else record it and, when someone polls for
        it, decode x0_hat as the live preview (at most every `preview_every` steps)."""
        if job.cancelled.is_set():
            raise Interrupted
        with self._condition:
            p = self._progress
            p.step, p.steps, p.textinfo = done, steps, f"Sampling step {done}/{steps}"
            wanted = self._preview_wanted and (p.preview is None or done - p.preview_step >= self.preview_every)
        if wanted and done < steps:  # the last step's prediction is the image itself, sent in the response
            preview = preview_png(pipe, x0_hat)
            with self._condition:
                self._progress.preview, self._progress.preview_step = preview, done
                self._preview_wanted = False


def preview_png(pipe: Pipeline, x0_hat: torch.Tensor) -> str:
    """The first image of a step's x̂_0 latents (B, C, h, w), decoded by the pipeline's preview decoder (TAESD
    when `kedavra serve --taesd` loaded one, else the VAE): a base64 PNG without parameters."""
    return base64.b64encode(encode_png(pipe.preview(x0_hat[:1])[0], None)).decode("ascii")

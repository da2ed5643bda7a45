"""The generation queue: one worker thread owns the pipeline and runs one job at a time.

    HTTP handlers --submit--> bounded queue --> worker thread --> Pipeline --> PNG bytes --> the handler's future

Requests wait in a FIFO of at most `queue_size` jobs behind the running one; a request that finds it full is
refused at once (`QueueFull`, answered 503 with Retry-After), never parked without bound. A job leaves the queue
when its client goes away (`cancel`); a running job stops after its current sampler step when cancelled or
interrupted, through the step callback. Every image's randomness comes from its own seeded generator inside the
pipeline, so a request's images do not depend on what ran before it or beside it.

The models a server may switch between are those a `ModelCatalog` lists: the model it started with and the
files and diffusers folders directly inside --models-dir. A request names one of them by its listed name; no
path from a request is ever opened.
"""

from __future__ import annotations

import base64
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from kedavra.commands.settings import Settings, model_identity
from kedavra.formats.png_info import SHORT_HASH_LENGTH, encode_png, format_parameters, sha256_file
from kedavra.pipeline.pipeline import MAX_SEED, Pipeline, from_pil, to_pil
from kedavra.serving.schemas import ProgressResponse, ProgressState

MODEL_SUFFIXES = (".safetensors", ".ckpt")  # single-file checkpoints kedavra.checkpoint reads
DIFFUSERS_INDEX = "model_index.json"  # what makes a folder a diffusers model
DURATION_WINDOW = 20  # recent job durations averaged for Retry-After
MAX_RETRY_AFTER_S = 3600  # Retry-After never asks a client to wait longer than this
JOB_TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"  # A1111's shared.state.job_timestamp


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs; `retry_after` (seconds) estimates when a slot frees."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the queue is full ({queued} requests waiting); retry after {retry_after} s")
        self.queued = queued
        self.retry_after = retry_after


class Interrupted(Exception):
    """Raised from the step callback to stop a running job."""


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
    """One request, resolved and checked: `settings` for each batch (seed: the first image's), run n_iter times.

    Batch k starts at seed + k·batch_size (A1111's numbering), so image i of the request has seed + i."""

    settings: Settings
    n_iter: int = 1
    init_images: tuple[Image.Image, ...] = ()  # one, or one per batch image, already width x height
    mask: Image.Image | None = None


@dataclass(frozen=True)
class GenerationOutcome:
    """What a generation job made: PNG files (with their parameters chunk), their seeds and infotexts."""

    images: list[bytes]
    seeds: list[int]
    infotexts: list[str]
    interrupted: bool  # stopped early: holds only the batches finished before
    model: ModelEntry
    job_timestamp: str


@dataclass(eq=False)
class Job:
    """A queued task (a GenerationTask, or a ModelEntry to switch to) and the future its result arrives in."""

    task: GenerationTask | ModelEntry
    future: Future = field(default_factory=Future)
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


class Worker:
    """Owns a Pipeline and runs queued jobs on one thread, in order (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, model: ModelEntry, catalog: ModelCatalog,
                 load: Callable[[Path], Pipeline], *, queue_size: int = 8, preview_every: int = 1,
                 threads: int | None = None):
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an integer >= 0, got {queue_size!r}")
        if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 1:
            raise ValueError(f"preview_every must be an integer >= 1 (steps), got {preview_every!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None (torch's default), got {threads!r}")
        self.pipeline = pipeline
        self.model = model
        self.catalog = catalog
        self.queue_size = queue_size
        self.preview_every = preview_every
        self.threads = threads
        self._load = load
        self._pending: deque[Job] = deque()
        self._condition = threading.Condition()
        self._progress = _Progress()
        self._preview_wanted = False
        self._stopping = False
        self._durations: deque[float] = deque(maxlen=DURATION_WINDOW)
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

    def submit(self, task: GenerationTask | ModelEntry) -> Job:
        """Queue `task`; QueueFull when `queue_size` jobs already wait."""
        job = Job(task)
        with self._condition:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.queue_size and (self._progress.job is not None or self._pending):
                self.counts["rejected"] += 1
                raise QueueFull(len(self._pending), self._retry_after())
            self._pending.append(job)
            self._condition.notify()
        return job

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

    # -- the worker thread's side --

    def _retry_after(self) -> int:
        typical = statistics.fmean(self._durations) if self._durations else 1.0
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(typical * (len(self._pending) + 1))))

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
            with self._condition:
                self._progress = _Progress()
                self._durations.append(time.monotonic() - started)

    def _run(self, job: Job) -> None:
        try:
            if isinstance(job.task, ModelEntry):
                result = self._switch_model(job.task)
            else:
                result = self._generate(job)
        except Exception as error:  # handed to the request's handler, which answers it; the worker goes on
            with self._condition:
                self.counts["failed"] += 1
            job.future.set_exception(error)
            return
        with self._condition:
            interrupted = isinstance(result, GenerationOutcome) and result.interrupted
            self.counts["interrupted" if interrupted else "completed"] += 1
        job.future.set_result(result)

    def _switch_model(self, entry: ModelEntry) -> ModelEntry:
        with self._condition:
            self._progress.textinfo = f"Loading {entry.filename}"
        if entry.path.resolve() == self.model.path.resolve():
            return self.model
        self.pipeline = None  # let the old weights go before the new ones load
        try:
            self.pipeline = self._load(entry.path)
            self.model = self.catalog.identify(entry)
        except Exception:
            self.pipeline = self._load(self.model.path)  # back to the model that was running
            raise
        return self.model

    def _generate(self, job: Job) -> GenerationOutcome:
        task: GenerationTask = job.task
        settings, pipe, model = task.settings, self.pipeline, self.model
        if pipe is None:
            raise RuntimeError(f"no model is loaded: loading one failed, and so did reloading {model.filename}")
        init = _init_batch(task.init_images)
        with self._condition:
            self._progress.job_count = task.n_iter
        images, seeds, infotexts, interrupted = [], [], [], False
        for batch in range(task.n_iter):
            if job.cancelled.is_set():
                interrupted = True
                break
            with self._condition:
                self._progress.job_no, self._progress.step, self._progress.steps = batch, 0, 0
            seed = (settings.seed + batch * settings.num_images) % (MAX_SEED + 1)
            try:
                result = pipe(settings.prompt, settings.negative_prompt, steps=settings.steps,
                              sampler=settings.sampler.name, karras=settings.karras,
                              guidance_scale=settings.cfg_scale, eta=settings.eta, seed=seed, width=settings.width,
                              height=settings.height, num_images=settings.num_images, init_image=init,
                              strength=settings.strength, mask=task.mask, callback=self._step_callback(job, pipe))
            except Interrupted:
                interrupted = True
                break
            for image, image_seed in zip(result.images, result.seeds, strict=True):
                params = settings.parameters(image_seed, settings.width, settings.height, model.model_name,
                                             model.short_hash)
                images.append(encode_png(image, params))
                seeds.append(image_seed)
                infotexts.append(format_parameters(params))
        return GenerationOutcome(images, seeds, infotexts, interrupted, model, job.timestamp)

    def _step_callback(self, job: Job, pipe: Pipeline) -> Callable:
        def on_step(i: int, n: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if job.cancelled.is_set():
                raise Interrupted
            with self._condition:
                p = self._progress
                p.step, p.steps, p.textinfo = i + 1, n, f"Sampling step {i + 1}/{n}"
                wanted = self._preview_wanted and (p.preview is None or i + 1 - p.preview_step >= self.preview_every)
            if wanted and i + 1 < n:  # the last step's prediction is the image itself, sent in the response
                preview = base64.b64encode(encode_png(to_pil(pipe.decode(x0[:1]))[0], None)).decode("ascii")
                with self._condition:
                    self._progress.preview, self._progress.preview_step = preview, i + 1
                    self._preview_wanted = False

        return on_step


def _init_batch(images: tuple[Image.Image, ...]) -> Image.Image | torch.Tensor | None:
    """The pipeline's init_image: none, one PIL image, or (B, 3, H, W) in [-1, 1] for one image per batch slot."""
    if not images:
        return None
    if len(images) == 1:
        return images[0]
    return torch.cat([from_pil(image) for image in images])  # (B, 3, H, W)

"""The training loop: `train(config)` runs a stage (or both), resumes exactly, and runs under torchrun.

The Trainer drives a Stage (kedavra.training.stages), whichever it is: the stage says what trains, what a batch
becomes and what its objective is; the loop owns the steps, the optimizer, the EMA, checkpoints and logging.
One optimizer step on the global batch of B = batch_size items:
  1. the items at the sampler's position (kedavra.training.batches), and every random number of the step drawn
     for all B rows from the run's one generator, in the stage's fixed order (Stage.draws: vae stage, the
     posterior's ε; unet stage, t ~ U{0..T-1}, the noise ε, the caption-dropout coins, the posterior's ε)
  2. the batch split into `accumulation` micro-batches, each split over the processes; each process takes its
     rows of the items and of the draws, runs them through the stage's objective (per-sample losses) and
     back-propagates mean-loss / accumulation (DDP averages over ranks)
  3. the loss summed over the processes; the gradient norm, clipped; a non-finite loss or norm skips the step
     (no optimizer or EMA update, counted, logged; `max_nonfinite` in a row stop the run with an error)
  4. learning rate for the step (kedavra.training.optim), AdamW, EMA update
So the result depends on the global batch, not on how it is split (up to float rounding), and a run resumed
from a checkpoint continues bitwise: weights, optimizer, EMA, the generator, the data position and the forked
global RNG (which only dropout would use) are all restored.

A LoRA run (TrainConfig.lora_rank) is the same loop over the LoRA layers' parameters (the stage injects them and
freezes the rest): its checkpoints and export are LoRA files (kedavra.training.lora), and a resume reads the base
model from `init` again, refusing one whose weights changed.

A sharded run (TrainConfig.fsdp, kedavra.training.sharding) is the same loop over FSDP2's sharded parameters in
place of DDP's replicated ones: step 2 reduce-scatters each micro-step's gradients, step 3's norm is taken over the
shards, AdamW and the EMA update each rank's slice; its checkpoints are sharded (every rank writes its slice) and
its samples and export are of the full weights, gathered on rank 0. A resume builds the starting model again and
reads the shards into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kedavra.adapters.merge import LoraMerger, LoraUse
from kedavra.checkpoint import save_model
from kedavra.networks.model import StableDiffusion
from kedavra.training import checkpointing, lora, report, sharding
from kedavra.training.batches import DataPosition, TrainingData, open_dataset
from kedavra.training.checkpointing import EXPORT_FILE
from kedavra.training.config import TrainConfig, stream_seed
from kedavra.training.distributed import Distributed, close_distributed, init_distributed
from kedavra.training.ema import EMA
from kedavra.training.models import build_model, model_from_state, resolved_config
from kedavra.training.optim import learning_rate, make_optimizer, set_learning_rate
from kedavra.training.precision import attention_kernels, autocast, resolve_precision
from kedavra.training.stages import make_stage, stage_configs

RUN_CONFIG_FILE = checkpointing.CONFIG_FILE  # OUT/train_config.json, beside the checkpoints


class NonFiniteLossError(ValueError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What a stage's run did in this call: the steps it took and their global mean losses (NaN for skipped
    steps), the final step reached, where things were written."""

    run_dir: Path
    step: int
    losses: list[float]
    skipped: int
    finished: bool  # reached config.steps (False: stopped early by stop_after or Ctrl-C)
    checkpoint: Path | None
    model_path: Path | None  # the exported EMA model (a LoRA run: its EMA LoRA, OUT/lora.safetensors), once finished
    seconds: float  # training time of this call, sampling and checkpoints excluded
    images_per_s: float


def train(config: TrainConfig, *, dataset=None, device: str | torch.device | None = None, resume: bool = True,
          stop_after: int | None = None, progress: bool = False) -> list[TrainResult]:
    """Run the stage(s) of `config`; one TrainResult per stage run.

    dataset: a map-style data set of {"image", "caption"} items (default: kedavra.data's `config.data`).
    device: "cpu", "cuda", ... (default: CUDA when present; under torchrun the rank's GPU).
    resume: continue from OUT_DIR/latest when it exists (its config must match, see checkpointing.check_same_run);
        False refuses to touch a folder that holds checkpoints.
    stop_after: stop (with a checkpoint) once this many steps are done: an interruption on purpose.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(config).__name__}")
    context = init_distributed(device)
    try:
        results = []
        for i, stage_config in enumerate(stage_configs(config)):
            trainer = Trainer(stage_config, context, dataset=dataset, resume=resume, progress=progress)
            if i == 0 and context.is_main:  # once the Trainer has accepted the folder (resume checks passed)
                _write_run_config(config)
            results.append(trainer.run(stop_after))
            if not results[-1].finished:
                break
        return results
    finally:
        close_distributed(context)


def _write_run_config(config: TrainConfig) -> None:
    """OUT/train_config.json: the config of the whole run, which `kedavra train --resume OUT` starts from."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_dict(), indent=1) + "\n"
    checkpointing.atomic_write(out / RUN_CONFIG_FILE, lambda partial: partial.write_text(text))


class Trainer:
    """One stage's run (`config.stage` is "vae" or "unet"); see the module docstring for a step."""

    def __init__(self, config: TrainConfig, context: Distributed, *, dataset=None, resume: bool = True,
                 progress: bool = False):
        self.config = config
        self.context = context
        self.device = context.device
        self.progress = progress
        self.run_dir = Path(config.out_dir)
        micro = context.world_size * config.accumulation
        if config.batch_size % micro:
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of accumulation x processes = "
                             f"{config.accumulation} x {context.world_size} = {micro}")
        self.micro_size = config.batch_size // micro
        if config.fsdp and not context.active:
            raise ValueError("fsdp=True (--fsdp) shards the model over the processes of a torchrun launch, and this "
                             "is one process (WORLD_SIZE 1): launch with torchrun --nproc-per-node N (N >= 2 in all), "
                             "or leave --fsdp out")
        checkpoint = self._find_checkpoint(resume)
        if checkpoint is not None and not checkpoint.lora and not checkpoint.sharded:
            model = model_from_state(checkpoint.model_config, checkpoint.model_state)
        else:  # a LoRA checkpoint holds no model (its base is the init model, read again), a sharded one only shards
            model = build_model(config)
        config = resolved_config(config, model.config)  # a fine-tune's image size: its model's
        # "auto" precision becomes what this device runs, so the checkpoints and metrics say what ran
        self.config = config = dataclasses.replace(config, precision=resolve_precision(config.precision, self.device))
        if checkpoint is not None:
            checkpointing.check_same_run(checkpoint.config, config, checkpoint.path)
        self.base_fingerprint = lora.weights_fingerprint(model) if config.lora_rank is not None else None
        data_source = dataset if dataset is not None else open_dataset(config.data, config.image_size, config.seed,
                                                                                 config.skip_bad)
        self.data = TrainingData(data_source, config.image_size, config.batch_size, config.seed)
        # a sharded run's model reaches the device once sharded: a rank's device never holds all the trained weights
        self.model: StableDiffusion = model if config.fsdp else model.to(self.device)
        self.stage = make_stage(config, self.model, self.data, self.device)
        self.lora = self.stage.lora  # a LoRA run's injected layers (None: the stage trains the weights themselves)
        self.stage.freeze_untrained()
        self.objective = self.stage.objective()
        if config.fsdp:
            trained = [getattr(self.model, part) for part in self.stage.trained_components]
            sharding.shard_objective(self.objective, trained, context)
            self.model.to(self.device)  # the frozen parts, whole
            self.network = self.objective
        elif context.active:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.objective, device_ids=device_ids)
        else:
            self.network = self.objective
        self.params = self.stage.trained_parameters()  # after sharding, which replaces them by DTensors
        self.optimizer = make_optimizer(self.params.values(), config.lr, config.weight_decay, self.device)
        self.ema = EMA(self.params, config.ema_decay)
        if config.fsdp:
            self._report_sharding()
        self.generator = torch.Generator().manual_seed(stream_seed(config.seed, "draws"))
        self.global_rng = torch.Generator().manual_seed(stream_seed(config.seed, "global")).get_state()
        self.step = 0
        self.position = DataPosition()
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.train_seconds = 0.0
        if checkpoint is not None:
            self._restore(checkpoint)
        self.resumed_from = checkpoint.path if checkpoint is not None else None
        self.started_at = time.time()
        self._snapshot_step, self._snapshot_models = None, None
        self.stage.prepare(progress=progress and context.is_main)

    # ---- setup -----------------------------------------------------------------------------------------

    def _report_sharding(self) -> None:
        """One line (rank 0, to stderr): the trained state's bytes per process under FSDP2, and whole (what DDP
        holds on every process); kedavra.training.sharding.trained_state_bytes."""
        local = sharding.trained_state_bytes(self.params.values(), self.ema.state_dict().values())
        totals = self.context.sum(torch.tensor([local], dtype=torch.float64))
        if self.context.is_main:
            print(f"kedavra train: FSDP2 over {self.context.world_size} processes: the trained state (weights, "
                  f"gradients, AdamW's moments, EMA) takes {local / 2**20:.1f} MiB on rank 0, "
                  f"{float(totals[0]) / 2**20:.1f} MiB whole (what DDP would hold on every process)", file=sys.stderr)

    def _find_checkpoint(self, resume: bool):
        found = checkpointing.find_checkpoint(self.run_dir) if self.run_dir.exists() else None
        if found is None:
            return None
        if not resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints ({found.name}); resume it or choose another "
                             "output folder")
        # checked against the config once it is resolved; a damaged latest falls back to the newest intact one
        return checkpointing.load_intact_checkpoint(found, notify=lambda line: print(line, file=sys.stderr))

    def _restore(self, checkpoint) -> None:
        state = checkpoint.state
        if state["data_size"] != self.data.size:
            raise ValueError(f"cannot resume {checkpoint.path}: its data set had {state['data_size']} items, this one "
                             f"has {self.data.size}; the run would not continue on the same data order")
        if checkpoint.sharded:
            sharding.load_sharded(checkpoint.path / checkpointing.SHARDS_DIR, self.model, self.optimizer, self.ema,
                                  with_optimizer=state["optimizer_in_shards"])
            self.ema.updates = state["ema_updates"]
        else:
            self._restore_weights(checkpoint)
        self.generator.set_state(state["generator"])
        self.global_rng = state["global_rng"]
        self.step = state["step"]
        self.position = DataPosition(state["epoch"], state["batch"])
        self.skipped = state["skipped"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.train_seconds = state["train_seconds"]

    def _restore_weights(self, checkpoint) -> None:
        """The optimizer's and the EMA's state from a full (or LoRA) checkpoint, and a LoRA run's layers; the model's
        weights are already the checkpoint's (a full run) or the base model's (a LoRA run)."""
        state = checkpoint.state
        ema_state = checkpoint.ema_state
        if self.lora is not None:  # the checkpoint's LoRA files, in kohya's names, on the same base model
            if state.get("base_fingerprint") != self.base_fingerprint:
                stored = str(state.get("base_fingerprint"))[:12]
                raise ValueError(f"cannot resume {checkpoint.path}: init {self.config.init!r} is not the base model "
                                 "the checkpoint's LoRA was trained on (its weights changed: SHA-256 "
                                 f"{self.base_fingerprint[:12]}..., the checkpoint's {stored}...)")
            self.lora.load_kohya(checkpoint.model_state, str(checkpoint.path / checkpointing.LORA_FILE))
            ema_state = self.lora.from_kohya(ema_state, str(checkpoint.path / checkpointing.LORA_EMA_FILE))
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict({k: v.to(self.device) for k, v in ema_state.items() if k in self.params},
                                 state["ema_updates"])

    # ---- one step --------------------------------------------------------------------------------------

    def _micro_loss(self, indices: Tensor, draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """The objective's per-sample values, each (b,), for a micro-batch: its items and its rows of the draws."""
        inputs = self.stage.inputs(indices, draws)
        with autocast(self.config.precision, self.device):
            return self.network(**inputs)

    def _train_step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step; returns (global mean loss, other metrics). Skips the update if not finite."""
        config, context = self.config, self.context
        indices = self.data.indices(self.position)
        draws = self.stage.draws(config.batch_size, self.generator)
        names = ("loss", *self.stage.parts)
        sums = torch.zeros(len(names), dtype=torch.float64)  # each summed over this process's rows
        # DDP sums the micro-steps' gradients locally and all-reduces once; FSDP2 reduce-scatters every micro-step,
        # so that gradients stay sharded (kedavra.training.sharding)
        ddp = context.active and not config.fsdp
        for k in range(config.accumulation):
            start = (k * context.world_size + context.rank) * self.micro_size
            rows = slice(start, start + self.micro_size)
            last = k == config.accumulation - 1
            sync = self.network.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync, attention_kernels(config.precision, self.device):  # the forward's kernels, recomputed too
                values = self._micro_loss(indices[rows], {name: d[rows] for name, d in draws.items()})
                (values["loss"].mean() / config.accumulation).backward()
            sums += torch.stack([values[name].detach().sum() for name in names]).double().cpu()
        totals = context.sum(sums) / config.batch_size
        limit = config.grad_clip if config.grad_clip is not None else math.inf
        grad_norm = float(sharding.local_value(torch.nn.utils.clip_grad_norm_(list(self.params.values()), limit)))
        loss_value = float(totals[0])
        parts = {name: float(total) for name, total in zip(names[1:], totals[1:], strict=True)}
        metrics = {"lr": learning_rate(self.step, lr=config.lr, warmup_steps=config.warmup_steps,
                                       total_steps=config.steps, schedule=config.lr_schedule,
                                       min_lr_ratio=config.min_lr_ratio),
                   "grad_norm": grad_norm, **parts}
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            set_learning_rate(self.optimizer, metrics["lr"])
            self.optimizer.step()
            metrics["ema_decay"] = self.ema.update()
            self.consecutive_nonfinite = 0
        else:
            self.skipped += 1
            self.consecutive_nonfinite += 1
            loss_value = math.nan
        self.optimizer.zero_grad(set_to_none=True)
        self.position = self.position.advanced(self.data.batches_per_epoch)
        self.step += 1
        return loss_value, metrics

    # ---- the run ---------------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> TrainResult:
        config, context = self.config, self.context
        if context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_partials(self.run_dir)
            self.metrics = report.MetricsLog(self.run_dir, self.step if self.resumed_from else None)
        end = config.steps if stop_after is None else min(config.steps, stop_after)
        losses: list[float] = []
        seconds_at_start = self.train_seconds
        last_checkpoint = self.resumed_from
        interval = report.Interval(self.stage.parts, self.stage.log_parts)
        devices = [self.device] if self.device.type == "cuda" else []
        bar = tqdm(total=config.steps, initial=self.step, unit="step",
                   desc=f"train {self.stage.name} ({config.precision})",  # the precision "auto" resolved to
                   disable=not (self.progress and context.is_main), dynamic_ncols=True)
        with torch.random.fork_rng(devices=devices), _GracefulStop() as stop:
            torch.set_rng_state(self.global_rng)
            try:
                while self.step < end:
                    started = time.perf_counter()
                    loss, metrics = self._train_step()
                    elapsed = time.perf_counter() - started
                    self.train_seconds += elapsed
                    losses.append(loss)
                    interval.add(loss, metrics, elapsed, config.batch_size)
                    bar.update(1)
                    if self.consecutive_nonfinite >= config.max_nonfinite:
                        self._log(interval, bar)
                        last_checkpoint = self._save()
                        raise NonFiniteLossError(
                            f"stopped at step {self.step}: the loss or gradient was not finite for "
                            f"{self.consecutive_nonfinite} consecutive steps (steps "
                            f"{self.step - self.consecutive_nonfinite + 1}-{self.step}); the weights are untouched "
                            f"by them and saved in {last_checkpoint}. Lower lr, check the data, or try fp32")
                    if self.step % config.log_interval == 0 or self.step == end:
                        self._log(interval, bar)
                    if _due(self.step, config.sample_interval):
                        self._sample()
                    if _due(self.step, config.checkpoint_interval):
                        last_checkpoint = self._save()
                    if self.context.sum(torch.tensor([float(stop.requested)]))[0] > 0:
                        break
                self._log(interval, bar)  # the steps since the last line, when stopped early
            finally:
                bar.close()
            self.global_rng = torch.get_rng_state()
            finished = self.step >= config.steps
            if last_checkpoint is None or not str(last_checkpoint).endswith(checkpointing.step_dir_name(self.step)):
                last_checkpoint = self._save()
            model_path = None
            if finished:
                if losses and config.sample_interval > 0 and not _due(self.step, config.sample_interval):
                    self._sample()
                model_path = self._export()
        seconds = self.train_seconds - seconds_at_start
        images = len(losses) * config.batch_size
        return TrainResult(self.run_dir, self.step, losses, self.skipped, finished, last_checkpoint, model_path,
                           seconds, images / seconds if seconds > 0 else 0.0)

    def _log(self, interval: report.Interval, bar) -> None:
        """A metrics.jsonl line (rank 0) for the steps since the last one, and the progress bar's numbers."""
        row = interval.flush(self.step, self.position.epoch, self.skipped, self.train_seconds)
        if row is None or not self.context.is_main:
            return
        self.metrics.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4g}" if row["loss"] is not None else "nan",
                        img_s=f"{row['images_per_s']:.1f}", skipped=self.skipped)

    # ---- snapshots, samples, checkpoints -----------------------------------------------------------------

    def _snapshots(self) -> tuple[StableDiffusion, StableDiffusion] | None:
        """(trained, EMA) copies of the model on the CPU, made once per step and completed by the stage (the vae
        stage's measured latent scale). A LoRA run has one: a copy of the base model with the EMA LoRA merged into
        its weights (kedavra.adapters.merge, as `Pipeline.load_lora` merges the exported file), as both. A sharded
        run's are gathered from every rank's shards: every rank calls this, and the others get None."""
        if self._snapshot_step == self.step:
            return self._snapshot_models
        if self.lora is not None:
            model = model_from_state(self.model.config, self.lora.base_state_dict())
            LoraMerger(model).apply([LoraUse(self.lora.lora_file(self.ema.state_dict()))])
            self._snapshot_step, self._snapshot_models = self.step, (model, model)
            return self._snapshot_models
        state, ema_state = self.model.state_dict(), self.ema.state_dict()
        if self.config.fsdp:
            state, ema_state = sharding.gather_full(state, self.context), sharding.gather_full(ema_state, self.context)
            if not self.context.is_main:
                self._snapshot_step, self._snapshot_models = self.step, None
                return None
        ema_state = {**state, **ema_state}
        models = []
        for weights in (state, ema_state):
            model = model_from_state(self.model.config, weights)
            self.stage.finish_snapshot(model)
            models.append(model)
        self._snapshot_step, self._snapshot_models = self.step, (models[0], models[1])
        return self._snapshot_models

    def _training_state(self) -> dict:
        """What a checkpoint keeps beside the weights (a sharded run's AdamW state is in its shards instead)."""
        state = {
            "step": self.step, "epoch": self.position.epoch, "batch": self.position.batch,
            "order_seed": self.config.seed, "data_size": self.data.size,
            "optimizer": None if self.config.fsdp else self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "global_rng": torch.get_rng_state(),
            "ema_updates": self.ema.updates, "skipped": self.skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite, "train_seconds": self.train_seconds,
            "world_size": self.context.world_size,
        }
        if self.lora is not None:
            state["base_fingerprint"] = self.base_fingerprint
        return state

    def _save(self) -> Path:
        """Write a checkpoint (rank 0) and the loss plot; every rank waits for it. A LoRA run's holds its LoRA
        files (trained and EMA), never the model; a sharded run's, the shards every rank writes."""
        path = self.run_dir / checkpointing.CHECKPOINTS_DIR / checkpointing.step_dir_name(self.step)
        state = self._training_state()  # before the snapshots, which must not change it
        if self.config.fsdp:
            shards = checkpointing.shard_folder(self.run_dir, self.step)
            state["optimizer_in_shards"] = self._save_shards(shards)
        if self.context.is_main:
            if self.config.fsdp:
                files = {checkpointing.SHARDS_DIR: lambda target: os.replace(shards, target)}
            elif self.lora is not None:
                files = {checkpointing.LORA_FILE: lambda file: self._write_lora(file, None, "trained"),
                         checkpointing.LORA_EMA_FILE: lambda file: self._write_lora(file, self.ema.state_dict(), "EMA")}
            else:
                with _own_rng():
                    files = checkpointing.model_files(*self._snapshots())
            path = checkpointing.save_checkpoint(self.run_dir, self.step, files, state, self.config,
                                                 self.config.keep_checkpoints)
            report.plot_loss(self.run_dir / report.METRICS_FILE, self.run_dir / report.LOSS_PLOT_FILE,
                             f"{self.stage.name} stage, {self.config.model_name}, {self.config.data}")
        self.context.barrier()
        return path

    def _save_shards(self, folder: Path) -> bool:
        """Every rank's slice of the model, AdamW and the EMA into `folder` (emptied first); returns whether AdamW's
        state is among them (kedavra.training.sharding.save_sharded)."""
        if self.context.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
        self.context.barrier()
        return sharding.save_sharded(folder, self.model, self.optimizer, self.ema)

    def _write_lora(self, path: Path, values: dict[str, Tensor] | None, weights: str) -> Path:
        """The LoRA (`values`: EMA shadows, or None for the trained weights) as a kohya file with the run's
        metadata (kedavra.training.lora)."""
        if weights == "EMA":
            weights = f"EMA (decay {self.config.ema_decay}, {self.ema.updates} updates)"
        metadata = lora.lora_metadata(
            self.config, self.model.config, step=self.step, epoch=self.position.epoch, data_size=self.data.size,
            batches_per_epoch=self.data.batches_per_epoch, world_size=self.context.world_size,
            started_at=self.started_at, weights=weights)
        return lora.write_lora(path, self.lora, values, metadata)

    def _sample(self) -> None:
        """The stage's sample grid of the EMA weights (vae stage: reconstructions) in OUT/samples (rank 0)."""
        with _own_rng():
            snapshots = self._snapshots() if self.context.is_main or self.config.fsdp else None
            if self.context.is_main:
                folder = self.run_dir / report.SAMPLES_DIR
                folder.mkdir(exist_ok=True)
                self.stage.sample(snapshots[1], folder / f"step_{self.step:08d}.png")
        self.context.barrier()

    def _export(self) -> Path:
        """The EMA model as OUT/model.safetensors (written atomically), ready for `kedavra generate`; a LoRA run's
        EMA LoRA as OUT/lora.safetensors, for `kedavra generate --lora`, A1111, ComfyUI or diffusers."""
        if self.lora is not None:
            path = self.run_dir / checkpointing.LORA_FILE
            if self.context.is_main:
                self._write_lora(path, self.ema.state_dict(), "EMA")
        else:
            path = self.run_dir / EXPORT_FILE
            with _own_rng():
                snapshots = self._snapshots() if self.context.is_main or self.config.fsdp else None
            if self.context.is_main:
                checkpointing.atomic_write(path, lambda partial: save_model(snapshots[1], partial))
        self.context.barrier()
        return path


def _own_rng():
    """Snapshots, samples and exports run on a fork of the global RNG: whatever they draw from it (nothing, as
    written) cannot shift the training run's random stream."""
    return torch.random.fork_rng(devices=[])


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


class _GracefulStop:
    """While active, the first Ctrl-C (SIGINT) asks the loop to stop after the current step, with a checkpoint;
    a second one interrupts at once. Outside the main thread it does nothing."""

    def __enter__(self):
        self.requested = False
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

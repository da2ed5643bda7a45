"""Checkpoints of a run, written so that a crash at any moment leaves the latest one whole.

Layout of a run folder:
    OUT/checkpoints/step_00001000/   one checkpoint:
        model.safetensors              the trained weights (kedavra format: load_model reads it, config inside)
        ema.safetensors                the EMA weights, the same format (what sampling and export use)
        training_state.pt              optimizer, generators, data position, EMA count, counters
        train_config.json              the TrainConfig of the run
    OUT/latest -> checkpoints/step_00001000   a symbolic link to the newest complete checkpoint
    OUT/model.safetensors              the finished run's EMA model, for `kedavra generate --model`

A LoRA run's checkpoints hold the LoRA and the training state only, never a copy of the model (a resume reads the
base model from the run's `init` again, and checks it is the same weights):
    OUT/checkpoints/step_00001000/   lora.safetensors, lora_ema.safetensors (kohya format: A1111, ComfyUI,
                                     diffusers and kedavra read them), training_state.pt, train_config.json
    OUT/lora.safetensors               the finished run's EMA LoRA

A sharded run's checkpoints (TrainConfig.fsdp, kedavra.training.sharding) hold no full weights, only the shards:
    OUT/checkpoints/step_00001000/   shards/ (torch.distributed.checkpoint: __R_0.distcp written by rank R, and
                                     .metadata; the model's, AdamW's and the EMA's state, keyed by parameter name),
                                     training_state.pt, train_config.json
    OUT/model.safetensors              the finished run's EMA model, gathered in full on rank 0 (kedavra format)
Every rank writes its file into one shared hidden folder (`shard_folder`), which rank 0 then moves into the
checkpoint's own hidden folder before renaming that into place, as above: the run folder must be on a file system
every rank sees. The same rules hold: `latest`, the newest `keep` kept, a damaged checkpoint (a missing or short
shard file, unreadable metadata) skipped for the newest intact one.

Writing: the files go into a hidden folder beside the final one; each file and the folder are fsync'ed; the
folder is renamed into place (atomic); then a new link is made under a temporary name and renamed over
`latest` (atomic). Until that last rename, `latest` names the previous checkpoint, complete and untouched.
`atomic_write` does the same for single files (the exported model, plots, sample grids).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from kedavra.checkpoint import CONFIG_KEY, save_model
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.training.config import TrainConfig, config_differences

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "train_config.json"
EXPORT_FILE = "model.safetensors"  # in OUT: the finished run's EMA model
LORA_FILE = "lora.safetensors"  # a LoRA run's trained LoRA in a checkpoint, and its EMA LoRA in OUT once finished
LORA_EMA_FILE = "lora_ema.safetensors"
SHARDS_DIR = "shards"  # a sharded run's DCP folder in a checkpoint
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shard files (FileSystemWriter)
STATE_FORMAT = 1  # version of training_state.pt's layout
PARTIAL_MARK = ".partial-"


@dataclass
class Checkpoint:
    """What a checkpoint holds, read back: the configs, the weights (model and EMA) and the training state. A LoRA
    run's (`lora`) holds the LoRA tensors in kohya's names as its weights, and no model config."""

    path: Path
    config: TrainConfig
    model_config: ModelConfig | None
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    state: dict[str, Any]
    lora: bool = False
    sharded: bool = False  # a sharded run's: its weights, AdamW's and the EMA's state are in path / SHARDS_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(temporary path) beside `path`, fsync the result, and rename it over `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
    try:
        write(partial)
        _fsync(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    _fsync(path.parent)
    return path


def model_files(model: StableDiffusion, ema_model: StableDiffusion) -> dict[str, Callable[[Path], None]]:
    """The weight files of a full run's checkpoint: the trained and the EMA model (kedavra format)."""
    return {MODEL_FILE: lambda path: save_model(model, path), EMA_FILE: lambda path: save_model(ema_model, path)}


def shard_folder(run_dir: Path, step: int) -> Path:
    """The hidden folder every rank of a sharded run writes checkpoint `step`'s shards into (one name all ranks
    know, whatever their process ids); `save_checkpoint` moves it into the checkpoint (files[SHARDS_DIR])."""
    return run_dir / CHECKPOINTS_DIR / f".{step_dir_name(step)}{PARTIAL_MARK}{SHARDS_DIR}"


def save_checkpoint(run_dir: Path, step: int, files: dict[str, Callable[[Path], None]], state: dict[str, Any],
                    config: TrainConfig, keep: int) -> Path:
    """Write checkpoint `step` of the run in `run_dir`: `files` (name -> its writer, given the path to write:
    `model_files`, or a LoRA run's LORA_FILE and LORA_EMA_FILE), the training state and the config; point `latest`
    at it, keep the newest `keep`."""
    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_dir_name(step)
    partial = folder / f".{final.name}{PARTIAL_MARK}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        for name, write in files.items():
            write(partial / name)
        torch.save({"format": STATE_FORMAT, **state}, partial / STATE_FILE)
        (partial / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        for file in partial.iterdir():
            _fsync(file)
        _fsync(partial)
        if final.exists():  # left by a run that crashed after writing it but before moving `latest` onto it
            shutil.rmtree(final)
        os.rename(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _fsync(folder)
    link = run_dir / f".{LATEST}{PARTIAL_MARK}{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(Path(CHECKPOINTS_DIR) / final.name, link)
    os.replace(link, run_dir / LATEST)
    _fsync(run_dir)
    _prune(folder, keep, keep_name=final.name)
    return final


def remove_partials(run_dir: Path) -> None:
    """Delete what interrupted writes left behind (hidden *.partial-PID files and folders)."""
    for folder in (run_dir, run_dir / CHECKPOINTS_DIR):
        if folder.is_dir():
            for leftover in folder.glob(f".*{PARTIAL_MARK}*"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder `path` stands for: a run folder (its `latest`), or a checkpoint folder itself.
    None when `path` is a folder with no checkpoint yet."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_symlink() or latest.exists():
        target = latest.resolve()
        if not (target / STATE_FILE).is_file():
            raise ValueError(f"{latest} points to {target}, which is not a complete checkpoint")
        return target
    if path.exists() and not path.is_dir():
        raise ValueError(f"resume path {str(path)!r} is a file; give a run folder or a checkpoint folder")
    return None


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint` (a full run's, a LoRA run's or a sharded run's, told
    apart by its files; a sharded one's shards are checked, not read: kedavra.training.sharding.load_sharded reads
    them into the sharded model); ValueError naming what is missing or broken."""
    lora = (folder / LORA_FILE).is_file()
    sharded = (folder / SHARDS_DIR).is_dir()
    weights, ema_weights = (LORA_FILE, LORA_EMA_FILE) if lora else (MODEL_FILE, EMA_FILE)
    needed = (STATE_FILE, CONFIG_FILE) if sharded else (weights, ema_weights, STATE_FILE, CONFIG_FILE)
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"checkpoint {folder} is incomplete: no {', '.join(missing)}")
    try:
        config = TrainConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        model_config, model_state, ema_state = None, {}, {}
        if sharded:
            check_shards(folder / SHARDS_DIR)
        else:
            if not lora:
                with safe_open(folder / MODEL_FILE, framework="pt") as file:
                    model_config = ModelConfig.from_dict(json.loads(file.metadata()[CONFIG_KEY]))
            model_state = load_file(folder / weights)
            ema_state = load_file(folder / ema_weights)
    except Exception as error:  # noqa: BLE001 -- a truncated or damaged file fails in whatever parser reads it
        # (safetensors' SafetensorError, torch.load's EOFError / UnpicklingError / IndexError, json, OSError, ...)
        raise ValueError(f"cannot read checkpoint {folder}: {type(error).__name__}: {error}") from error
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"checkpoint {folder} has training-state format {state.get('format')!r}; "
                         f"this kedavra reads format {STATE_FORMAT}")
    return Checkpoint(folder, config, model_config, model_state, ema_state, state, lora, sharded)


def check_shards(folder: Path) -> None:
    """Check a DCP folder is whole without reading its tensors: its metadata reads, and every byte range it indexes
    lies inside a file that exists (a crash mid-copy leaves a file missing or short). ValueError naming the first
    problem."""
    if not (folder / DCP_METADATA).is_file():
        raise ValueError(f"no {DCP_METADATA} in {folder}")
    metadata = FileSystemReader(folder).read_metadata()
    needed: dict[str, int] = {}  # file -> the bytes its indexed ranges need
    for item in metadata.storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            raise ValueError(f"shard file {file} is missing")
        if file.stat().st_size < size:
            raise ValueError(f"shard file {file} is truncated: {file.stat().st_size} bytes, its index needs {size}")


def check_same_run(stored: TrainConfig, new: TrainConfig, where: Path) -> None:
    """Refuse to resume the checkpoint at `where` with a config that would change the run, naming each field."""
    differences = config_differences(stored, new)
    if differences:
        listed = "; ".join(f"{name}: checkpoint {old!r}, now {value!r}" for name, (old, value) in differences.items())
        raise ValueError(f"cannot resume {where}: its config differs in {len(differences)} field(s): {listed}. "
                         "Resume with the checkpoint's settings (kedavra train --resume DIR alone takes them) or "
                         "start a new run in another folder")


def load_intact_checkpoint(found: Path, notify: Callable[[str], object] = print) -> Checkpoint:
    """`load_checkpoint(found)`, or where that one is damaged (a truncated file, a crash mid-copy) the newest intact
    checkpoint of its run (the step folders beside it), with one line to `notify` naming what was skipped and why;
    ValueError when none is intact."""
    step_folders = sorted((p for p in found.parent.iterdir() if p.is_dir() and p.name.startswith("step_")),
                          key=lambda p: p.name, reverse=True) if found.parent.name == CHECKPOINTS_DIR else []
    candidates = [found] + [p for p in step_folders if p.resolve() != found.resolve()]
    problems = []
    for candidate in candidates:
        try:
            checkpoint = load_checkpoint(candidate)
        except ValueError as error:
            problems.append(str(error))
            continue
        if problems:
            notify(f"kedavra train: note: {problems[0]}; resuming from the newest intact checkpoint, {candidate}")
        return checkpoint
    raise ValueError("no intact checkpoint to resume: " + "; ".join(problems))


def _prune(folder: Path, keep: int, keep_name: str) -> None:
    steps = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[:-keep]:
        if old.name != keep_name:
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data to the disk (a folder: its entries, so a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

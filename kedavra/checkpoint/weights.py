"""Reading any one weights file: the container (safetensors, torch zip, legacy torch pickle) is told from the
leading bytes, never the name, and Git LFS pointers, images, archives and web pages are named as what they are."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from kedavra.checkpoint.errors import _fail
from kedavra.checkpoint.safetensors_io import SafetensorsFile
from kedavra.checkpoint.torch_pickle import _read_torch_file


@dataclass
class _Weights:
    tensors: dict[str, Tensor]
    container: str  # "safetensors", "torch zip", "torch pickle"
    files: list[SafetensorsFile] = field(default_factory=list)  # the mapped files the tensors alias
    metadata: dict[str, str] = field(default_factory=dict)


_FOREIGN_FILES = (  # leading bytes -> what the file is
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<!DOCTYPE html", "an HTML page (a download link that returned a web page?)"),
    (b"<html", "an HTML page (a download link that returned a web page?)"),
)
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _read_weights(path: Path) -> _Weights:
    """Open one weights file, whatever its container, after checking what the bytes actually are."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not path.is_file():  # a device (/dev/zero), a FIFO, a socket: reading it could block or never end
        kind = "a FIFO" if path.is_fifo() else "a device" if path.is_char_device() or path.is_block_device() else \
            "a socket" if path.is_socket() else "not a regular file"
        raise _fail(path, f"{kind}, not a checkpoint file (give a .safetensors / .ckpt file or a diffusers folder)")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "empty file, not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_LFS_POINTER):
        raise _fail(
            path,
            "a Git LFS pointer file, not the weights: the repository was cloned without LFS. Run `git lfs pull` "
            "in it (or download the file itself) to fetch the real file",
        )
    if head.startswith(b"PK\x03\x04"):
        return _Weights(_read_torch_file(path, zipped=True), "torch zip")
    # safetensors before the pickle test: its header length (u64, little-endian) may start with byte 0x80; a legacy
    # torch file has its magic number's 0xf9 at byte 8, never "{"
    if len(head) > 8 and head[8:9] == b"{":
        file = SafetensorsFile(path)
        return _Weights(file.tensors(), "safetensors", [file], file.metadata)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode: a legacy (pre-zip) torch.save file
        return _Weights(_read_torch_file(path, zipped=False), "torch pickle")
    for magic, what in _FOREIGN_FILES:
        if head.lstrip().startswith(magic):
            raise _fail(path, f"{what}, not a checkpoint")
    kind = "a text file" if _is_text(head) else f"unrecognised content (first bytes {head[:16]!r})"
    raise _fail(
        path, f"not a checkpoint: {kind}; kedavra reads .safetensors, torch .ckpt/.pt/.bin and diffusers folders"
    )


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"unreadable JSON ({error})") from None
    if not isinstance(data, dict):
        raise _fail(path, "expected a JSON object")
    return data


def read_weights(path: str | Path) -> _Weights:
    """The tensors and metadata of one weights file of any container (safetensors, torch zip or legacy pickle, read
    by the restricted unpickler), after checking what its bytes are; for adapters and embeddings."""
    return _read_weights(Path(path))

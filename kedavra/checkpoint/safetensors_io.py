"""The .safetensors format: a file mapped copy-on-write (tensors alias its pages, consumed pages can be dropped),
and a writer that streams tensor by tensor. The package docstring's "Memory" paragraph says why."""

import json
import math
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kedavra.checkpoint.errors import _fail
from kedavra.mapped_memory import drop_pages, register_map

# safetensors format (huggingface/safetensors README): u64 little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the tensor bytes,
# offsets relative to the end of the header, covering the data without holes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers (its MAX_HEADER_SIZE)


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """A .safetensors file mapped copy-on-write: `tensor(name)` aliases the file's pages without reading them.

    Writing to a returned tensor copies the touched page privately; the file never changes. `release(t)` drops
    the mapped pages lying wholly inside a tensor that has been copied elsewhere (they are re-read on demand).
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"only {size} bytes: too short for a .safetensors file (8-byte header length)")
            header_size = int.from_bytes(prefix, "little")
            if header_size > SAFETENSORS_MAX_HEADER:
                raise _fail(path, f"corrupt .safetensors: header length {header_size} bytes is implausible")
            if 8 + header_size > size:
                raise _fail(
                    path,
                    f"truncated .safetensors: the header alone should be {header_size} bytes but the file has "
                    f"{size} bytes in all (the download was probably cut off)",
                )
            header_bytes = f.read(header_size)
            try:
                header = json.loads(header_bytes)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise _fail(path, f"corrupt .safetensors: the header is not valid JSON ({error})") from None
            if not isinstance(header, dict):
                raise _fail(path, "corrupt .safetensors: the header is not a JSON object")
            self.metadata = self._parse_metadata(header.pop("__metadata__", None) or {})
            self.entries = {name: self._parse_entry(name, info) for name, info in header.items()}
            self._data_start = 8 + header_size
            self._check_coverage(size - self._data_start)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        if self._map is not None:
            register_map(self._map)  # its pages may be dropped once consumed (release, kedavra.mapped_memory)

    def _parse_metadata(self, metadata) -> dict[str, str]:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _fail(self.path, "corrupt .safetensors: __metadata__ must map strings to strings")
        return metadata

    def _parse_entry(self, name: str, info) -> _Entry:
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _fail(self.path, f"corrupt .safetensors header entry for {name!r}: {info!r}") from None
        if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
            raise _fail(self.path, f"corrupt .safetensors header entry for {name!r}: {info!r}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise _fail(
                self.path,
                f"corrupt .safetensors: tensor {name!r} of shape {list(shape)} {info['dtype']} needs "
                f"{math.prod(shape) * dtype.itemsize} bytes but its offsets span {end - begin}",
            )
        return _Entry(dtype, shape, begin, end)

    def _check_coverage(self, data_size: int) -> None:
        position = 0
        for name, entry in sorted(self.entries.items(), key=lambda item: (item[1].begin, item[1].end)):
            if entry.begin != position:
                raise _fail(
                    self.path,
                    f"corrupt .safetensors: tensor {name!r} starts at byte {entry.begin}, "
                    f"expected {position} (tensors must follow each other without gaps)",
                )
            position = entry.end
        if position > data_size:
            raise _fail(
                self.path,
                f"truncated .safetensors: the header describes {position} bytes of tensor data but the file holds "
                f"only {data_size} (the download was probably cut off; fetch the file again)",
            )
        if position < data_size:
            raise _fail(self.path, f"corrupt .safetensors: {data_size - position} bytes after the last tensor")

    def tensor(self, name: str) -> Tensor:
        entry = self.entries[name]
        if entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=entry.dtype)
        count = (entry.end - entry.begin) // entry.dtype.itemsize
        flat = torch.frombuffer(self._map, dtype=entry.dtype, count=count, offset=self._data_start + entry.begin)
        return flat.view(entry.shape)

    def tensors(self) -> dict[str, Tensor]:
        return {name: self.tensor(name) for name in self.entries}

    def release(self, tensor: Tensor) -> None:
        """Drop the mapped pages wholly inside `tensor`'s bytes (a contiguous view into this file, consumed)."""
        drop_pages(tensor)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    fill: Callable[[str, Tensor], Tensor] | None = None,
) -> None:
    """Write `tensors` as a .safetensors file, one tensor at a time (never a second copy of them all).

    `fill(name, t)`, if given, produces each tensor's data when it is written; `tensors` then only needs the
    right dtypes and shapes (meta tensors will do). The file is written beside `path` and renamed over it,
    so a model whose weights alias the old file (see SafetensorsFile) keeps reading the old bytes.
    """
    path = Path(path)
    names = sorted(tensors, key=lambda name: -tensors[name].element_size())  # keeps every tensor dtype-aligned
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"cannot store {name!r}: dtype {t.dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the tensor data starts 8-byte aligned, as the safetensors library writes it
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name in names:
                t = fill(name, tensors[name]) if fill is not None else tensors[name]
                if t.dtype != tensors[name].dtype or t.shape != tensors[name].shape:
                    raise ValueError(
                        f"{name!r}: fill gave {t.dtype} {tuple(t.shape)}, the header says "
                        f"{tensors[name].dtype} {tuple(tensors[name].shape)}"
                    )
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (nbytes,), no copy on CPU
                f.write(memoryview(data.numpy()))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)

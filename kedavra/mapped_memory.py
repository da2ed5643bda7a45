"""Pages of memory-mapped checkpoint files that no tensor needs any more, handed back to the OS.

A model loaded from a `.safetensors` file of its own dtype holds its weights as views into the file's private
(copy-on-write) memory map (kedavra.checkpoint.safetensors_io): no copy, but every page once read stays in the
process's resident memory as long as the map lives, even after the tensor reading it is gone (a weight converted
to channels-last, or kept only in oneDNN's packed layout by kedavra.networks.acceleration). `drop_pages` and
`drop_unused_pages` tell the kernel (madvise MADV_DONTNEED) that such pages are not needed: they leave the resident
set at once, and a later read of the same bytes reads the file again, the same values. A page the process wrote to
(a copy-on-write copy) is dropped too and reads the file's bytes afterwards, so drop only what nothing will read
again, or what was never written. Only ranges inside maps registered here are touched: elsewhere MADV_DONTNEED
would zero live memory.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn

PAGE = mmap.PAGESIZE
CAN_DROP = hasattr(mmap, "MADV_DONTNEED")  # POSIX; elsewhere pages stay until the map is freed
_MAPS: dict[int, tuple[int, weakref.ref]] = {}  # base address -> (length in bytes, the map)


def register_map(buffer: mmap.mmap) -> int:
    """Track `buffer`, a private file map whose pages may be dropped, until it is freed; return its base address."""
    base = torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()
    _MAPS[base] = (len(buffer), weakref.ref(buffer))
    weakref.finalize(buffer, _MAPS.pop, base, None)
    return base


def _byte_range(tensor: Tensor) -> tuple[int, int] | None:
    """[start, stop) addresses of a dense CPU tensor's bytes (None for another device, an empty or strided one)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return None
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def _map_of(start: int, stop: int) -> tuple[int, mmap.mmap] | None:
    """(base, map) of the registered live map holding [start, stop), if any."""
    for base, (length, ref) in list(_MAPS.items()):
        buffer = ref()
        if buffer is not None and base <= start and stop <= base + length:
            return base, buffer
    return None


def _drop(buffer: mmap.mmap, base: int, start: int, stop: int) -> int:
    """Drop the pages wholly inside [start, stop) of `buffer` (addresses); the bytes dropped."""
    first = -(-(start - base) // PAGE) * PAGE
    last = (stop - base) // PAGE * PAGE
    if last <= first:
        return 0
    buffer.madvise(mmap.MADV_DONTNEED, first, last - first)
    return last - first


def drop_pages(tensor: Tensor) -> int:
    """Drop the mapped pages wholly inside `tensor`'s bytes when it is a view into a registered map (nothing
    otherwise); returns the bytes dropped. The caller promises nothing reads those bytes again (or that they were
    never written)."""
    span = _byte_range(tensor) if CAN_DROP else None
    found = None if span is None else _map_of(*span)
    return 0 if found is None else _drop(found[1], found[0], *span)


def drop_unused_pages(modules: Iterable[nn.Module]) -> int:
    """Drop every page of the registered maps that no parameter or buffer of `modules` lies on (the maps these
    modules were loaded from, now partly replaced by copies); returns the bytes dropped. Tensors outside `modules`
    that view the same maps read the file again afterwards."""
    if not CAN_DROP:
        return 0
    used: dict[int, list[tuple[int, int]]] = {}  # map base -> the byte ranges the modules still use
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()  # the whole storage a view lies in, to be safe
            start = storage.data_ptr()
            stop = start + storage.nbytes()
            found = _map_of(start, stop) if tensor.device.type == "cpu" and stop > start else None
            if found is not None:
                used.setdefault(found[0], []).append((start, stop))
    dropped = 0
    for base, ranges in used.items():
        length, ref = _MAPS[base]
        buffer = ref()
        if buffer is None:
            continue
        position = base
        for start, stop in sorted(ranges) + [(base + length, base + length)]:
            if start > position:
                dropped += _drop(buffer, base, position, start)
            position = max(position, stop)
    return dropped

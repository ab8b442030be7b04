"""Safetensors read through mmap and written tensor by tensor.

The reader hands out zero-copy views of a private mapping; the writer writes the header first (it is computed
from the plan of shapes and dtypes) and then each tensor's bytes as they come, so neither ever holds more than
the tensor in hand.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MixqError
from .pages import drop_file_pages

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The largest header read: 16 MB of JSON is ~130k tensors (Mixtral-8x7B has 995) and costs ~25x its size to
# parse, so a crafted header cannot take the machine (safetensors' own reader allows 100 MB).
MAX_HEADER = 16 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One .safetensors file: its header, checked against the file size, and lazy tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MixqError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise MixqError(f"{self.path}: not a safetensors file or truncated "
                                f"(header of {header_len} bytes, file of {size})")
            if header_len > MAX_HEADER:
                raise MixqError(f"{self.path}: safetensors header of {header_len} bytes is over the "
                                f"{MAX_HEADER} this reader accepts")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise MixqError(f"{self.path}: unreadable safetensors header ({exc})") from None
        self.data_start = 8 + header_len
        self.metadata, self.entries = _parse_header(header, size - self.data_start, self.path)
        self._mmap = None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor in the mapping; never written to."""
        e = self.entries[name]
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=e.dtype)
        flat = torch.frombuffer(self._map(), dtype=torch.uint8, count=e.end - e.begin,
                                offset=self.data_start + e.begin)
        return flat.view(e.dtype).reshape(e.shape)

    def release(self, name: str) -> None:
        if self._mmap is None:
            return
        e = self.entries[name]
        base = torch.frombuffer(self._mmap, dtype=torch.uint8, count=1).data_ptr()
        drop_file_pages(base + self.data_start + e.begin, e.end - e.begin)



def _parse_header(header, data_bytes: int, path: Path) -> tuple[dict[str, str], dict[str, Entry]]:
    """Every entry checked as the format requires before a byte is read: known dtype, shape of non-negative
    integers, offsets that tile the data section in order (no gap, no overlap, nothing past its end) and hold
    exactly shape x itemsize bytes; the reference reader refuses the same files."""
    if not isinstance(header, dict):
        raise MixqError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MixqError(f"{path}: safetensors __metadata__ must map names to strings")
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or len(info) != 3:
            raise MixqError(f"{where}: entry must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise MixqError(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise MixqError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise MixqError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise MixqError(f"{where} holds {end - begin} bytes but its shape {shape} needs {nbytes}")
        if end > data_bytes:
            raise MixqError(f"{path}: truncated: tensor {name} ends at byte {8 + end} of the data but the file "
                            f"holds {data_bytes} bytes of data")
        entries[name] = Entry(DTYPES[dtype], tuple(shape), begin, end)
    position = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != position:
            how = "overlaps the tensor before it" if e.begin < position else f"leaves a gap at byte {position}"
            raise MixqError(f"{path}: tensor {name} (data_offsets [{e.begin}, {e.end}]) {how}")
        position = e.end
    if position != data_bytes:
        raise MixqError(f"{path}: {data_bytes - position} bytes after the last tensor; the header does not "
                        f"describe this file")
    return metadata, entries


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class SafetensorsWriter:
    """Writes a file whose tensors are all known up front; `write` must follow the plan's order."""

    def __init__(self, path: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._pending = []
        for name, shape, dtype in plan:
            if dtype not in DTYPE_NAMES:
                raise MixqError(f"{self.path}: cannot store tensor {name} of dtype {dtype} in safetensors")
            n = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._pending.append((name, tuple(shape), dtype))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.nbytes = 8 + len(raw) + offset
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._index = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._pending[self._index]
        if (name, tuple(tensor.shape), tensor.dtype) != expected:
            raise AssertionError(f"{self.path}: wrote {name} {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"plan says {expected}")
        self._index += 1
        if tensor.numel():
            self._f.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)

    def close(self) -> None:
        if self._index != len(self._pending):
            self._f.close()
            raise AssertionError(f"{self.path}: {len(self._pending) - self._index} planned tensors not written")
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()

"""A device-memory budget and its accountant.

`--device-memory SIZE` caps what mixq keeps on the device at once. The default is what the device has, less a
margin (CUDA: 8% and at least 2 GiB, for the CUDA context, the allocator's fragmentation and cuBLAS workspaces);
on a CPU there is no limit unless one is given, and a given one also bounds the process, since the CPU's memory is
the device's. The accountant adds up what is resident (weights kept for the whole run, caches) and the largest
transient set (a layer dequantized or read for one forward, activations); its peak is what `peak_device_bytes`
reports on a CPU. On CUDA the allocator's own peak (`torch.cuda.max_memory_allocated`) is reported instead.
"""

from __future__ import annotations

import math
import os

import torch

from mixq.convert.errors import MixqError
from mixq.convert.progress import human_bytes

CUDA_MARGIN = (0.08, 2 << 30)   # fraction of the device, and at least this many bytes


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def activation_bytes(spec, sequences: int, seqlen: int) -> int:
    """An upper bound of one layer's activations over `sequences` of `seqlen` positions, in fp32: the widest
    intermediate per position (queries, keys and values; gate and up; one row of every head's attention scores)
    three times over (its input, itself, its output), and a row of logits."""
    widest = max(spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim,
                 2 * spec.intermediate_size, spec.num_heads * seqlen)
    return 3 * sequences * seqlen * widest * 4 + spec.vocab_size * 4


def host_memory_to_spare() -> int:
    """Half the host memory available now (MemAvailable: free plus what the kernel can reclaim)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024 // 2
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


class Budget:
    """What may be on the device at once (`limit` bytes, None: unlimited) and what is, as counted."""

    def __init__(self, limit: int | None, device: torch.device):
        self.limit, self.device = limit, torch.device(device)
        self.resident = 0
        self.peak = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @classmethod
    def for_device(cls, size, device) -> Budget:
        """`size` as given (bytes or a size such as 20GB), or the device's default."""
        from mixq.convert.hf import parse_size
        device = torch.device(device)
        if size is not None:
            limit = parse_size(size)
            if limit <= 0:
                raise MixqError(f"--device-memory {size!r}: must be a positive size")
            return cls(limit, device)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return cls(total - max(int(total * CUDA_MARGIN[0]), CUDA_MARGIN[1]), device)
        return cls(None, device)

    def fits(self, nbytes: int) -> bool:
        return self.limit is None or self.resident + nbytes <= self.limit

    def keep(self, nbytes: int) -> None:
        """Count `nbytes` resident from now on."""
        self.resident += nbytes
        self.peak = max(self.peak, self.resident)

    def drop(self, nbytes: int) -> None:
        self.resident -= nbytes

    def passing(self, nbytes: int) -> None:
        """Count `nbytes` that live only for one step on top of what is resident."""
        self.peak = max(self.peak, self.resident + nbytes)

    def room(self) -> int:
        """Bytes still free under the limit; unlimited: on a CPU what the host can spare, elsewhere all of it."""
        if self.limit is not None:
            return max(0, self.limit - self.resident)
        return host_memory_to_spare() if self.device.type == "cpu" else 1 << 62

    def require(self, nbytes: int, what: str) -> None:
        """Refuse, before any work, a budget that cannot hold `nbytes` on top of what is resident."""
        if not self.fits(nbytes):
            raise MixqError(f"--device-memory {human_bytes(self.limit)} is too small: {what} needs at least "
                            f"{human_bytes(self.resident + nbytes)}")

    def peak_device_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.peak

    def describe(self) -> str:
        return "unlimited" if self.limit is None else human_bytes(self.limit)

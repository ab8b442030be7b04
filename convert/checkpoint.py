"""A checkpoint in any layout, seen as canonical tensors that load one at a time."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import MixqError
from .names import expected_shapes
from .spec import ModelSpec
from .tokenizer import Vocab

DTYPE_LABELS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
LABEL_DTYPES = {v: k for k, v in DTYPE_LABELS.items()}


def torch_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the spelling of config.json's torch_dtype and of mixq's reports."""
    return str(dtype).removeprefix("torch.")


def owned(tensor: torch.Tensor, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device` in `dtype`, in memory of its own (a copy when it was already there: a tensor read from
    a file may be the file's mapping)."""
    moved = tensor.to(device=device, dtype=dtype)
    return moved.clone() if moved.data_ptr() == tensor.data_ptr() else moved


def _nothing() -> None:
    return None


@dataclass
class TensorRef:
    """Where a canonical tensor lives and how to load it; `load` returns it in canonical form."""
    shape: tuple[int, ...]
    dtype: torch.dtype            # what load() returns
    stored: str                   # the on-disk type, for inspect ("BF16", "Q4_1", ...)
    source: str                   # file and on-disk name, for messages
    load: Callable[[], torch.Tensor]
    release: Callable[[], None] = _nothing
    nbytes: int = 0               # bytes on disk
    # a quantized linear: its packed tensors, and how to turn them (loaded, on any device) into the weight; lets a
    # reader keep the packed form resident and dequantize just in time
    packed: dict[str, TensorRef] | None = None
    unpack: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None


@dataclass
class Checkpoint:
    layout: str                   # "torrent" | "hf" | "gguf"
    path: Path
    spec: ModelSpec
    tensors: dict[str, TensorRef]
    vocab: Vocab | None = None
    generation_config: dict | None = None
    source_config: dict = field(default_factory=dict)   # config.json / params.json / GGUF general.* as read
    files: list[Path] = field(default_factory=list)

    def get(self, name: str) -> torch.Tensor:
        ref = self.tensors[name]
        tensor = ref.load()
        if tuple(tensor.shape) != ref.shape:  # a reader bug, not bad input: the shape was checked on open
            raise AssertionError(f"{ref.source}: loaded {tuple(tensor.shape)}, expected {ref.shape}")
        return tensor

    def release(self, name: str) -> None:
        self.tensors[name].release()

    def take(self, name: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor on `device` (in `dtype` when given) in memory of its own, the file's pages it was read from
        released (released while still mapped, they would come back when read, and stay)."""
        taken = owned(self.get(name), device, dtype)
        self.release(name)
        return taken

    def layer(self, index: int, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Decoder layer `index`'s tensors by layer-relative name (`take`n): the unit the engine and the evaluators
        stream."""
        prefix = f"model.layers.{index}."
        return {name[len(prefix):]: self.take(name, device, dtype) for name in self.tensors if name.startswith(prefix)}

    @property
    def total_bytes(self) -> int:
        return sum(ref.nbytes for ref in self.tensors.values())

    @property
    def largest_tensor_bytes(self) -> int:
        return max(math.prod(ref.shape) * ref.dtype.itemsize for ref in self.tensors.values())

    def main_dtype(self) -> torch.dtype:
        """The dtype of most matrix weights: what `--dtype auto` keeps."""
        counts = Counter(ref.dtype for ref in self.tensors.values() if len(ref.shape) >= 2)
        return counts.most_common(1)[0][0] if counts else torch.float32

    def stored_types(self) -> dict[str, int]:
        return dict(Counter(ref.stored for ref in self.tensors.values()))



def checked_tensors(spec: ModelSpec, found: dict[str, TensorRef], where: Path) -> dict[str, TensorRef]:
    """The tensors in canonical order, after refusing any missing, extra or mis-shaped one."""
    expected = expected_shapes(spec)
    for name, ref in found.items():
        if name not in expected:
            raise MixqError(f"{ref.source}: unexpected tensor for a {spec.arch} model "
                            f"with {spec.num_layers} layers")
        if ref.shape != expected[name]:
            raise MixqError(f"{ref.source}: shape {list(ref.shape)} contradicts the configuration, "
                            f"which implies {list(expected[name])}")
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MixqError(f"{where}: missing tensor {missing[0]}{more}")
    return {name: found[name] for name in expected}


def resolve_dtype(label: str) -> torch.dtype | None:
    """`--dtype` to a torch dtype; None keeps each tensor's own dtype (auto)."""
    if label == "auto":
        return None
    if label not in LABEL_DTYPES:
        raise MixqError(f"unknown dtype {label!r} (choose from auto, {', '.join(LABEL_DTYPES)})")
    return LABEL_DTYPES[label]

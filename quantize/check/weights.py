"""Decoder layers on the device under a memory budget, for forwards that need every layer per token (generation).

Without a budget, or with one that holds them all so, every layer is resident in the compute dtype (dequantized,
for AWQ/GPTQ repositories): the fastest path. Otherwise as many layers as fit stay resident in their compact form --
the packed codes, scales and zeros of a quantized repository (a quarter of fp16), the compute dtype otherwise -- and
the rest stay where the checkpoint keeps them (the file's pages, host memory) and are read when a forward reaches
them. A packed linear is dequantized just in time, when the forward asks for it; the MoE forward asks only for the
experts the router picked, so at decode only those are dequantized or read. Room for one whole layer in the compute
dtype is kept free for the tensors made that way (a prefill may route to every expert).
"""

from __future__ import annotations

from collections import Counter

import torch

from mixq.convert.architecture import plan
from mixq.convert.checkpoint import Checkpoint, owned
from mixq.convert.progress import human_bytes, note

from ..memory import Budget, tensor_bytes


def _packed_bytes(ref) -> int:
    return sum(part.nbytes for part in ref.packed.values())


class LayerStore:
    """Every decoder layer's weights: resident (a tensor, or the packed parts of one) or left in the checkpoint."""

    def __init__(self, ckpt: Checkpoint, device, dtype: torch.dtype, budget: Budget):
        self.ckpt, self.device, self.dtype, self.budget = ckpt, torch.device(device), dtype, budget
        spec = ckpt.spec
        self.layer_bytes = sum(tensor_bytes(s, dtype) for s in plan(spec).tensor_shapes.values())
        budget.require(self.layer_bytes, "one decoder layer in the compute dtype")
        self.resident: list[dict[str, object]] = []
        self.moved = 0                      # bytes read into the device for tensors that were not resident
        self.unpacked = Counter()           # (layer, module) -> times dequantized just in time
        self.read = Counter()               # (layer, module) -> times read from the checkpoint
        packed = 0
        layers = [n for n in ckpt.tensors if n.startswith("model.layers.")]
        # every layer resident as the forward reads it (dequantized), the fastest, when the budget holds them all
        unlimited = budget.fits(sum(tensor_bytes(ckpt.tensors[n].shape, dtype) for n in layers))
        for layer in range(spec.num_layers):
            prefix = f"model.layers.{layer}."
            names = [n for n in layers if n.startswith(prefix)]
            size = sum(tensor_bytes(ckpt.tensors[n].shape, dtype) if unlimited else self._compact_bytes(n)
                       for n in names)
            if not unlimited and not budget.fits(self.layer_bytes + size):
                self.resident.append({})
                continue
            kept = {n[len(prefix):]: self._load(n) if unlimited else self._compact(n) for n in names}
            packed += sum(isinstance(v, dict) for v in kept.values())
            budget.keep(size)
            self.resident.append(kept)
        self.streamed = sum(not layer for layer in self.resident)
        note(f"device memory {budget.describe()}: {spec.num_layers - self.streamed} of {spec.num_layers} layers "
             f"resident{' (packed)' if packed else ''}, {self.streamed} read per token; room for one layer "
             f"({human_bytes(self.layer_bytes)}) kept free; {human_bytes(budget.resident)} resident")

    def _compact_bytes(self, name: str) -> int:
        ref = self.ckpt.tensors[name]
        return _packed_bytes(ref) if ref.packed else tensor_bytes(ref.shape, self.dtype)

    def _compact(self, name: str):
        ref = self.ckpt.tensors[name]
        if not ref.packed:
            return self._load(name)
        parts = {s: owned(part.load(), self.device) for s, part in ref.packed.items()}
        for part in ref.packed.values():
            part.release()
        return parts

    def _load(self, name: str) -> torch.Tensor:
        return self.ckpt.take(name, self.device, self.dtype)

    def layer(self, index: int) -> LayerWeights:
        return LayerWeights(self, index)


class LayerWeights:
    """One layer's weights as the forward asks for them (a read-only mapping by layer-relative name); counts
    what it makes on the way, which the budget sees as passing through."""

    def __init__(self, store: LayerStore, index: int):
        self.store, self.index = store, index
        self.made = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        store = self.store
        kept = store.resident[self.index].get(name)
        if isinstance(kept, torch.Tensor):
            return kept
        module = (self.index, name.removesuffix(".weight"))
        if kept is not None:   # packed on the device: dequantized now
            tensor = store.ckpt.tensors[f"model.layers.{self.index}.{name}"].unpack(kept)
            store.unpacked[module] += 1
        else:      # left in the checkpoint: read now (a quantized one moves packed and is dequantized here)
            full = f"model.layers.{self.index}.{name}"
            ref = store.ckpt.tensors[full]
            store.moved += ref.nbytes
            if ref.packed:
                parts = store._compact(full)
                tensor = ref.unpack(parts)
                del parts
            else:
                tensor = store._load(full)
            store.read[module] += 1
        self.made += tensor_bytes(tensor.shape, tensor.dtype)
        store.budget.passing(self.made)
        return tensor

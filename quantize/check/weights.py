"""Decoder layers on the device under a memory budget, for forwards that need every layer per token (generation).

Without a budget, or with one that holds them all so, every layer is resident in the compute dtype (dequantized,
for AWQ/GPTQ repositories): the fastest path. Otherwise as many layers as fit stay resident in their compact form --
the packed codes, scales and zeros of a quantized repository (a quarter of fp16), the compute dtype otherwise -- and
the rest stream: on a GPU they are copied once, in their compact form, into pinned host memory (as much as the host
can spare, half its available memory; what does not fit stays in the checkpoint's pages), from which each forward
copies what it asks for asynchronously; on a CPU the checkpoint's pages already are host memory and are read as they
are. A packed linear is dequantized just in time, when the forward asks for it; the MoE forward asks only for the
experts the router picked, so at decode only those are dequantized or moved. Room for one whole layer in the
compute dtype is kept free for the tensors made that way (a prefill may route to every expert).
"""

from __future__ import annotations

from collections import Counter

import torch

from mixq.convert.architecture import plan
from mixq.convert.checkpoint import Checkpoint, owned
from mixq.convert.progress import human_bytes, note

from ..memory import Budget, host_memory_to_spare, tensor_bytes


def _packed_bytes(ref) -> int:
    return sum(part.nbytes for part in ref.packed.values())


def _nbytes(kept) -> int:
    parts = kept.values() if isinstance(kept, dict) else [kept]
    return sum(t.numel() * t.element_size() for t in parts)


def head_weights(ckpt: Checkpoint, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm and the output projection (the embedding table when the two are tied), on the device."""
    name = "model.embed_tokens.weight" if ckpt.spec.tie_word_embeddings else "lm_head.weight"
    return ckpt.take("model.norm.weight", device, dtype), ckpt.take(name, device, dtype)


class LayerStore:
    """Every decoder layer's weights: resident (a tensor, or the packed parts of one) or left in the checkpoint."""

    def __init__(self, ckpt: Checkpoint, device, dtype: torch.dtype, budget: Budget, host: int | None = None):
        """`host`: bytes of host memory the streamed layers may be copied into (default: on a GPU, what the host
        can spare, pinned; on a CPU none, since a copy would only double what the checkpoint's pages hold)."""
        self.ckpt, self.device, self.dtype, self.budget = ckpt, torch.device(device), dtype, budget
        self.pin = self.device.type == "cuda"
        host = (host_memory_to_spare() if self.pin else 0) if host is None else host
        spec = ckpt.spec
        self.layer_bytes = sum(tensor_bytes(s, dtype) for s in plan(spec).tensor_shapes.values())
        budget.require(self.layer_bytes, "one decoder layer in the compute dtype")
        self.resident: list[dict[str, object]] = []
        self.moved = 0                      # bytes read into the device for tensors that were not resident
        self.unpacked = Counter()           # (layer, module) -> times dequantized just in time
        self.read = Counter()               # (layer, module) -> times read from outside the device
        self.read_from = Counter()          # "host" | "checkpoint" -> tensors read from there
        self.host: list[dict[str, object]] = []   # a streamed layer's compact tensors in (pinned) host memory
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
                held = size <= host     # its compact size, as for residence
                self.host.append({n[len(prefix):]: self._compact(n, "cpu") for n in names} if held else {})
                host -= size if held else 0
                continue
            self.host.append({})
            kept = {n[len(prefix):]: self._load(n) if unlimited else self._compact(n) for n in names}
            packed += sum(isinstance(v, dict) for v in kept.values())
            budget.keep(size)
            self.resident.append(kept)
        self.streamed = sum(not layer for layer in self.resident)
        held = sum(bool(layer) for layer in self.host)
        where = f" ({held} from {'pinned ' if self.pin else ''}host memory)" if held else ""
        note(f"device memory {budget.describe()}: {spec.num_layers - self.streamed} of {spec.num_layers} layers "
             f"resident{' (packed)' if packed else ''}, {self.streamed} read per token{where}; room for one layer "
             f"({human_bytes(self.layer_bytes)}) kept free; {human_bytes(budget.resident)} resident")

    def _compact_bytes(self, name: str) -> int:
        ref = self.ckpt.tensors[name]
        return _packed_bytes(ref) if ref.packed else tensor_bytes(ref.shape, self.dtype)

    def _compact(self, name: str, device=None):
        """`name` on `device` (default: the store's) in its compact form: packed parts, or the compute dtype; in
        host memory on a GPU's host, pinned, so that copies to the device run asynchronously."""
        device = device or self.device
        ref = self.ckpt.tensors[name]
        if not ref.packed:
            return self._pinned(self.ckpt.take(name, device, self.dtype))
        parts = {s: self._pinned(owned(part.load(), device)) for s, part in ref.packed.items()}
        for part in ref.packed.values():
            part.release()
        return parts

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.pin and tensor.device.type == "cpu" else tensor

    def _load(self, name: str) -> torch.Tensor:
        return self.ckpt.take(name, self.device, self.dtype)

    def _from_host(self, kept):
        if isinstance(kept, dict):
            return {s: t.to(self.device, non_blocking=True) for s, t in kept.items()}
        return kept.to(self.device, non_blocking=True)

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
        else:      # streamed: moved now, from host memory or the checkpoint (a quantized one packed, then dequantized)
            full = f"model.layers.{self.index}.{name}"
            ref = store.ckpt.tensors[full]
            held = store.host[self.index].get(name)
            moved = store._from_host(held) if held is not None else store._compact(full)
            store.moved += _nbytes(moved)
            tensor = ref.unpack(moved) if isinstance(moved, dict) else moved
            del moved
            store.read[module] += 1
            store.read_from["host" if held is not None else "checkpoint"] += 1
        self.made += tensor_bytes(tensor.shape, tensor.dtype)
        store.budget.passing(self.made)
        return tensor

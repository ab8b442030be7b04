"""The importance matrix llama.cpp's quantizer weighs with, computed from mixq's own calibration blocks.

What llama.cpp's imatrix tool collects, from the same forward the quantizers calibrate on (forward.py, watched
through its observer): for every matrix multiplication of a decoder layer, each input column's sum of squares
over the calibration tokens and the number of tokens; for the experts, per expert over the tokens routed to it
(llama.cpp's MUL_MAT_ID rows), so ffn_*_exps entries hold one row per expert. The router (ffn_gate_inp) is
collected as the tool does, the output head and embeddings are not (its default).

Working set: one layer's weights and the calibration hidden states [samples, seqlen, hidden] on the device (for
Mixtral at 128 x 512 in bf16, 2.8 GB and 0.5 GB), and the sums themselves (27 MB for Mixtral): it does not grow
with the model's depth.
"""

from __future__ import annotations

import torch

from mixq.convert import open_checkpoint
from mixq.convert.imatrix import Entry, Imatrix
from mixq.convert.names import DENSE_MLP_TENSORS, EXPERT_TENSORS, LAYER_TENSORS, ROUTER_TENSORS
from mixq.convert.progress import bar
from mixq.convert.spec import ModelSpec

from .background import Ahead
from .device import compute_dtype, pick_device
from .forward import Rotary, decoder_layer


def gguf_entries(spec: ModelSpec) -> dict[str, tuple[str, int]]:
    """Layer-relative module -> (its GGUF tensor below blk.N., its row of sums: the expert, else 0)."""
    plain = LAYER_TENSORS + (ROUTER_TENSORS if spec.is_moe else DENSE_MLP_TENSORS)
    table = {canonical.removesuffix(".weight"): (gguf, 0) for canonical, _, gguf in plain}
    if spec.is_moe:
        for e in range(spec.num_experts):
            for canonical, _, stacked, _ in EXPERT_TENSORS:
                table[canonical.format(E=e).removesuffix(".weight")] = (stacked, e)
    return table


class _Sums:
    """One layer's observer: sums of squares and token counts per GGUF tensor, on the device."""

    def __init__(self, spec: ModelSpec):
        self.entries = gguf_entries(spec)
        self.experts = max(spec.num_experts, 1)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def __call__(self, modules: tuple[str, ...], x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        squares = rows.float().pow(2).sum(0)
        for module in modules:
            name, row = self.entries[module]
            if name not in self.sums:
                matrices = self.experts if name.endswith("_exps.weight") else 1
                self.sums[name] = torch.zeros(matrices, rows.shape[-1], device=rows.device)
                self.counts[name] = torch.zeros(matrices, dtype=torch.float64)
            self.sums[name][row] += squares
            self.counts[name][row] += rows.shape[0]

    def entries_of(self, layer: int) -> dict[str, Entry]:
        return {f"blk.{layer}.{name}": Entry(self.sums[name].cpu().numpy(), self.counts[name].float().numpy())
                for name in self.sums}


def compute_imatrix(model, blocks, device: str = "auto", dtype: str = "auto", batch: int = 8) -> Imatrix:
    """The importance matrix of the checkpoint at `model` (any layout mixq reads) on calibration `blocks`."""
    ckpt = open_checkpoint(model)
    spec = ckpt.spec
    device = pick_device(device)
    dtype = compute_dtype(dtype, device)
    samples, seqlen = blocks.tokens.shape
    rope = Rotary.build(spec, seqlen, device, dtype)
    x = ckpt.get("model.embed_tokens.weight")[blocks.tokens].to(device=device, dtype=dtype)
    ckpt.release("model.embed_tokens.weight")
    entries = {}
    layers = range(spec.num_layers)
    with Ahead(lambda i: ckpt.layer(i, "cpu", dtype), layers) as reading, \
            bar(total=spec.num_layers, desc="importance matrix", unit="layer") as pbar:
        for layer, weights in reading:
            weights = {name: tensor.to(device) for name, tensor in weights.items()}
            sums = _Sums(spec)
            for start in range(0, samples, batch):
                x[start:start + batch] = decoder_layer(x[start:start + batch], weights, spec, rope, observe=sums)
            entries.update(sums.entries_of(layer))
            del weights
            pbar.update(1)
    source = blocks.provenance.get("source") or blocks.provenance.get("prepared_file") or "calibration"
    return Imatrix(entries, [str(source)], chunk_count=samples, chunk_size=seqlen)

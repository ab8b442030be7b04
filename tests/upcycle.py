"""A Mixtral-architecture MoE built from a real dense model: every expert a copy of the dense MLP (optionally
perturbed), plus a router. With exact copies its logits equal the dense model's whatever the routing."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixq.convert import open_checkpoint
from mixq.convert.hf import config_from_spec, write_json

MLP = {"mlp.gate_proj.weight": "w1", "mlp.up_proj.weight": "w3", "mlp.down_proj.weight": "w2"}


def upcycle(dense: Path, out: Path, experts: int = 4, per_token: int = 2, noise: float = 0.0, seed: int = 0,
            layers: int | None = None, router_scale: float = 1.0) -> Path:
    """`layers` keeps the first so many decoder layers (a shorter model, still the real weights); `router_scale`
    widens the routing margins, so that rounding (fp16 against fp32) cannot flip which experts a token reaches."""
    ckpt = open_checkpoint(dense)
    layers = ckpt.spec.num_layers if layers is None else layers
    spec = ckpt.spec.replace(arch="mixtral", num_experts=experts, experts_per_tok=per_token, sliding_window=None,
                             num_layers=layers)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ckpt.tensors:
        tensor = ckpt.get(name).float().clone()
        layer_name = name.split(".", 3)[-1] if name.startswith("model.layers.") else None
        if layer_name is not None and int(name.split(".")[2]) >= layers:
            continue
        if layer_name in MLP:
            prefix = name[: -len(layer_name)]
            for e in range(experts):
                jitter = noise * tensor.std() * torch.randn(tensor.shape, generator=g) if noise else 0
                copy = tensor + jitter if noise else tensor.clone()
                tensors[f"{prefix}block_sparse_moe.experts.{e}.{MLP[layer_name]}.weight"] = copy.contiguous()
            if layer_name == "mlp.gate_proj.weight":
                router = torch.randn(experts, spec.hidden_size, generator=g) * router_scale * spec.hidden_size ** -0.5
                tensors[f"{prefix}block_sparse_moe.gate.weight"] = router
        else:
            tensors[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", config_from_spec(spec, torch.float32))
    for file in dense.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(file, out / file.name)
    return out

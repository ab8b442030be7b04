"""Tiny checkpoints built by the tests, in the torrent layout of the original release."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.fixtures import mistral_tokenizer_path


def tiny_params(arch: str = "mixtral", dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                hidden_dim: int = 96, experts: int = 4, vocab: int = 32000, tied: bool = False) -> dict:
    """A params.json shaped like the real torrent's: no rope_theta, no max_seq_len, no sliding_window."""
    params = {"dim": dim, "n_layers": layers, "head_dim": dim // heads, "hidden_dim": hidden_dim,
              "n_heads": heads, "n_kv_heads": kv_heads, "norm_eps": 1e-05, "vocab_size": vocab}
    if arch == "mixtral":
        params["moe"] = {"num_experts_per_tok": 2, "num_experts": experts}
    if tied:
        params["tied_embeddings"] = True
    return params


def native_state(params: dict, dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, hd, ff = params["dim"], params["head_dim"], params["hidden_dim"]
    q, kv = params["n_heads"] * hd, params["n_kv_heads"] * hd

    def w(*shape, scale=None):
        scale = scale or shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def norm(n):
        return (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    state = {"tok_embeddings.weight": w(params["vocab_size"], dim, scale=1.0)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        state[p + "attention_norm.weight"] = norm(dim)
        state[p + "attention.wq.weight"] = w(q, dim)
        state[p + "attention.wk.weight"] = w(kv, dim)
        state[p + "attention.wv.weight"] = w(kv, dim)
        state[p + "attention.wo.weight"] = w(dim, q)
        state[p + "ffn_norm.weight"] = norm(dim)
        if "moe" in params:
            state[p + "feed_forward.gate.weight"] = w(params["moe"]["num_experts"], dim)
            for e in range(params["moe"]["num_experts"]):
                state[p + f"feed_forward.experts.{e}.w1.weight"] = w(ff, dim)
                state[p + f"feed_forward.experts.{e}.w2.weight"] = w(dim, ff)
                state[p + f"feed_forward.experts.{e}.w3.weight"] = w(ff, dim)
        else:
            state[p + "feed_forward.w1.weight"] = w(ff, dim)
            state[p + "feed_forward.w2.weight"] = w(dim, ff)
            state[p + "feed_forward.w3.weight"] = w(ff, dim)
    state["norm.weight"] = norm(dim)
    if not params.get("tied_embeddings"):
        state["output.weight"] = w(params["vocab_size"], dim)
    return state


def write_torrent(path: Path, params: dict, state: dict, weights: str = "pth", tokenizer: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    if weights == "pth":
        torch.save(state, path / "consolidated.00.pth")
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "consolidated.safetensors"))
    if tokenizer:
        shutil.copy(mistral_tokenizer_path(), path / "tokenizer.model")
    return path


def tiny_torrent(path: Path, arch: str = "mixtral", dtype=torch.bfloat16, weights: str = "pth", seed: int = 0,
                 **shape) -> Path:
    params = tiny_params(arch, **shape)
    return write_torrent(path, params, native_state(params, dtype, seed), weights)

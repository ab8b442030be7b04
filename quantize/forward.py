"""The reference forward of a decoder layer, on plain tensors.

transformers 5 fuses Mixtral's experts into 3-D parameters that forward hooks never see, so calibration runs this
forward instead: RMSNorm, rotary embeddings (Hugging Face's rotate-half order, the canonical layout), grouped-query
attention through scaled_dot_product_attention, the top-k router and SwiGLU experts (or a dense SwiGLU MLP).
Weights are canonical tensors keyed by their name below `model.layers.N.`; tests prove equality with transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixq.convert.architecture import expert_modules
from mixq.convert.spec import ModelSpec

Weights = dict[str, torch.Tensor]
# called with the modules (layer-relative names) that read an input and that input's rows [..., in_features],
# for every matrix multiplication of the layer (the importance matrix watches them; None costs nothing)
Observer = Callable[[tuple[str, ...], torch.Tensor], None]
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@dataclass
class Rotary:
    cos: torch.Tensor   # [T, head_dim]
    sin: torch.Tensor

    @classmethod
    def build(cls, spec: ModelSpec, seqlen: int, device, dtype) -> "Rotary":
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.int64, device=device)
                                              .float() / spec.head_dim))
        freqs = torch.outer(torch.arange(seqlen, device=device).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return cls(emb.cos().to(dtype), emb.sin().to(dtype))

    def apply(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [B, heads, T, head_dim] at positions offset .. offset+T-1."""
        t = x.shape[-2]
        cos, sin = self.cos[offset:offset + t], self.sin[offset:offset + t]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def _attention_mask(t_q: int, t_k: int, window: int | None, device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for queries at the last t_q of t_k positions, with an optional sliding window."""
    windowed = window is not None and t_k > window
    if t_q == t_k and not windowed:
        return None, t_q > 1
    if t_q == 1 and not windowed:
        return None, False
    q = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k = torch.arange(t_k, device=device)[None, :]
    allowed = k <= q
    if windowed:
        allowed &= k > q - window
    return allowed, False


def attention_context(h: torch.Tensor, w: Weights, spec: ModelSpec, rope: Rotary,
                      cache: "KVCache | None" = None, layer: int = 0, observe: Observer | None = None) -> torch.Tensor:
    """The input of o_proj: attention over the normed hidden states h [B, T, H]."""
    if observe is not None:
        observe(QKV, h)
    b, t, _ = h.shape
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = (h @ w["self_attn.q_proj.weight"].T).view(b, t, nh, hd).transpose(1, 2)
    k = (h @ w["self_attn.k_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
    v = (h @ w["self_attn.v_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
    offset = cache.length if cache is not None else 0
    q, k = rope.apply(q, offset), rope.apply(k, offset)
    if cache is not None:
        k, v = cache.append(layer, k, v)
    mask, causal = _attention_mask(t, k.shape[-2], spec.sliding_window, h.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=nh != nkv)
    return out.transpose(1, 2).reshape(b, t, nh * hd)


def expert_forward(h: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   observe: Observer | None = None, modules: tuple[str, str, str] = ()) -> torch.Tensor:
    """SwiGLU; `modules` names (w1, w3, w2) for `observe`."""
    if observe is None:
        return (F.silu(h @ w1.T) * (h @ w3.T)) @ w2.T
    observe(modules[:2], h)
    act = F.silu(h @ w1.T) * (h @ w3.T)
    observe(modules[2:], act)
    return act @ w2.T


def route(h: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' Mixtral routing: softmax in fp32, top-k, renormalised; returns (logits, weights, experts)."""
    logits = h @ router.T
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    weights, experts = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(h.dtype), experts


def moe_forward(h: torch.Tensor, w: Weights, spec: ModelSpec, counts: torch.Tensor | None = None,
                observe: Observer | None = None) -> torch.Tensor:
    """The sparse MoE block on h [N, H]; adds each expert's routed-token count to `counts` when given."""
    if observe is not None:
        observe(("block_sparse_moe.gate",), h)
    _, weights, experts = route(h, w["block_sparse_moe.gate.weight"], spec.experts_per_tok)
    out = torch.zeros_like(h)
    for e in range(spec.num_experts):
        token, slot = torch.where(experts == e)
        if counts is not None:
            counts[e] += token.numel()
        if token.numel() == 0:
            continue
        modules = expert_modules(e)
        w1, w3, w2 = (w[f"{n}.weight"] for n in modules)
        y = expert_forward(h[token], w1, w3, w2, observe, modules) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def mlp_forward(h: torch.Tensor, w: Weights, spec: ModelSpec, counts: torch.Tensor | None = None,
                observe: Observer | None = None) -> torch.Tensor:
    if spec.is_moe:
        shape = h.shape
        return moe_forward(h.reshape(-1, shape[-1]), w, spec, counts, observe).reshape(shape)
    return expert_forward(h, *(w[f"{m}.weight"] for m in DENSE_MLP), observe, DENSE_MLP)


def decoder_layer(x: torch.Tensor, w: Weights, spec: ModelSpec, rope: Rotary, counts: torch.Tensor | None = None,
                  cache: "KVCache | None" = None, layer: int = 0, observe: Observer | None = None) -> torch.Tensor:
    h = rms_norm(x, w["input_layernorm.weight"], spec.rms_norm_eps)
    context = attention_context(h, w, spec, rope, cache, layer, observe)
    if observe is not None:
        observe(("self_attn.o_proj",), context)
    x = x + context @ w["self_attn.o_proj.weight"].T
    h = rms_norm(x, w["post_attention_layernorm.weight"], spec.rms_norm_eps)
    return x + mlp_forward(h, w, spec, counts, observe)


class KVCache:
    """Keys and values of every layer for incremental decoding."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=-2)
            v = torch.cat([self.v[layer], v], dim=-2)
        self.k[layer], self.v[layer] = k, v
        return k, v

"""Tensor names of every layout, as data.

The canonical name of a tensor is the one every published Hugging Face Mixtral/Mistral/Llama repository
uses on disk. Q and K are stored in the canonical (Hugging Face, rotate-half) row order; the torrent and GGUF
layouts use the interleaved order of the original release and are converted by `rope.py`.
"""

from __future__ import annotations

from .architecture import plan
from .spec import ModelSpec

# (canonical, torrent, gguf)
GLOBAL_TENSORS = (
    ("model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight"),
    ("model.norm.weight", "norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight", "output.weight"),
)

# per decoder layer; canonical names below "model.layers.{L}.", torrent below "layers.{L}.", gguf below "blk.{L}."
LAYER_TENSORS = (
    ("input_layernorm.weight", "attention_norm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attention.wq.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attention.wk.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attention.wv.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attention.wo.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight", "ffn_norm.weight"),
)

DENSE_MLP_TENSORS = (
    ("mlp.gate_proj.weight", "feed_forward.w1.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight", "ffn_down.weight"),
)

ROUTER_TENSORS = (
    ("block_sparse_moe.gate.weight", "feed_forward.gate.weight", "ffn_gate_inp.weight"),
)

# per expert: (canonical, torrent, gguf stacked over experts, gguf per expert before April 2024)
EXPERT_TENSORS = (
    ("block_sparse_moe.experts.{E}.w1.weight", "feed_forward.experts.{E}.w1.weight",
     "ffn_gate_exps.weight", "ffn_gate.{E}.weight"),
    ("block_sparse_moe.experts.{E}.w2.weight", "feed_forward.experts.{E}.w2.weight",
     "ffn_down_exps.weight", "ffn_down.{E}.weight"),
    ("block_sparse_moe.experts.{E}.w3.weight", "feed_forward.experts.{E}.w3.weight",
     "ffn_up_exps.weight", "ffn_up.{E}.weight"),
)

# tensors that exist in some checkpoints but carry no weights
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ROTARY = {"self_attn.q_proj.weight": "num_heads", "self_attn.k_proj.weight": "num_kv_heads"}


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the spec implies, in the order writers emit them (shapes from the architecture)."""
    layer_shapes = plan(spec).tensor_shapes
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for layer in range(spec.num_layers):
        p = layer_prefix(layer)
        for name, *_ in _layer_table(spec):
            shapes[p + name] = layer_shapes[name]
    shapes["model.norm.weight"] = (spec.hidden_size,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    return shapes


def _layer_table(spec: ModelSpec):
    rows = list(LAYER_TENSORS)
    if spec.is_moe:
        rows += ROUTER_TENSORS
        rows += [(c.format(E=e), t.format(E=e), None)
                 for e in range(spec.num_experts) for c, t, _, _ in EXPERT_TENSORS]
    else:
        rows += DENSE_MLP_TENSORS
    return rows


def canonical_to_torrent(spec: ModelSpec) -> dict[str, str]:
    """Canonical name -> torrent name for every tensor of the spec."""
    table = {c: t for c, t, _ in GLOBAL_TENSORS}
    for layer in range(spec.num_layers):
        for c, t, _ in _layer_table(spec):
            table[f"model.layers.{layer}.{c}"] = f"layers.{layer}.{t}"
    if spec.tie_word_embeddings:
        del table["lm_head.weight"]
    return table


def rotary_heads(spec: ModelSpec, canonical: str) -> int | None:
    """Number of heads whose rows the rotary permutation reorders in this tensor, or None."""
    for suffix, field in ROTARY.items():
        if canonical.endswith(suffix):
            return getattr(spec, field)
    return None

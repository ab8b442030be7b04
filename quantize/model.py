"""What the engine needs to know about a decoder layer, as data: its linears, which of them share an input, which
are never quantized, and the names each runtime expects."""

from __future__ import annotations

from mixq.convert.names import TRANSFORMERS_EXPERT_NAMES
from mixq.convert.spec import ModelSpec

ATTENTION_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")   # read input_layernorm's output
ATTENTION_OUT = ("self_attn.o_proj",)
DENSE_IN = ("mlp.gate_proj", "mlp.up_proj")                                   # read post_attention_layernorm's
DENSE_OUT = ("mlp.down_proj",)
ROUTER = "block_sparse_moe.gate"       # reads post_attention_layernorm's output too; never quantized
NORMS = ("input_layernorm", "post_attention_layernorm")
EXPERT_NAMINGS = ("classic", "transformers")


def expert_in(e: int) -> tuple[str, str]:
    return f"block_sparse_moe.experts.{e}.w1", f"block_sparse_moe.experts.{e}.w3"


def expert_out(e: int) -> str:
    return f"block_sparse_moe.experts.{e}.w2"


def mlp_in(spec: ModelSpec) -> tuple[str, ...]:
    """The linears that read the post-attention norm: every expert's w1/w3, or the dense gate/up."""
    if spec.is_moe:
        return tuple(n for e in range(spec.num_experts) for n in expert_in(e))
    return DENSE_IN


def linears(spec: ModelSpec) -> tuple[str, ...]:
    """Every quantized linear of a layer, in the order the engine quantizes them."""
    out = DENSE_OUT if not spec.is_moe else tuple(expert_out(e) for e in range(spec.num_experts))
    return ATTENTION_IN + ATTENTION_OUT + mlp_in(spec) + out


def shape(spec: ModelSpec, module: str) -> tuple[int, int]:
    """(out_features, in_features)."""
    h, ff = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if module.endswith(("q_proj",)):
        return q, h
    if module.endswith(("k_proj", "v_proj")):
        return kv, h
    if module.endswith("o_proj"):
        return h, q
    if module.endswith(("gate_proj", "up_proj", ".w1", ".w3")):
        return ff, h
    return h, ff


def output_name(module: str, naming: str) -> str:
    """A layer-relative module name as the chosen runtime reads it.

    classic: block_sparse_moe.experts.E.w1/w2/w3 and block_sparse_moe.gate, the keys vLLM and TGI read and every
    published Mixtral repository uses. transformers: mlp.experts.E.gate_proj/up_proj/down_proj and mlp.gate, the
    names transformers 5 (defused) and GPTQModel load.
    """
    if naming == "classic" or not module.startswith("block_sparse_moe."):
        return module
    if module == ROUTER:
        return "mlp.gate"
    _, _, e, proj = module.split(".")
    return f"mlp.experts.{e}.{TRANSFORMERS_EXPERT_NAMES[proj]}"


def unquantized(spec: ModelSpec) -> tuple[str, ...]:
    """Layer tensors kept in floating point (layer-relative names with .weight)."""
    names = tuple(f"{n}.weight" for n in NORMS)
    return names + ((f"{ROUTER}.weight",) if spec.is_moe else ())

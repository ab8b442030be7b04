"""What a decoder layer is made of, as one table: its linears with their shapes and the activation each reads,
the tensors never quantized, the spellings each runtime reads, and the scale groups AWQ folds.

Everything that needs the structure of a layer derives it from here: the expected shapes of a checkpoint, the
quantization engine's order and its Hessian sharing (linears that read one activation share one), AWQ's smoothing
groups (in the spirit of llm-compressor's AWQ mappings), the quantized-repository reader and the name mappers.
A new block kind (another MoE, say) is a new row set here, not a new branch in five files.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .spec import ModelSpec

# activations a linear reads; an expert's own activation is numbered: "expert_act.3"
ATTN_NORM = "attn_norm"          # input_layernorm's output
ATTN_CONTEXT = "attn_context"    # attention's output, before o_proj
MLP_NORM = "mlp_norm"            # post_attention_layernorm's output
MLP_ACT = "mlp_act"              # silu(gate(x)) * up(x) of the dense MLP
EXPERT_ACT = "expert_act.{E}"    # the same inside expert E
STAGES = (ATTN_NORM, ATTN_CONTEXT, MLP_NORM, MLP_ACT, EXPERT_ACT)   # the order a layer computes them

# (module, out features, in features, the activation it reads); dimensions by name, see LayerPlan.dims
ATTENTION = (
    ("self_attn.q_proj", "q", "h", ATTN_NORM),
    ("self_attn.k_proj", "kv", "h", ATTN_NORM),
    ("self_attn.v_proj", "kv", "h", ATTN_NORM),
    ("self_attn.o_proj", "h", "q", ATTN_CONTEXT),
)
DENSE_MLP = (
    ("mlp.gate_proj", "ff", "h", MLP_NORM),
    ("mlp.up_proj", "ff", "h", MLP_NORM),
    ("mlp.down_proj", "h", "ff", MLP_ACT),
)
EXPERT = (   # per expert E: w1 the gate, w3 the up projection, w2 the down projection
    ("block_sparse_moe.experts.{E}.w1", "ff", "h", MLP_NORM),
    ("block_sparse_moe.experts.{E}.w3", "ff", "h", MLP_NORM),
    ("block_sparse_moe.experts.{E}.w2", "h", "ff", EXPERT_ACT),
)
ROUTER = "block_sparse_moe.gate"           # [experts, h]; reads MLP_NORM, never quantized
NORMS = ("input_layernorm", "post_attention_layernorm")

# where AWQ folds 1/s for the readers of an activation: into a norm's weight, or into the rows of the linear that
# produces the activation (o's input comes from v; a down projection's from its up projection)
MADE_BY = {ATTN_NORM: ("input_layernorm", "norm"), ATTN_CONTEXT: ("self_attn.v_proj", "rows"),
           MLP_NORM: ("post_attention_layernorm", "norm"), MLP_ACT: ("mlp.up_proj", "rows"),
           EXPERT_ACT: ("block_sparse_moe.experts.{E}.w3", "rows")}
# the key each smoothing group is reported under (report.json's awq_scale_ratio)
SMOOTHING_KEYS = {ATTN_NORM: "attn", ATTN_CONTEXT: "o", MLP_NORM: "mlp", MLP_ACT: "down", EXPERT_ACT: "down{E}"}

# Mixtral's MoE as transformers 5 (defused) and GPTQModel spell it; "classic" is the canonical spelling
TRANSFORMERS_SPELLING = (
    (ROUTER, "mlp.gate"),
    ("block_sparse_moe.experts.{E}.w1", "mlp.experts.{E}.gate_proj"),
    ("block_sparse_moe.experts.{E}.w3", "mlp.experts.{E}.up_proj"),
    ("block_sparse_moe.experts.{E}.w2", "mlp.experts.{E}.down_proj"),
)
EXPERT_NAMINGS = ("classic", "transformers")


@dataclass(frozen=True)
class Linear:
    module: str                      # layer-relative, canonical: "self_attn.q_proj", "block_sparse_moe.experts.3.w2"
    shape: tuple[int, int]           # (out_features, in_features)
    reads: str                       # the activation it multiplies, expert-numbered
    expert: int | None = None


@dataclass(frozen=True)
class Smoothing:
    """One AWQ scale group: the linears reading one activation get s in their columns; 1/s folds into `before`
    (a norm's weight, or the rows of the linear making the activation); `also` are unquantized readers that may
    take s too (the router), so the layer computes the same function."""
    key: str
    reads: str
    linears: tuple[str, ...]
    before: str
    into: str                        # "norm" | "rows"
    also: tuple[str, ...] = ()


def _numbered(template: str, e: int | None) -> str:
    return template if e is None else template.replace("{E}", str(e))


class LayerPlan:
    """The structure of every decoder layer of one model."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.dims = {"h": spec.hidden_size, "q": spec.num_heads * spec.head_dim,
                     "kv": spec.num_kv_heads * spec.head_dim, "ff": spec.intermediate_size}
        rows = [(m, o, i, r, None) for m, o, i, r in ATTENTION]
        if spec.is_moe:
            rows += [(_numbered(m, e), o, i, _numbered(r, e), e)
                     for e in range(spec.num_experts) for m, o, i, r in EXPERT]
        else:
            rows += [(m, o, i, r, None) for m, o, i, r in DENSE_MLP]
        stage = {_numbered(s, e): n for n, s in enumerate(STAGES) for e in range(max(spec.num_experts, 1))}
        rows.sort(key=lambda row: stage[row[3]])  # stable: the order the engine quantizes them
        self.linears = tuple(Linear(m, (self.dims[o], self.dims[i]), r, e) for m, o, i, r, e in rows)
        self._by_module = {lin.module: lin for lin in self.linears}

    def linear(self, module: str) -> Linear:
        """A quantized linear by its layer-relative name; an unknown name is a KeyError, never a guess."""
        return self._by_module[module]

    def shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features)."""
        return self.linear(module).shape

    @functools.cached_property
    def modules(self) -> tuple[str, ...]:
        return tuple(lin.module for lin in self.linears)

    @functools.cached_property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Activation -> the linears reading it, in the order they are computed: the linears that share an input
        (and so a GPTQ Hessian and an AWQ scale)."""
        groups: dict[str, tuple[str, ...]] = {}
        for lin in self.linears:
            groups[lin.reads] = groups.get(lin.reads, ()) + (lin.module,)
        return groups

    def gate_up(self, reads: str) -> tuple[str, str]:
        """The (gate, up) linears whose silu(gate(h)) * up(h) is the activation `reads` (a down projection's input)."""
        expert = self.linear(self.groups[reads][0]).expert
        return tuple(lin.module for lin in self.linears if lin.reads == MLP_NORM and lin.expert == expert)

    @functools.cached_property
    def unquantized(self) -> tuple[str, ...]:
        """Layer tensors kept in floating point (layer-relative names with .weight)."""
        return tuple(f"{n}.weight" for n in NORMS) + ((f"{ROUTER}.weight",) if self.spec.is_moe else ())

    @functools.cached_property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of a layer (layer-relative names with .weight) -> its shape."""
        shapes: dict[str, tuple[int, ...]] = {f"{n}.weight": (self.spec.hidden_size,) for n in NORMS}
        if self.spec.is_moe:
            shapes[f"{ROUTER}.weight"] = (self.spec.num_experts, self.spec.hidden_size)
        shapes.update({f"{lin.module}.weight": lin.shape for lin in self.linears})
        return shapes

    @functools.cached_property
    def smoothings(self) -> tuple[Smoothing, ...]:
        """AWQ's scale groups, in search order. o is smoothed after v only when v's rows can take the scale of o's
        columns and the shapes agree (AutoAWQ's test: never with grouped-query attention)."""
        out = []
        for reads, modules in self.groups.items():
            expert = self.linear(modules[0]).expert
            template = next(s for s in STAGES if _numbered(s, expert) == reads)
            before, into = MADE_BY[template]
            before = _numbered(before, expert)
            if reads == ATTN_CONTEXT and self.shape("self_attn.v_proj") != self.shape("self_attn.o_proj"):
                continue
            also = (ROUTER,) if reads == MLP_NORM and self.spec.is_moe else ()
            out.append(Smoothing(_numbered(SMOOTHING_KEYS[template], expert), reads, modules, before, into, also))
        return tuple(out)


@functools.lru_cache(maxsize=32)
def plan(spec: ModelSpec) -> LayerPlan:
    return LayerPlan(spec)


def expert_modules(e: int) -> tuple[str, str, str]:
    """(w1, w3, w2) of expert e: gate, up, down."""
    return tuple(_numbered(m, e) for m, *_ in EXPERT)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{E\}", r"(?P<E>\d+)") + "$")


_TO_TRANSFORMERS = tuple((_pattern(c), t) for c, t in TRANSFORMERS_SPELLING)
_FROM_TRANSFORMERS = tuple((_pattern(t), c) for c, t in TRANSFORMERS_SPELLING)


def _respell(module: str, table) -> str | None:
    for pattern, template in table:
        if m := pattern.match(module):
            return template.replace("{E}", m["E"]) if "E" in pattern.groupindex else template
    return None


def spelled(module: str, naming: str) -> str:
    """A layer-relative module name as the chosen runtime reads it.

    classic: block_sparse_moe.experts.E.w1/w2/w3 and block_sparse_moe.gate, the keys vLLM and TGI read and every
    published Mixtral repository uses. transformers: mlp.experts.E.gate_proj/up_proj/down_proj and mlp.gate, the
    names transformers 5 (defused) and GPTQModel load.
    """
    if naming == "classic":
        return module
    return _respell(module, _TO_TRANSFORMERS) or module


def canonical_module(module: str) -> str | None:
    """The classic spelling of a transformers-spelled MoE module, or None when `module` is not one."""
    return _respell(module, _FROM_TRANSFORMERS)


def naming_of(layer_modules) -> str:
    """Which spelling a set of layer-relative names (with or without .weight and suffixes) uses."""
    for name in layer_modules:
        parts = name.split(".")
        for end in range(len(parts), 1, -1):
            if canonical_module(".".join(parts[:end])):
                return "transformers"
    return "classic"

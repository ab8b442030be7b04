"""The hyper-parameters of a checkpoint, independent of its layout."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import MixqError

ARCHITECTURES = ("mixtral", "mistral", "llama")
# Upper bounds no real decoder reaches (Llama-3.1-405B: 126 layers, hidden 16384, 128 heads; vocabularies of
# 262k): a config beyond them is refused before anything is sized from it (a billion layers would allocate).
LIMITS = {"hidden_size": 1 << 17, "num_layers": 1 << 10, "num_heads": 1 << 10, "num_kv_heads": 1 << 10,
          "head_dim": 1 << 12, "intermediate_size": 1 << 20, "vocab_size": 1 << 23, "num_experts": 1 << 10,
          "max_position_embeddings": 1 << 30}


def integer(value):
    """A JSON integer (or integral float) as int; anything else unchanged, for `validate` to name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def per_head(hidden, heads):
    """The default head_dim, hidden / heads, or None (for `validate` to name) when either is not a count."""
    return hidden // heads if _is_int(hidden) and _is_int(heads) and hidden > 0 and heads > 0 else None


def number(value):
    """A JSON number as float; anything else unchanged, for `validate` to name."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None = None
    num_experts: int = 0
    experts_per_tok: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def replace(self, **changes) -> "ModelSpec":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self, where: str) -> "ModelSpec":
        """Refuse hyper-parameters no Mixtral/Mistral/Llama decoder can have; `where` names the file."""
        if self.arch not in ARCHITECTURES:
            raise MixqError(f"{where}: unknown architecture {self.arch!r} (supported: {', '.join(ARCHITECTURES)})")
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise MixqError(f"{where}: {field} must be a positive integer, got {value!r}")
        for field in ("num_experts", "experts_per_tok"):
            if not _is_int(getattr(self, field)) or getattr(self, field) < 0:
                raise MixqError(f"{where}: {field} must be a non-negative integer, got {getattr(self, field)!r}")
        for field, limit in LIMITS.items():
            if getattr(self, field) > limit:
                raise MixqError(f"{where}: {field} {getattr(self, field)} is over {limit}; no such model exists")
        for field, value in (("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta)):
            if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                raise MixqError(f"{where}: {field} must be a positive finite number, got {value!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise MixqError(f"{where}: sliding_window must be a positive integer or null, "
                            f"got {self.sliding_window!r}")
        for field in ("bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value < 0):
                raise MixqError(f"{where}: {field} must be a token id or null, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise MixqError(f"{where}: {self.num_heads} attention heads are not a multiple of "
                            f"{self.num_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise MixqError(f"{where}: head_dim {self.head_dim} is odd; rotary embeddings need pairs")
        if self.is_moe and not 0 < self.experts_per_tok <= self.num_experts:
            raise MixqError(f"{where}: experts per token {self.experts_per_tok} must be between 1 and "
                            f"{self.num_experts} experts")
        if (self.arch == "mixtral") != self.is_moe:
            raise MixqError(f"{where}: architecture {self.arch!r} with {self.num_experts} experts is inconsistent")
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

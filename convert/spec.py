"""The hyper-parameters of a checkpoint, independent of its layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import MixqError

ARCHITECTURES = ("mixtral", "mistral", "llama")


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
                      "intermediate_size", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise MixqError(f"{where}: {field} must be a positive integer, got {value!r}")
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

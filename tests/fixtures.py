"""Real material shipped in PyPI packages (nothing of it is stored in this repository)."""

from __future__ import annotations

from pathlib import Path


def mistral_tokenizer_path() -> Path:
    """Mixtral-8x7B's own tokenizer, as mistral-common ships it."""
    import mistral_common
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

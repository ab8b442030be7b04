"""Calibration and evaluation text: Hub datasets, built-in public-domain texts, local files; token blocks."""

from .blocks import Blocks, load_tokenizer, prepare, sample_blocks
from .sources import BUILTIN, PRESETS, Texts, load_texts

__all__ = ["BUILTIN", "Blocks", "PRESETS", "Texts", "load_texts", "load_tokenizer", "prepare", "sample_blocks"]

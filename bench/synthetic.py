"""Synthetic Mixtral-shaped HF checkpoints for the benchmarks: random weights, real shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FULL = {"hidden": 4096, "ffn": 14336, "experts": 8, "heads": 32, "kv_heads": 8}   # Mixtral-8x7B
SMALL = {"hidden": 1024, "ffn": 3584, "experts": 8, "heads": 8, "kv_heads": 2}    # for CPU runs


def build(path: Path, layers: int, hidden: int, ffn: int, experts: int, heads: int, kv_heads: int,
          dtype=torch.bfloat16, vocab: int = 32000) -> Path:
    """An HF Mixtral folder (model.safetensors, config.json, the Mixtral tokenizer when mistral-common is there)."""
    from mixq.convert.hf import config_from_spec, write_json
    from mixq.convert.names import expected_shapes
    from mixq.convert.safetensors_io import SafetensorsWriter
    from mixq.convert.spec import ModelSpec
    spec = ModelSpec(arch="mixtral", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=hidden // heads, intermediate_size=ffn, vocab_size=vocab, rms_norm_eps=1e-5,
                     rope_theta=1e6, max_position_embeddings=32768, num_experts=experts, experts_per_tok=2)
    config = config_from_spec(spec, dtype)
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == config:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shapes = expected_shapes(spec)
    g = torch.Generator().manual_seed(0)
    with SafetensorsWriter(path / "model.safetensors", [(n, s, dtype) for n, s in shapes.items()]) as writer:
        for name, shape in shapes.items():
            if len(shape) == 1:
                writer.write(name, torch.ones(shape, dtype=dtype))
            else:
                writer.write(name, (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype))
    write_json(path / "config.json", config)
    try:
        import mistral_common

        from mixq.convert.tokenizer import MISTRAL_V1_CHAT_TEMPLATE, Vocab
        model = Path(mistral_common.__file__).parent / "data/tokenizer.model.v1"
        for name, data in Vocab.from_sp_model(model.read_bytes(), str(model),
                                              MISTRAL_V1_CHAT_TEMPLATE).hf_files_out().items():
            (path / name).write_bytes(data)
    except ImportError:
        pass
    return path


def random_blocks(samples: int, seqlen: int, seed: int = 1):
    from mixq.calibration import Blocks
    g = torch.Generator().manual_seed(seed)
    return Blocks(torch.randint(3, 32000, (samples, seqlen), generator=g),
                  {"source": "random tokens", "samples": samples, "seqlen": seqlen, "tokens": samples * seqlen})

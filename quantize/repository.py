"""AWQ and GPTQ repositories read back as canonical tensors: each quantized linear dequantized from its packed
tensors, so the reference forward (and everything built on checkpoints) runs them unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixq.convert.checkpoint import Checkpoint, TensorRef
from mixq.convert.errors import MixqError
from mixq.convert.hf import file_refs, spec_from_config, weight_files
from mixq.convert.jsonfile import read_json
from mixq.convert.tokenizer import Vocab

from . import model as arch
from .formats import DEQUANTIZERS, SUFFIXES, packed_shapes
from .quantizer import Scheme
from .runner import bits_problem


def quantization_method(path: Path) -> str | None:
    """'awq' or 'gptq' when `path` is such a repository."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if method in DEQUANTIZERS else None


def read_quantized(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    path = Path(path)
    config = read_json(path / "config.json")
    qc = config.get("quantization_config") or {}
    fmt = qc.get("quant_method")
    if fmt not in DEQUANTIZERS:
        raise MixqError(f"{path / 'config.json'}: quant_method {fmt!r} is not one mixq reads (awq, gptq)")
    if fmt == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise MixqError(f"{path}: AWQ version {qc.get('version')!r}; only GEMM is read")
    bits = qc.get("bits", qc.get("w_bit", 4))
    group_size = qc.get("group_size", qc.get("q_group_size", 128))
    if bits_problem(fmt, bits):
        raise MixqError(f"{path / 'config.json'}: bits {bits_problem(fmt, bits)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size == 0 or group_size < -1:
        raise MixqError(f"{path / 'config.json'}: group_size {group_size!r} is not a positive integer or -1")
    spec = spec_from_config({k: v for k, v in config.items() if k != "quantization_config"}, path / "config.json")
    raw: dict[str, TensorRef] = {}
    for file in weight_files(path):
        raw.update(file_refs(file))
    naming = "transformers" if any(".mlp.experts." in n or n.endswith(".mlp.gate.weight") for n in raw) \
        else "classic"
    tensors: dict[str, TensorRef] = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in raw:
            tensors[name] = _float(raw[name], name, dtype)
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        for weight in arch.unquantized(spec):
            module = weight[: -len(".weight")]
            stored = f"{prefix}{arch.output_name(module, naming)}.weight"
            tensors[prefix + weight] = _float(_need(raw, stored, path), prefix + weight, dtype)
        for module in arch.linears(spec):
            stored = prefix + arch.output_name(module, naming)
            parts = {s: _need(raw, f"{stored}.{s}", path) for s in SUFFIXES[fmt]}
            _check_packed(parts, fmt, bits, group_size, arch.shape(spec, module), path)
            tensors[f"{prefix}{module}.weight"] = _dequantized(parts, fmt, bits, arch.shape(spec, module), dtype)
    order = ["model.embed_tokens.weight"] + [n for n in tensors if n.startswith("model.layers.")] + \
        [n for n in ("model.norm.weight", "lm_head.weight") if n in tensors]
    generation = path / "generation_config.json"
    return Checkpoint(layout=f"hf-{fmt}", path=path, spec=spec, tensors={n: tensors[n] for n in order},
                      vocab=Vocab.from_hf_dir(path),
                      generation_config=read_json(generation, missing_ok=True),
                      source_config=config, files=weight_files(path))


def _need(raw: dict[str, TensorRef], name: str, path: Path) -> TensorRef:
    if name not in raw:
        raise MixqError(f"{path}: missing tensor {name}")
    return raw[name]


def _check_packed(parts: dict[str, TensorRef], fmt: str, bits: int, group_size: int, shape: tuple[int, int],
                  path: Path) -> None:
    """Packed tensors as the config's bits and group size imply, refused on open rather than mid-evaluation."""
    out_features, in_features = shape
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise MixqError(f"{path / 'config.json'}: group_size {group_size} does not divide in_features "
                        f"{in_features} of {parts['qweight'].source}")
    for suffix, (expected, dtype) in packed_shapes(fmt, out_features, in_features, Scheme(bits, group)).items():
        ref = parts[suffix]
        if ref.shape != expected or (dtype == torch.int32 and ref.dtype != torch.int32):
            raise MixqError(f"{ref.source}: {list(ref.shape)} {str(ref.dtype).replace('torch.', '')} contradicts "
                            f"config.json ({bits}-bit, group {group_size}), which implies {list(expected)} "
                            f"{str(dtype).replace('torch.', '')}")


def _float(ref: TensorRef, canonical: str, dtype: torch.dtype) -> TensorRef:
    return TensorRef(shape=ref.shape, dtype=dtype, stored=ref.stored, source=ref.source,
                     load=lambda: ref.load().to(dtype), release=ref.release, nbytes=ref.nbytes)


def _dequantized(parts: dict[str, TensorRef], fmt: str, bits: int, shape: tuple[int, int],
                 dtype: torch.dtype) -> TensorRef:
    def load() -> torch.Tensor:
        weight = DEQUANTIZERS[fmt]({s: ref.load() for s, ref in parts.items()}, bits).to(dtype)
        if tuple(weight.shape) != shape:
            raise MixqError(f"{parts['qweight'].source}: unpacks to {list(weight.shape)}, expected {list(shape)}")
        return weight

    def release() -> None:
        for ref in parts.values():
            ref.release()

    return TensorRef(shape=shape, dtype=dtype, stored=f"{fmt.upper()}-{bits}bit", source=parts["qweight"].source,
                     load=load, release=release, nbytes=sum(r.nbytes for r in parts.values()))

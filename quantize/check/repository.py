"""AWQ and GPTQ repositories read back as canonical tensors: each quantized linear dequantized from its packed
tensors, so the reference forward (and everything built on checkpoints) runs them unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from mixq.convert.architecture import naming_of, plan, spelled
from mixq.convert.checkpoint import Checkpoint, TensorRef, torch_name
from mixq.convert.errors import MixqError
from mixq.convert.hf import file_refs, spec_from_config, weight_files
from mixq.convert.jsonfile import read_json
from mixq.convert.tokenizer import Vocab

from ..formats import FORMATS, Format
from ..quantizer import Scheme


def quantization_method(path: Path) -> str | None:
    """'awq' or 'gptq' when `path` is such a repository."""
    try:
        config = read_json(path / "config.json", missing_ok=True) or {}
    except MixqError:   # not this reader's to judge: opening the folder as a checkpoint says what is wrong
        return None
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if method in FORMATS else None


def read_quantized(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    path = Path(path)
    config = read_json(path / "config.json")
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in FORMATS:
        raise MixqError(f"{path / 'config.json'}: quant_method {method!r} is not one mixq reads ({', '.join(FORMATS)})")
    fmt = FORMATS[method]
    bits, group_size = fmt.read_config(qc, path / "config.json")
    spec = spec_from_config({k: v for k, v in config.items() if k != "quantization_config"}, path / "config.json")
    raw: dict[str, TensorRef] = {}
    for file in weight_files(path):
        raw.update(file_refs(file))
    naming = naming_of(n.split(".", 3)[3] for n in raw if n.startswith("model.layers."))
    layer_plan = plan(spec)
    tensors: dict[str, TensorRef] = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in raw:
            tensors[name] = _float(raw[name], name, dtype)
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        for weight in layer_plan.unquantized:
            stored = prefix + spelled(weight.removesuffix(".weight"), naming) + ".weight"
            tensors[prefix + weight] = _float(_need(raw, stored, path), prefix + weight, dtype)
        for lin in layer_plan.linears:
            stored = prefix + spelled(lin.module, naming)
            parts = {s: _need(raw, f"{stored}.{s}", path) for s in fmt.suffixes}
            _check_packed(parts, fmt, bits, group_size, lin.shape, path)
            tensors[f"{prefix}{lin.module}.weight"] = _dequantized(parts, fmt, bits, lin.shape, dtype)
    order = ["model.embed_tokens.weight"] + [n for n in tensors if n.startswith("model.layers.")] + \
        [n for n in ("model.norm.weight", "lm_head.weight") if n in tensors]
    generation = path / "generation_config.json"
    return Checkpoint(layout=f"hf-{fmt.name}", path=path, spec=spec, tensors={n: tensors[n] for n in order},
                      vocab=Vocab.from_hf_dir(path),
                      generation_config=read_json(generation, missing_ok=True),
                      source_config=config, files=weight_files(path))


def _need(raw: dict[str, TensorRef], name: str, path: Path) -> TensorRef:
    if name not in raw:
        raise MixqError(f"{path}: missing tensor {name}")
    return raw[name]


def _check_packed(parts: dict[str, TensorRef], fmt: Format, bits: int, group_size: int, shape: tuple[int, int],
                  path: Path) -> None:
    """Packed tensors as the config's bits and group size imply, refused on open rather than mid-evaluation."""
    out_features, in_features = shape
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise MixqError(f"{path / 'config.json'}: group_size {group_size} does not divide in_features "
                        f"{in_features} of {parts['qweight'].source}")
    for suffix, (expected, dtype) in fmt.shapes(out_features, in_features, Scheme(bits, group)).items():
        ref = parts[suffix]
        if ref.shape != expected or (dtype == torch.int32 and ref.dtype != torch.int32):
            raise MixqError(f"{ref.source}: {list(ref.shape)} {torch_name(ref.dtype)} contradicts "
                            f"config.json ({bits}-bit, group {group_size}), which implies {list(expected)} "
                            f"{torch_name(dtype)}")


def _float(ref: TensorRef, canonical: str, dtype: torch.dtype) -> TensorRef:
    return TensorRef(shape=ref.shape, dtype=dtype, stored=ref.stored, source=ref.source,
                     load=lambda: ref.load().to(dtype), release=ref.release, nbytes=ref.nbytes)


def _dequantized(parts: dict[str, TensorRef], fmt: Format, bits: int, shape: tuple[int, int],
                 dtype: torch.dtype) -> TensorRef:
    def unpack(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = fmt.unpack(tensors, bits).to(dtype)
        if tuple(weight.shape) != shape:
            raise MixqError(f"{parts['qweight'].source}: unpacks to {list(weight.shape)}, expected {list(shape)}")
        return weight

    def load() -> torch.Tensor:
        return unpack({s: ref.load() for s, ref in parts.items()})

    def release() -> None:
        for ref in parts.values():
            ref.release()

    return TensorRef(shape=shape, dtype=dtype, stored=f"{fmt.name.upper()}-{bits}bit", source=parts["qweight"].source,
                     load=load, release=release, nbytes=sum(r.nbytes for r in parts.values()), packed=parts,
                     unpack=unpack)

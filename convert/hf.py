"""The Hugging Face layout: config.json, sharded safetensors with an index, tokenizer and generation config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import pth_io
from .architecture import canonical_module
from .checkpoint import DTYPE_LABELS, Checkpoint, TensorRef, checked_tensors, torch_name
from .errors import MixqError
from .jsonfile import read_json
from .names import IGNORED_SUFFIXES
from .progress import bar
from .safetensors_io import DTYPE_NAMES, SafetensorsFile, SafetensorsWriter, tensor_nbytes
from .spec import ModelSpec, integer, number, per_head
from .tokenizer import Vocab

HF_CLASSES = {"mixtral": "MixtralForCausalLM", "mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}
INDEX = "model.safetensors.index.json"

_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER_WEIGHT = re.compile(r"^(model\.layers\.\d+\.)(.+)\.weight$")


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))


def spec_from_config(config: dict, where: Path) -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in HF_CLASSES:
        raise MixqError(f"{where}: unsupported architecture model_type={model_type!r} "
                        f"(supported: {', '.join(HF_CLASSES)})")
    for key in ("quantization_config", "rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise MixqError(f"{where}: {key} must be an object, got {config[key]!r}")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise MixqError(f"{where}: this is a {method}-quantized checkpoint; convert reads unquantized weights "
                        f"(mixq check reads quantized ones)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise MixqError(f"{where}: {flag}=true is not supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise MixqError(f"{where}: rope type {rope_type!r} is not supported (only the default rotary embedding)")
    rope_theta = config.get("rope_theta", rope.get("rope_theta"))
    try:
        heads = integer(config["num_attention_heads"])
        hidden = integer(config["hidden_size"])
        spec = ModelSpec(
            arch=model_type, hidden_size=hidden, num_layers=integer(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=integer(config.get("num_key_value_heads") or heads),
            head_dim=integer(config.get("head_dim") or per_head(hidden, heads)),
            intermediate_size=integer(config["intermediate_size"]), vocab_size=integer(config["vocab_size"]),
            rms_norm_eps=number(config.get("rms_norm_eps", 1e-6 if model_type == "llama" else 1e-5)),
            rope_theta=number(rope_theta if rope_theta is not None else (1e6 if model_type == "mixtral" else 1e4)),
            max_position_embeddings=integer(config.get("max_position_embeddings", 32768)),
            sliding_window=config.get("sliding_window") if model_type != "llama" else None,
            num_experts=integer(config.get("num_local_experts", 0)) if model_type == "mixtral" else 0,
            experts_per_tok=integer(config.get("num_experts_per_tok", 0)) if model_type == "mixtral" else 0,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_token_id=config.get("bos_token_id"), eos_token_id=_first(config.get("eos_token_id")))
    except KeyError as exc:
        raise MixqError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise MixqError(f"{where}: bad value ({exc})") from None
    return spec.validate(str(where))


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def config_from_spec(spec: ModelSpec, dtype: torch.dtype, base: dict | None = None) -> dict:
    """config.json for the spec; keys of `base` (the source's config) that the spec does not cover are kept."""
    dtype_name = torch_name(dtype) if dtype in DTYPE_LABELS else "float32"
    config = {
        "architectures": [HF_CLASSES[spec.arch]], "model_type": spec.arch,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "hidden_act": "silu", "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_theta": spec.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": spec.tie_word_embeddings, "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    if spec.arch in ("mistral", "mixtral"):
        config["sliding_window"] = spec.sliding_window
    if spec.arch == "mixtral":
        config.update(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_tok,
                      output_router_logits=False, router_aux_loss_coef=0.02, router_jitter_noise=0.0)
    if spec.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    kept = {k: v for k, v in (base or {}).items()
            if k not in config and k not in ("rope_scaling", "transformers_version", "_name_or_path")}
    return {**config, **kept}


def generation_config(spec: ModelSpec) -> dict:
    return {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id}


# ---- reading ------------------------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    """The weight files of an HF folder, checked against the index when there is one."""
    index_path = path / INDEX
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MixqError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()), key=str)
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise MixqError(f"{index_path}: weight_map names {name!r}; entries must be file names in "
                                f"this folder")
            if not (path / name).is_file():
                raise MixqError(f"{path / name}: missing (named in {INDEX})")
        return [path / name for name in files]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise MixqError(f"{path}: no *.safetensors weights")
    return files


def read_hf(path: Path) -> Checkpoint:
    config = read_json(path / "config.json")
    spec = spec_from_config(config, path / "config.json")
    files = weight_files(path)
    found: dict[str, TensorRef] = {}

    def add(canonical: str, ref: TensorRef) -> None:
        if canonical in found:
            raise MixqError(f"{ref.source}: duplicate of {found[canonical].source}")
        found[canonical] = ref

    for file in files:
        for raw_name, ref in file_refs(file).items():
            if raw_name.endswith(IGNORED_SUFFIXES):
                continue
            fused = _FUSED.match(raw_name)
            if fused:
                for canonical, sub in _unfuse(spec, int(fused.group(1)), fused.group(2), ref):
                    add(canonical, sub)
            else:
                add(_canonical(raw_name, spec), ref)
    if spec.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some exporters write the tied copy too
    generation = path / "generation_config.json"
    return Checkpoint(layout="hf", path=path, spec=spec, tensors=checked_tensors(spec, found, path),
                      vocab=Vocab.from_hf_dir(path),
                      generation_config=read_json(generation, missing_ok=True),
                      source_config=config, files=files)


def _canonical(raw: str, spec: ModelSpec) -> str:
    """Router and expert names of transformers 5 (and defused GPTQModel repos) -> the classic names."""
    if spec.is_moe and (m := _LAYER_WEIGHT.match(raw)) and (module := canonical_module(m[2])):
        return f"{m[1]}{module}.weight"
    return raw


def file_refs(file: Path) -> dict[str, TensorRef]:
    if file.suffix == ".safetensors":
        st = SafetensorsFile(file)
        return {name: TensorRef(shape=e.shape, dtype=e.dtype, stored=DTYPE_NAMES[e.dtype], source=f"{file}: {name}",
                                load=lambda n=name: st.get(n), release=lambda n=name: st.release(n),
                                nbytes=e.end - e.begin)
                for name, e in st.entries.items()}
    state = pth_io.load_state_dict(file)
    return {name: TensorRef(shape=tuple(t.shape), dtype=t.dtype, stored=DTYPE_NAMES.get(t.dtype, str(t.dtype)),
                            source=f"{file}: {name}", load=lambda t=t: t, release=lambda t=t: pth_io.release(t),
                            nbytes=t.numel() * t.element_size())
            for name, t in state.items()}


def _unfuse(spec: ModelSpec, layer: int, kind: str, ref: TensorRef):
    """transformers 5's stacked experts -> per-expert canonical tensors (views, no copy)."""
    e_count, ff, h = spec.num_experts, spec.intermediate_size, spec.hidden_size
    expected = (e_count, 2 * ff, h) if kind == "gate_up_proj" else (e_count, h, ff)
    if ref.shape != expected:
        raise MixqError(f"{ref.source}: shape {list(ref.shape)} contradicts the configuration, "
                        f"which implies {list(expected)}")
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    parts = ((("w1", slice(0, ff)), ("w3", slice(ff, 2 * ff))) if kind == "gate_up_proj"
             else (("w2", slice(None)),))
    for e in range(e_count):
        for proj, rows in parts:
            shape = (ff, h) if proj != "w2" else (h, ff)
            yield f"{prefix}.{e}.{proj}.weight", TensorRef(
                shape=shape, dtype=ref.dtype, stored=ref.stored, source=f"{ref.source}[{e}]",
                load=lambda e=e, rows=rows: ref.load()[e, rows], release=ref.release,
                nbytes=ref.nbytes // e_count // len(parts))


# ---- writing ------------------------------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, as transformers reads max_shard_size; 'GiB' units are binary."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise MixqError(f"cannot read size {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def shard_plan(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int):
    """Consecutive groups of tensors of at most `max_bytes` each (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for entry in entries:
        n = tensor_nbytes(entry[1], entry[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_safetensors_shards(out: Path, entries, produce, max_bytes: int, metadata: dict | None = None,
                             desc: str = "writing", done=None) -> dict:
    """Write `entries` (name, shape, dtype) into shards, each tensor from `produce(name)`, calling `done(name)`
    once it is written; returns the index."""
    shards = shard_plan(entries, max_bytes)
    names = shard_names(len(shards))
    weight_map, total = {}, 0
    with bar(total=sum(tensor_nbytes(s, d) for _, s, d in entries), desc=desc, unit="B", unit_scale=True) as pbar:
        for shard, file_name in zip(shards, names):
            with SafetensorsWriter(out / file_name, shard, metadata) as writer:
                for name, shape, dtype in shard:
                    writer.write(name, produce(name))
                    if done is not None:
                        done(name)
                    weight_map[name] = file_name
                    total += tensor_nbytes(shape, dtype)
                    pbar.update(tensor_nbytes(shape, dtype))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if len(shards) > 1:
        write_json(out / INDEX, index)
    return index


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer_files(out: Path, vocab: Vocab | None) -> list[str]:
    if vocab is None:
        return []
    files = vocab.hf_files_out()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return sorted(files)


def write_hf(ckpt: Checkpoint, out: Path, dtype: torch.dtype | None, shard_size: int) -> dict:
    """Write `ckpt` as an HF folder into `out` (an empty staging folder)."""
    entries = [(name, ref.shape, dtype or ref.dtype) for name, ref in ckpt.tensors.items()]

    def produce(name: str) -> torch.Tensor:
        return ckpt.get(name).to(dtype or ckpt.tensors[name].dtype).contiguous()

    index = write_safetensors_shards(out, entries, produce, shard_size, done=ckpt.release)
    base = ckpt.source_config if ckpt.layout == "hf" else None
    write_json(out / "config.json", config_from_spec(ckpt.spec, dtype or ckpt.main_dtype(), base))
    write_json(out / "generation_config.json", ckpt.generation_config or generation_config(ckpt.spec))
    tokenizer = write_tokenizer_files(out, ckpt.vocab)
    return {"tensors": len(entries), "bytes": index["metadata"]["total_size"],
            "shards": len(set(index["weight_map"].values())), "tokenizer": tokenizer}

"""The original Mistral release layout: params.json, consolidated.00.pth or consolidated.safetensors,
tokenizer.model."""

from __future__ import annotations

from pathlib import Path

import torch

from . import pth_io
from .checkpoint import Checkpoint, TensorRef, checked_tensors
from .errors import MixqError
from .hf import write_json
from .jsonfile import read_json
from .names import canonical_to_torrent, rotary_heads
from .progress import bar
from .rope import half_to_interleaved, interleaved_to_half
from .safetensors_io import DTYPE_NAMES, SafetensorsFile, SafetensorsWriter
from .spec import ModelSpec, integer, number, per_head
from .tokenizer import MISTRAL_V1_CHAT_TEMPLATE, Vocab

DEFAULT_CONTEXT = 32768     # mistral-inference / llama.cpp for Mixtral; transformers' native config default
PTH, SAFETENSORS = "consolidated.00.pth", "consolidated.safetensors"
SP_NAMES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v2", "tokenizer.model.v3")


def is_torrent_dir(path: Path) -> bool:
    return (path / "params.json").is_file()


def spec_from_params(params: dict, where: Path, vocab_rows: int | None = None) -> ModelSpec:
    """params.json -> spec, with the defaults mistral-inference applies to what the torrent leaves out."""
    if params.get("model_type", "transformer") != "transformer":
        raise MixqError(f"{where}: unsupported model_type {params['model_type']!r} (only 'transformer')")
    for key in ("vision_encoder", "lora"):
        if params.get(key):
            raise MixqError(f"{where}: {key} checkpoints are not supported")
    moe = params.get("moe") or {}
    sliding = params.get("sliding_window")
    if isinstance(sliding, list):
        raise MixqError(f"{where}: per-layer sliding windows are not supported")
    # mistral-inference: theta = rope_theta or 1e6; the first MoE release: 1e6 unless a sliding window is set
    rope_theta = params.get("rope_theta") or (1e6 if moe or sliding is None else 1e4)
    try:
        dim, heads = integer(params["dim"]), integer(params["n_heads"])
        vocab = integer(params.get("vocab_size", -1))
        spec = ModelSpec(
            arch="mixtral" if moe else "mistral", hidden_size=dim, num_layers=integer(params["n_layers"]),
            num_heads=heads, num_kv_heads=integer(params.get("n_kv_heads") or heads),
            head_dim=integer(params.get("head_dim") or per_head(dim, heads)),
            intermediate_size=integer(params["hidden_dim"]),
            vocab_size=vocab if vocab > 0 else integer(vocab_rows or 0), rms_norm_eps=number(params["norm_eps"]),
            rope_theta=number(rope_theta),
            max_position_embeddings=integer(params.get("max_seq_len") or params.get("max_position_embeddings")
                                        or DEFAULT_CONTEXT),
            sliding_window=integer(sliding) if sliding else None,
            num_experts=integer(moe.get("num_experts", 0)), experts_per_tok=integer(moe.get("num_experts_per_tok", 0)),
            tie_word_embeddings=bool(params.get("tied_embeddings", False)))
    except KeyError as exc:
        raise MixqError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise MixqError(f"{where}: bad value ({exc})") from None
    return spec.validate(str(where))


def params_from_spec(spec: ModelSpec) -> dict:
    """params.json with every field explicit (the torrent's own file leaves rope_theta and context implicit)."""
    params = {"dim": spec.hidden_size, "n_layers": spec.num_layers, "head_dim": spec.head_dim,
              "hidden_dim": spec.intermediate_size, "n_heads": spec.num_heads, "n_kv_heads": spec.num_kv_heads,
              "norm_eps": spec.rms_norm_eps, "vocab_size": spec.vocab_size, "rope_theta": spec.rope_theta,
              "max_seq_len": spec.max_position_embeddings, "sliding_window": spec.sliding_window}
    if spec.tie_word_embeddings:
        params["tied_embeddings"] = True
    if spec.is_moe:
        params["moe"] = {"num_experts": spec.num_experts, "num_experts_per_tok": spec.experts_per_tok}
    return params


def _weights(path: Path) -> Path:
    pth, st = path / PTH, path / SAFETENSORS
    if pth.is_file() and st.is_file():
        raise MixqError(f"{path}: holds both {PTH} and {SAFETENSORS}; keep one")
    if (path / "consolidated.01.pth").is_file():
        raise MixqError(f"{path}: tensor-parallel shards (consolidated.01.pth, ...) are not supported")
    if not (pth.is_file() or st.is_file()):
        raise MixqError(f"{path}: no {PTH} or {SAFETENSORS} beside params.json")
    return pth if pth.is_file() else st


def _read_vocab(path: Path) -> Vocab | None:
    for name in SP_NAMES:
        if (path / name).is_file():
            # the v1 format is Mixtral-8x7B-Instruct's; later Mistral tokenizers carry control tokens instead
            template = MISTRAL_V1_CHAT_TEMPLATE if name in ("tokenizer.model", "tokenizer.model.v1") else None
            return Vocab.from_sp_model((path / name).read_bytes(), str(path / name), template)
    return Vocab.from_hf_dir(path)


def read_torrent(path: Path) -> Checkpoint:
    params_path = path / "params.json"
    params = read_json(params_path)
    file = _weights(path)
    if file.suffix == ".pth":
        state = pth_io.load_state_dict(file)
        raw = {name: (tuple(t.shape), t.dtype, lambda t=t: t, lambda t=t: pth_io.release(t),
                      t.numel() * t.element_size()) for name, t in state.items()}
    else:
        st = SafetensorsFile(file)
        raw = {name: (e.shape, e.dtype, lambda n=name: st.get(n), lambda n=name: st.release(n), e.end - e.begin)
               for name, e in st.entries.items()}
    embed = raw.get("tok_embeddings.weight")
    spec = spec_from_params(params, params_path, vocab_rows=embed[0][0] if embed else None)
    to_torrent = canonical_to_torrent(spec)
    from_torrent = {t: c for c, t in to_torrent.items()}
    found = {}
    for name, (shape, dtype, load, release, nbytes) in raw.items():
        if name not in from_torrent:
            raise MixqError(f"{file}: {name}: unexpected tensor for a {spec.arch} model "
                            f"with {spec.num_layers} layers")
        canonical = from_torrent[name]
        heads = rotary_heads(spec, canonical)
        if heads:
            load = (lambda load, heads: lambda: interleaved_to_half(load(), heads))(load, heads)
        found[canonical] = TensorRef(shape=shape, dtype=dtype, stored=DTYPE_NAMES.get(dtype, str(dtype)),
                                     source=f"{file}: {name}", load=load, release=release, nbytes=nbytes)
    tensors = checked_tensors(spec, found, path)
    return Checkpoint(layout="torrent", path=path, spec=spec, tensors=tensors, vocab=_read_vocab(path),
                      source_config=params, files=[file])


def write_torrent(ckpt: Checkpoint, out: Path, dtype: torch.dtype | None, weights_format: str = "safetensors") -> dict:
    """Write `ckpt` in the torrent layout into `out` (an empty staging folder)."""
    spec = ckpt.spec
    to_torrent = canonical_to_torrent(spec)
    entries = [(to_torrent[name], ref.shape, dtype or ref.dtype) for name, ref in ckpt.tensors.items()]

    def produce(canonical: str) -> torch.Tensor:
        tensor = ckpt.get(canonical).to(dtype or ckpt.tensors[canonical].dtype)
        heads = rotary_heads(spec, canonical)
        return (half_to_interleaved(tensor, heads) if heads else tensor).contiguous()

    if weights_format not in ("safetensors", "pth"):
        raise MixqError(f"unknown torrent weights format {weights_format!r} (safetensors or pth)")
    st_path = out / (SAFETENSORS if weights_format == "safetensors" else ".consolidated.partial.safetensors")
    with SafetensorsWriter(st_path, entries) as writer, \
            bar(total=len(entries), desc="writing", unit="tensor") as pbar:
        for canonical in ckpt.tensors:
            writer.write(to_torrent[canonical], produce(canonical))
            ckpt.release(canonical)
            pbar.update(1)
    total = writer.nbytes
    if weights_format == "pth":
        # torch.save needs every tensor at once: hand it views of the file just written, not copies in memory
        st = SafetensorsFile(st_path)
        pth_io.save_state_dict({name: st.get(name) for name in st.entries}, out / PTH)
        st_path.unlink()
        total = (out / PTH).stat().st_size
    write_json(out / "params.json", params_from_spec(spec))
    tokenizer = []
    if ckpt.vocab is not None and ckpt.vocab.model == "llama":
        (out / "tokenizer.model").write_bytes(ckpt.vocab.to_sp_model())
        tokenizer = ["tokenizer.model"]
    elif ckpt.vocab is not None:  # byte-level BPE has no SentencePiece file; keep the HF files
        for name, data in ckpt.vocab.hf_files_out().items():
            (out / name).write_bytes(data)
            tokenizer.append(name)
    return {"tensors": len(entries), "bytes": total, "shards": 1, "tokenizer": tokenizer}

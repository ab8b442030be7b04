"""Open any checkpoint, convert it to any layout, describe it."""

from __future__ import annotations

import math
import time
from pathlib import Path

from .checkpoint import Checkpoint, resolve_dtype
from .errors import MixqError
from .hf import is_hf_dir, parse_size, read_hf, write_hf
from .output import refuse_overlap, staged_dir
from .torrent import is_torrent_dir, read_torrent, write_torrent

LAYOUTS = ("hf", "torrent", "gguf")


def detect_layout(path: Path) -> str:
    if not path.exists():
        raise MixqError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise MixqError(f"{path}: not a checkpoint (a file must be .gguf; give the folder of an HF or "
                        f"torrent checkpoint)")
    if is_hf_dir(path):
        return "hf"
    if is_torrent_dir(path):
        return "torrent"
    if (path / "config.json").is_file():
        raise MixqError(f"{path}: config.json but no *.safetensors weights")
    raise MixqError(f"{path}: not a checkpoint: expected config.json + *.safetensors (HF), "
                    f"params.json + consolidated.* (torrent) or a .gguf file")


def open_checkpoint(path: str | Path, layout: str = "auto") -> Checkpoint:
    path = Path(path)
    layout = detect_layout(path) if layout == "auto" else layout
    if layout == "hf":
        return read_hf(path)
    if layout == "torrent":
        return read_torrent(path)
    if layout == "gguf":
        from .ggufio import read_gguf
        return read_gguf(path)
    raise MixqError(f"unknown layout {layout!r} (choose from auto, {', '.join(LAYOUTS)})")


def convert_checkpoint(src: str | Path, out: str | Path, to: str, *, dtype: str = "auto",
                       shard_size: str | int = "5GB", force: bool = False, weights_format: str = "safetensors",
                       outtype: str = "auto", split_max_size: str | int | None = None,
                       layout: str = "auto", imatrix=None, imatrix_name: str = "auto") -> dict:
    """Convert `src` into layout `to` at `out`; returns a summary. Nothing appears at `out` on failure.
    `imatrix` (GGUF K-quants and i-quants): an Imatrix, or a function making one once the output is known free."""
    src, out = Path(src), Path(out)
    if to not in LAYOUTS:
        raise MixqError(f"unknown target layout {to!r} (choose from {', '.join(LAYOUTS)})")
    refuse_overlap([src], out)
    started = time.perf_counter()
    ckpt = open_checkpoint(src, layout)
    if imatrix is not None and to != "gguf":
        raise MixqError("--imatrix is for GGUF output (--to gguf)")
    if to == "gguf":
        from .ggufio import write_gguf_file
        summary = write_gguf_file(ckpt, out, outtype=outtype, split_max_size=split_max_size, force=force,
                                  imatrix=imatrix, imatrix_name=imatrix_name)
    else:
        torch_dtype = resolve_dtype(dtype)
        max_shard = parse_size(shard_size)
        with staged_dir(out, force) as stage:
            if to == "hf":
                summary = write_hf(ckpt, stage, torch_dtype, max_shard)
            else:
                summary = write_torrent(ckpt, stage, torch_dtype, weights_format)
    seconds = time.perf_counter() - started
    return {"source": str(src), "source_layout": ckpt.layout, "output": str(out), "layout": to,
            "architecture": ckpt.spec.arch, "seconds": round(seconds, 3), **summary}


def inspect_checkpoint(path: str | Path, layout: str = "auto") -> dict:
    ckpt = open_checkpoint(path, layout)
    spec = ckpt.spec
    vocab = ckpt.vocab
    params = sum(math.prod(ref.shape) for ref in ckpt.tensors.values())
    info = {
        "path": str(ckpt.path), "layout": ckpt.layout, "architecture": spec.arch,
        "hyperparameters": spec.as_dict(), "tensors": len(ckpt.tensors), "parameters": params,
        "dtypes": ckpt.stored_types(), "total_bytes": ckpt.total_bytes,
        "tokenizer": None if vocab is None else {
            "kind": "sentencepiece" if vocab.model == "llama" else "byte-level BPE", "vocab_size": len(vocab),
            "bos": vocab.special_token(vocab.bos_id), "eos": vocab.special_token(vocab.eos_id),
            "add_bos": vocab.add_bos},
        "chat_template": bool(vocab and vocab.chat_template),
        "files": [str(f) for f in ckpt.files],
    }
    if ckpt.layout == "gguf":
        info["metadata"] = {k: v for k, v in ckpt.source_config.items() if not k.startswith("tokenizer.ggml.")}
    return info


"""`mixq check`: perplexity (against a reference when given) and sample generations, as one report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mixq.convert import open_checkpoint
from mixq.convert.checkpoint import Checkpoint, torch_name
from mixq.convert.errors import MixqError
from mixq.convert.output import write_file
from mixq.convert.progress import note
from mixq.convert.provenance import published, source_card

from ..device import compute_dtype, generation_dtype, pick_device
from ..memory import Budget
from .evaluate import make_windows, perplexity
from .generate import DEFAULT_PROMPTS, LoadedModel, generate, prompt_ids
from .repository import quantization_method, read_quantized

CHECK_FILE = "check.json"
_NUMBER, _COUNT = (int, float), int
# the fields of a check report that cards and `mixq report` read, with their JSON types (None: may be null)
CHECK_FIELDS = {"perplexity": (_NUMBER, False), "reference_perplexity": (_NUMBER, True), "delta": (_NUMBER, True),
                "delta_percent": (_NUMBER, True), "kl": (_NUMBER, True), "tokens": (_COUNT, False),
                "windows": (_COUNT, True), "seqlen": (_COUNT, True), "method": (str, True),
                "generations": (list, True), "sampling": (dict, True)}


def read_check(path: Path, missing_ok: bool = True) -> dict | None:
    """A check report written by `mixq check -o`, its fields typed as they are read, so a hand-edited one is
    refused in one line naming the file and the field."""
    from mixq.convert.jsonfile import read_json
    check = read_json(path, missing_ok=missing_ok)
    if check is None:
        return None
    for key, (kind, nullable) in CHECK_FIELDS.items():
        value = check.get(key)
        if key not in check and key != "perplexity" or value is None and nullable:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MixqError(f"{path}: {key} must be {kind.__name__ if isinstance(kind, type) else 'a number'}"
                            f", got {value!r}")
    return check


def open_any(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """A checkpoint of any layout, AWQ and GPTQ repositories included (dequantized)."""
    path = Path(path)
    if path.is_dir() and quantization_method(path):
        return read_quantized(path, dtype)
    return open_checkpoint(path)


def run_check(model: str | Path, eval_source: str = "shakespeare", reference: str | Path | None = None,
              method: str = "windows", seqlen: int = 2048, max_tokens: int | None = None, prompts=None,
              max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
              device: str = "auto", dtype: str = "auto", batch: int = 4, split: str | None = None,
              text_field: str | None = None, stream=None, device_memory=None) -> dict:
    """Perplexity and sample generations; `device_memory` (bytes or a size such as 20GB; default: the device's,
    less a margin, unlimited on a CPU) bounds what is on the device at once (memory.Budget)."""
    from mixq.calibration import load_tokenizer
    from mixq.calibration.blocks import evaluation_ids, tokenizer_fingerprint
    started = time.perf_counter()
    torch_device = pick_device(device)
    torch_dtype = compute_dtype(dtype, torch_device)
    budget = Budget.for_device(device_memory, torch_device)
    ckpt = open_any(model, torch_dtype)
    tokenizer = load_tokenizer(model)
    ref = None
    if reference is not None:
        ref = open_any(reference, torch_dtype)
        if tokenizer_fingerprint(load_tokenizer(reference)) != tokenizer_fingerprint(tokenizer):
            raise MixqError(f"{reference}: its tokenizer differs from {model}'s; a reference must read the same "
                            f"tokens")
    ids, provenance = evaluation_ids(tokenizer, eval_source, split=split, text_field=text_field)
    windows = make_windows(ids, seqlen, method, bos_id=tokenizer.bos_token_id, max_tokens=max_tokens)
    note(f"perplexity on {windows.scored} tokens ({windows.tokens.shape[0]} windows of {seqlen}, {method})")
    report = {"model": str(model), "layout": ckpt.layout, "reference": str(reference) if reference else None,
              "reference_card": source_card(reference) if reference else {},
              "eval": provenance, "device": str(torch_device), "dtype": torch_name(torch_dtype)}
    with torch.no_grad():
        report.update(perplexity(ckpt, windows, torch_device, torch_dtype, batch, ref, budget))
    prompts = list(DEFAULT_PROMPTS) if prompts is None else list(prompts)
    report["generations"] = []
    gen_dtype = generation_dtype(dtype, torch_device)
    report["generation_dtype"] = torch_name(gen_dtype)
    if prompts and max_new_tokens > 0:
        context = max(len(prompt_ids(tokenizer, p)) for p in prompts) + max_new_tokens + 1
        source = ckpt if gen_dtype == torch_dtype else open_any(model, gen_dtype)
        loaded = LoadedModel(source, torch_device, gen_dtype, budget, context)
        report["generations"] = generate(loaded, tokenizer, prompts, max_new_tokens, temperature, top_p, seed,
                                         stream)
        del loaded
    report["sampling"] = {"temperature": temperature, "top_p": top_p, "seed": seed,
                          "max_new_tokens": max_new_tokens}
    report["device_memory"] = budget.limit
    report["peak_device_bytes"] = budget.peak_device_bytes()
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["summary"] = summary(report)
    return report


def summary(r: dict) -> str:
    text = f"perplexity {r['perplexity']:.4f}"
    if r.get("reference_perplexity") is not None:
        text += f" vs {r['reference_perplexity']:.4f} ({r['delta_percent']:+.2f}%), KL {r['kl']:.5f}"
    return text + f" on {r['tokens']} tokens ({r['method']}, {r['seqlen']}-token windows)"


def save_report(report: dict, path: str | Path) -> Path:
    """A check or quantization report as indented JSON, written whole or not at all, naming no local path
    (convert.provenance: it may be published)."""
    return write_file(path, json.dumps(published(report), indent=2) + "\n")

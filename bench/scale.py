"""Mixtral-8x7B at scale, measured on one layer and projected: quantization seconds and peak memory per method, and
check-style generation on a synthetic model larger than the device-memory budget.

Quantization: a full-width Mixtral-8x7B decoder layer (hidden 4096, 8 experts x 14336, 32 / 8 heads, head_dim 128;
random bf16 weights from a seed, written once under --work) run through rtn, gptq and awq at two calibration sizes
(CPU default 2x512 and 8x512 tokens). Each method's layer time is fitted as a + b * tokens over the two sizes and
projected to 128 x 2048 tokens and to the 32 layers of the model; the peak is the engine's own accounting
(`peak_device_bytes`: the allocator's on CUDA) and the process's RSS, with the projection of the working set and
the calibration activations (engine.METHOD_COPIES of them) at 128 x 2048 next to an 80 GB device.

Generation: a synthetic checkpoint whose tensors are generated from seeds when read (nothing on disk), --layers
deep, decoded under --budget: seconds per token, bytes moved and linears dequantized per step, and the peak.

On a CPU the figures are this machine's; ratios and projections are what carry over. On a GPU they are absolute.
Usage: python bench/scale.py [--shape full|small] [--calib 2x512 8x512] [--methods rtn gptq awq]
                             [--gen-layers 4] [--budget 6GB] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_TOKENS, MODEL_LAYERS, DEVICE_GB = 128 * 2048, 32, 80


def synthetic_checkpoint(spec, seed: int = 0):
    """A Checkpoint whose every tensor is drawn from a seed of its own when loaded: a model of any size, no file."""
    import torch

    from mixq.convert.checkpoint import Checkpoint, TensorRef
    from mixq.convert.names import expected_shapes
    tensors = {}
    for i, (name, shape) in enumerate(expected_shapes(spec).items()):
        def load(shape=shape, i=i):
            if len(shape) == 1:
                return torch.ones(shape, dtype=torch.bfloat16)
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)
        tensors[name] = TensorRef(shape=shape, dtype=torch.bfloat16, stored="BF16", source=f"synthetic: {name}",
                                  load=load, nbytes=2 * math.prod(shape))
    return Checkpoint(layout="synthetic", path=Path("synthetic"), spec=spec, tensors=tensors)


def quantize_runs(model: Path, methods, calibs, work: Path) -> list[dict]:
    from bench.synthetic import random_blocks
    from mixq.convert import progress
    from mixq.quantize import Settings, quantize_model
    from mixq.quantize.formats import FORMATS
    progress.set_quiet(True)
    rows = []
    for method in methods:
        fmt = "awq" if method == "awq" else "gptq"
        for calib in calibs:
            samples, seqlen = map(int, calib.split("x"))
            settings = Settings(method=method, scheme=FORMATS[fmt].scheme(4, 128, method == "gptq"), fmt=fmt,
                                batch=min(8, samples))
            started = time.perf_counter()
            blocks = None if method == "rtn" else random_blocks(samples, seqlen)
            report = quantize_model(model, work / f"{method}-{calib}", settings, blocks, force=True)
            rows.append({"method": method, "calib": calib, "tokens": samples * seqlen,
                         "layer_seconds": report["layers"][0]["seconds"],
                         "total_seconds": round(time.perf_counter() - started, 3),
                         "peak_device_bytes": report["peak_device_bytes"],
                         "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
            print(json.dumps(rows[-1]), flush=True)
            if method == "rtn":
                break
    return rows


def project(rows: list[dict], spec) -> list[dict]:
    """Per method: a + b * tokens through the measured sizes, at 128 x 2048 tokens, per layer and for the model;
    the device peak at that size from the engine's own working-set estimate and activation copies."""
    import torch

    from mixq.quantize import Settings
    from mixq.quantize.formats import FORMATS
    from mixq.quantize.runner import METHOD_COPIES, layer_working_set
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["tokens"], r["layer_seconds"]) for r in rows if r["method"] == method]
        if len(pts) > 1:
            (t1, s1), (t2, s2) = pts[0], pts[-1]
            b = (s2 - s1) / (t2 - t1)
            layer = s1 + b * (TARGET_TOKENS - t1)
        else:
            layer = pts[0][1]
        fmt = "awq" if method == "awq" else "gptq"
        settings = Settings(method=method, scheme=FORMATS[fmt].scheme(4, 128), fmt=fmt, batch=8)
        working = layer_working_set(spec, settings, torch.bfloat16, 2048 if method != "rtn" else 0)
        acts = 0 if method == "rtn" else (2 + METHOD_COPIES[method]) * TARGET_TOKENS * spec.hidden_size * 2
        out.append({"method": method, "projected_layer_seconds": round(layer, 1),
                    "projected_model_minutes": round(layer * MODEL_LAYERS / 60, 1),
                    "working_set_gb": round(working / 1e9, 2), "activations_gb_128x2048": round(acts / 1e9, 2),
                    "activations_on_device_at_80GB": working + acts <= DEVICE_GB * 1e9})
    return out


def generation(spec, layers: int, budget, tokens: int = 8) -> dict:
    import torch

    from mixq.convert.hf import parse_size
    from mixq.quantize.check.generate import LoadedModel
    from mixq.quantize.device import compute_dtype, pick_device
    from mixq.quantize.forward import KVCache, Rotary
    from mixq.quantize.memory import Budget
    spec = dataclasses.replace(spec, num_layers=layers)
    device = pick_device("auto")
    dtype = compute_dtype("auto", device)
    ckpt = synthetic_checkpoint(spec)
    model = LoadedModel(ckpt, device, dtype, Budget(parse_size(budget), device), context=64)
    rope, cache = Rotary.build(spec, 64, device, dtype), KVCache(spec.num_layers)
    size = sum(ref.nbytes for ref in ckpt.tensors.values())
    with torch.no_grad():
        model.step(torch.tensor([[1, 733, 16289, 28793]], device=device), cache, rope)
        moved = model.store.moved
        started = time.perf_counter()
        for _ in range(tokens):
            model.step(torch.tensor([[1824]], device=device), cache, rope)
        seconds = time.perf_counter() - started
    return {"layers": layers, "model_bytes_bf16": size, "budget": model.budget.limit,
            "resident_layers": layers - model.store.streamed, "seconds_per_token": round(seconds / tokens, 3),
            "bytes_moved_per_token": (model.store.moved - moved) // tokens,
            "peak_device_bytes": model.budget.peak_device_bytes()}


def main() -> None:
    import torch

    from bench.synthetic import FULL, SMALL, build
    from mixq.convert import open_checkpoint
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["full", "small"], default="full")
    ap.add_argument("--calib", nargs="*", default=["16x2048", "64x2048"] if cuda else ["2x512", "8x512"])
    ap.add_argument("--methods", nargs="*", default=["rtn", "gptq", "awq"])
    ap.add_argument("--gen-layers", type=int, default=4)
    ap.add_argument("--budget", default="6GB", help="Device memory for the generation run (less than the model).")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    shape = FULL if args.shape == "full" else SMALL
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        model = build(work / f"mixtral-{args.shape}-1layer", layers=1, **shape)
        spec = open_checkpoint(model).spec
        rows = quantize_runs(model, args.methods, args.calib, work) if args.methods else []
        for row in project(rows, spec) if rows else []:
            print(json.dumps(row), flush=True)
        if args.gen_layers:
            print(json.dumps({"generation": generation(spec, args.gen_layers, args.budget)}), flush=True)


if __name__ == "__main__":
    main()

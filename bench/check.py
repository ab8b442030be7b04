"""Tokens per second of mixq's streamed perplexity against transformers on the same Mixtral-shaped layers.

GPU: full-width layers in bf16, and the AWQ (RTN-packed) version of them, where transformers runs it through
GPTQModel's kernels. CPU: smaller layers in f32, dense only. Ratios are mixq / transformers, measured in one run.
Usage: python bench/check.py [--layers 2] [--shape full|small] [--windows 8] [--seqlen 2048]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def transformers_tokens_per_second(path: Path, tokens, dtype, device) -> float:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    with torch.no_grad():
        model(tokens[:1].to(device))  # warm-up
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for row in tokens:
            logits = model(row[None].to(device)).logits
            torch.log_softmax(logits.float(), -1)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    del model
    return tokens.numel() / seconds


def mixq_tokens_per_second(path: Path, tokens, dtype, device) -> float:
    import torch

    from mixq.quantize.check import open_any
    from mixq.quantize.check.evaluate import Windows, perplexity
    result = perplexity(open_any(path, dtype), Windows(tokens, 0, "windows"), device, dtype, batch=4)
    if device != "cpu":
        torch.cuda.synchronize()
    return tokens.numel() / result["seconds"]


def main() -> None:
    import torch

    from bench.synthetic import FULL, SMALL, build, random_blocks
    from mixq.convert import progress
    progress.set_quiet(True)
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shape", choices=["full", "small"], default="full" if cuda else "small")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048 if cuda else 512)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache/bench-check")
    args = ap.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = FULL if args.shape == "full" else SMALL
    model = build(args.work / f"mixtral-{args.shape}-{args.layers}", args.layers, dtype=dtype, **shape)
    tokens = random_blocks(args.windows, args.seqlen, seed=0).tokens
    rows = [("dense", mixq_tokens_per_second(model, tokens, dtype, device),
             transformers_tokens_per_second(model, tokens, dtype, device))]
    if cuda:
        from mixq.quantize import Settings, quantize_model
        from mixq.quantize.formats import FORMATS
        with tempfile.TemporaryDirectory() as tmp:
            awq = Path(tmp) / "awq"
            quantize_model(model, awq, Settings(method="rtn", scheme=FORMATS["awq"].scheme(4, 128), fmt="awq",
                                                expert_naming="transformers"))
            try:
                import defuser
                defuser.replace_fused_blocks("mixtral")
                reference = transformers_tokens_per_second(awq, tokens, torch.float16, device)
            except ImportError:
                reference = float("nan")
            rows.append(("awq", mixq_tokens_per_second(awq, tokens, torch.float16, device), reference))
    print(f"perplexity over {args.windows} x {args.seqlen} tokens, {args.layers} Mixtral-shaped layers "
          f"({args.shape}), {device}, {str(dtype).replace('torch.', '')}")
    print(f"{'model':6} {'mixq tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
    for name, ours, theirs in rows:
        print(f"{name:6} {ours:11.0f} {theirs:19.0f} {ours / theirs:6.2f}")


if __name__ == "__main__":
    main()

"""The quantization engine against an earlier one, in the same run: seconds per layer and torch operations
dispatched per layer for GPTQ and AWQ on an 8-expert Mixtral-shaped model (random weights), as ratios.

The earlier engine is checked out from git (`--against REV`, default main 78559e6, the engine before the speed
work) into a temporary worktree and run in a child process of its own, as the current one is; both quantize the
same model on the same calibration tokens with the same settings. Operations are counted with a
TorchDispatchMode over one layer's quantization (a second run, so the count's own cost never enters the timing).
Usage: python bench/engine.py [--against REV] [--shape small|mini|full] [--layers 1] [--calib 8x256]
                              [--methods gptq awq] [--no-ops]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = "78559e6"
MINI = {"hidden": 512, "ffn": 1792, "experts": 8, "heads": 8, "kv_heads": 2}   # quick CPU runs

CHILD = r"""
import json, sys, time, torch
root, engine, model, out, method, calib, count = sys.argv[1:8]
sys.path[:0] = [root, sys.argv[8]]   # the engine's checkout first, then the current one (bench.synthetic)
from bench.synthetic import random_blocks
fmt = "awq" if method == "awq" else "gptq"
if engine == "old":    # the layout before mixq's namespace: top-level packages, Scheme(rule=format)
    from convert import progress
    from quantize import Scheme, Settings, quantize_model
    scheme = Scheme(4, 128, sym=method == "gptq", rule=fmt)
else:
    from mixq.convert import progress
    from mixq.quantize import Settings, quantize_model
    from mixq.quantize.formats import FORMATS
    scheme = FORMATS[fmt].scheme(4, 128, method == "gptq")
progress.set_quiet(True)
samples, seqlen = map(int, calib.split("x"))
settings = Settings(method=method, scheme=scheme, fmt=fmt, batch=8)
blocks = random_blocks(samples, seqlen)
ops = None
if count == "1":
    from torch.utils._python_dispatch import TorchDispatchMode
    class Count(TorchDispatchMode):
        n = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        report = quantize_model(model, out, settings, blocks)
    ops = Count.n / len(report["layers"])
else:
    report = quantize_model(model, out, settings, blocks)
layers = [layer["seconds"] for layer in report["layers"]]
print(json.dumps({"s_per_layer": sum(layers) / len(layers), "ops_per_layer": ops}))
"""


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), rev], check=True)
    return where


def run(root: Path, engine: str, model: Path, method: str, calib: str, count: bool, tmp: Path) -> dict:
    out = tmp / f"out-{engine}-{method}-{int(count)}"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), engine, str(model), str(out), method, calib,
                           "1" if count else "0", str(ROOT)], capture_output=True, text=True, cwd=tmp)
    if proc.returncode:
        raise SystemExit(f"{engine} engine, {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from bench.synthetic import FULL, SMALL, build
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default=BASELINE)
    ap.add_argument("--shape", choices=["mini", "small", "full"], default="mini")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--calib", default="8x256")
    ap.add_argument("--methods", nargs="*", default=["gptq", "awq"])
    ap.add_argument("--no-ops", action="store_true", help="Skip the operation counts (a second run of each).")
    args = ap.parse_args()
    shape = {"mini": MINI, "small": SMALL, "full": FULL}[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build(tmp / "model", layers=args.layers, **shape)
        old = worktree(args.against, tmp / "old")
        try:
            print(f"{'method':6} {'engine':8} {'s/layer':>9} {'ops/layer':>10}   {args.shape} x{args.layers}, "
                  f"calibration {args.calib}, against {args.against}")
            for method in args.methods:
                rows = {}
                for engine, root in (("old", old), ("new", ROOT)):
                    rows[engine] = run(root, engine, model, method, args.calib, False, tmp)
                    if not args.no_ops:
                        rows[engine]["ops_per_layer"] = run(root, engine, model, method, args.calib, True,
                                                            tmp)["ops_per_layer"]
                    ops = rows[engine]["ops_per_layer"]
                    print(f"{method:6} {engine:8} {rows[engine]['s_per_layer']:9.2f} "
                          f"{'' if ops is None else f'{ops:10.0f}'}", flush=True)
                speed = rows["old"]["s_per_layer"] / rows["new"]["s_per_layer"]
                fewer = "" if args.no_ops else \
                    f", {rows['old']['ops_per_layer'] / rows['new']['ops_per_layer']:.1f}x fewer operations"
                print(f"{method:6} {'ratio':8} {speed:8.2f}x faster{fewer}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()

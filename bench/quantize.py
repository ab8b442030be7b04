"""Seconds per decoder layer and peak memory of mixq's GPTQ and AWQ on Mixtral-shaped layers (random weights).

On a GPU: full-width Mixtral-8x7B layers (hidden 4096, 8 experts x 14336), calibration 128 x 512 (AutoAWQ's
default) and 128 x 2048; with --anchors DIR (a copy of shared/anchors) AutoAWQ 0.2.9 and GPTQModel 7.6.0 run on the
same shapes in the same call, and the ratios are printed. Targets (H100): GPTQ <= 15 s/layer, AWQ >= 4x AutoAWQ,
GPU peak <= 40 GB, host peak <= two layers.
On a CPU (no GPU): smaller layers (--shape small), ratios only between mixq's own runs; absolute figures are not
the targets'.
Usage: python bench/quantize.py [--layers 2] [--shape full|small] [--calib 128x512 128x2048] [--anchors DIR]
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

from bench.anchors import anchor_env  # noqa: E402 (after the path insert)

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[5])
from bench.synthetic import random_blocks
from mixq.convert import progress
from mixq.quantize import Scheme, Settings, quantize_model
from mixq.quantize.formats import FORMATS
progress.set_quiet(True)
model, out, method, calib = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
samples, seqlen = map(int, calib.split("x"))
fmt = "awq" if method == "awq" else "gptq"
settings = Settings(method=method, scheme=FORMATS[fmt].scheme(4, 128, method == "gptq"), fmt=fmt, batch=8,
                    act_order=False, static_groups=False)
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
report = quantize_model(model, out, settings, random_blocks(samples, seqlen))
seconds = time.perf_counter() - t
layers = [l["seconds"] for l in report["layers"]]
print(json.dumps({"method": method, "calib": calib, "seconds": seconds, "s_per_layer": sum(layers) / len(layers),
                  "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                  "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "device": report["device"]}))
"""


def run_mixq(model: Path, method: str, calib: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(model), f"{tmp}/out", method, calib, str(ROOT)],
                              capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"mixq {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_anchor(anchors: Path, name: str, layers: int, env: dict) -> dict | None:
    script = anchors / name / f"anchor_{name}.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=anchor_env(anchors, name, LAYERS=str(layers), **env))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        print(f"anchor {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    import torch

    from bench.synthetic import FULL, SMALL, build
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shape", choices=["full", "small"], default="full" if cuda else "small")
    ap.add_argument("--calib", nargs="*", default=["128x512", "128x2048"] if cuda else ["16x512"])
    ap.add_argument("--methods", nargs="*", default=["gptq", "awq"])
    ap.add_argument("--anchors", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache/bench-quantize")
    args = ap.parse_args()
    shape = FULL if args.shape == "full" else SMALL
    model = build(args.work / f"mixtral-{args.shape}-{args.layers}", args.layers, **shape)
    layer_gib = (3 * shape["experts"] * shape["hidden"] * shape["ffn"] + 2 * shape["hidden"] ** 2
                 + 2 * shape["hidden"] * shape["hidden"] // shape["heads"] * shape["kv_heads"]) * 2 / 2**30
    rows = [run_mixq(model, m, c) for m in args.methods for c in args.calib]
    anchors = {}
    if args.anchors and cuda:
        anchors["awq"] = run_anchor(args.anchors, "autoawq", args.layers, {})
        anchors["gptq"] = run_anchor(args.anchors, "gptqmodel", 1, {"GPTQMODEL_CPU_WORKERS": "8"})
    print(f"{args.layers} Mixtral-shaped layers ({args.shape}: hidden {shape['hidden']}, {shape['experts']} experts x "
          f"{shape['ffn']}; one layer {layer_gib:.2f} GiB bf16), device {rows[0]['device']}")
    print(f"{'method':6} {'calib':9} {'s/layer':>8} {'GPU GiB':>8} {'host GiB':>9} {'host/layer':>10} "
          f"{'vs anchor':>10}")
    for r in rows:
        anchor = anchors.get(r["method"])
        ratio = (f"{anchor['s_per_layer'] / r['s_per_layer']:.1f}x" if anchor and anchor.get("calib") == r["calib"]
                 else "-")
        gpu = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"{r['method']:6} {r['calib']:9} {r['s_per_layer']:8.1f} {gpu:>8} {r['peak_host_gib']:9.2f} "
              f"{r['peak_host_gib'] / layer_gib:10.2f} {ratio:>10}")
    for anchor in anchors.values():
        if anchor:
            print(f"anchor {json.dumps(anchor)}")
    (args.work / "results.json").write_text(json.dumps({"rows": rows, "anchors": anchors}, indent=2))


if __name__ == "__main__":
    main()

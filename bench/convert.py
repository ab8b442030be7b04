"""Peak memory and throughput of conversions of a synthetic Mixtral-shaped checkpoint of a few GB.

Printed as ratios against references measured in the same run on the same disk:
  rss/largest  (peak RSS during the conversion - RSS before it) / largest tensor the conversion handles
               (for GGUF, one layer's stacked experts in f32); target <= 2
  vs cp        conversion throughput / `cp` of the same input bytes; target >= 0.5
Usage: python bench/convert.py [--layers 4 --hidden 2048 --ffn 7168 --experts 8] [--work DIR] [--cases ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
from mixq.convert import convert_checkpoint, open_checkpoint
from mixq.convert import progress
progress.set_quiet(True)
src, out, to, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ckpt = open_checkpoint(src)  # imports and metadata, so the baseline includes them
largest = ckpt.largest_tensor_bytes
if to == "gguf" or ckpt.layout == "gguf":  # one layer's experts, stacked, in f32
    spec = ckpt.spec
    largest = max(largest, spec.num_experts * spec.intermediate_size * spec.hidden_size * 4)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
t = time.perf_counter()
convert_checkpoint(src, out, to, **extra)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "before": before, "largest": largest, "peak": peak}))
"""

CASES = {
    # name: (source, target layout, options)
    "torrent->hf": ("src", "hf", {}),
    "hf->torrent": ("hf", "torrent", {}),
    "hf->gguf bf16": ("hf", "gguf", {"outtype": "bf16"}),
    "hf->gguf q8_0": ("hf", "gguf", {"outtype": "q8_0"}),
    "gguf->hf": ("gguf", "hf", {}),
}


def build_source(work: Path, layers: int, hidden: int, ffn: int, experts: int) -> Path:
    import torch

    from mixq.convert.safetensors_io import SafetensorsWriter
    src = work / "src"
    params = {"dim": hidden, "n_layers": layers, "head_dim": 128, "hidden_dim": ffn, "n_heads": hidden // 128,
              "n_kv_heads": max(1, hidden // 512), "norm_eps": 1e-5, "vocab_size": 32000,
              "moe": {"num_experts": experts, "num_experts_per_tok": 2}}
    if (src / "params.json").is_file() and json.loads((src / "params.json").read_text()) == params:
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    q, kv = params["n_heads"] * 128, params["n_kv_heads"] * 128
    plan = [("tok_embeddings.weight", (32000, hidden))]
    for i in range(layers):
        p = f"layers.{i}."
        plan += [(p + "attention_norm.weight", (hidden,)), (p + "attention.wq.weight", (q, hidden)),
                 (p + "attention.wk.weight", (kv, hidden)), (p + "attention.wv.weight", (kv, hidden)),
                 (p + "attention.wo.weight", (hidden, q)), (p + "ffn_norm.weight", (hidden,)),
                 (p + "feed_forward.gate.weight", (experts, hidden))]
        for e in range(experts):
            plan += [(p + f"feed_forward.experts.{e}.w1.weight", (ffn, hidden)),
                     (p + f"feed_forward.experts.{e}.w2.weight", (hidden, ffn)),
                     (p + f"feed_forward.experts.{e}.w3.weight", (ffn, hidden))]
    plan += [("norm.weight", (hidden,)), ("output.weight", (32000, hidden))]
    g = torch.Generator().manual_seed(0)
    with SafetensorsWriter(src / "consolidated.safetensors", [(n, s, torch.bfloat16) for n, s in plan]) as w:
        for name, shape in plan:
            w.write(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    (src / "params.json").write_text(json.dumps(params))
    try:
        import mistral_common
        shutil.copy(Path(mistral_common.__file__).parent / "data/tokenizer.model.v1", src / "tokenizer.model")
    except ImportError:
        pass
    return src


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def cp_seconds(source: Path, work: Path) -> float:
    target = work / "cp-copy"
    remove(target)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    os.sync()
    seconds = time.perf_counter() - t
    remove(target)
    return seconds


def run_case(source: Path, out: Path, to: str, options: dict) -> dict:
    remove(out)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), to, json.dumps(options)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"{source} -> {to} failed:\n{proc.stderr[-3000:]}")
    os.sync()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache/bench-convert")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--llama-cpp", type=Path, default=None,
                    help="a llama.cpp checkout (e.g. the llama-cpp-python sdist's vendor/llama.cpp): "
                         "time its convert_hf_to_gguf.py on the same input")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = build_source(work, args.layers, args.hidden, args.ffn, args.experts)
    experts = args.experts * args.ffn * args.hidden * 4  # one layer's stacked experts, f32
    outputs = {case: work / ("out-" + case.replace("->", "-to-").replace(" ", "-")
                             + (".gguf" if CASES[case][1] == "gguf" else "")) for case in CASES}
    sources = {"src": src, "hf": outputs["torrent->hf"], "gguf": outputs["hf->gguf bf16"]}
    producers = {"hf": "torrent->hf", "gguf": "hf->gguf bf16"}
    results = {}

    def measure(case):
        source_key, to, options = CASES[case]
        if source_key in producers and producers[source_key] not in results:
            measure(producers[source_key])
        results[case] = run_case(sources[source_key], outputs[case], to, options)
        size = dir_bytes(sources[source_key])
        cp = cp_seconds(sources[source_key], work)
        limit = results[case]["largest"]
        extra = results[case]["peak"] - results[case]["before"]
        rows.append({"case": case, "bytes": size, "seconds": results[case]["seconds"],
                     "throughput_mb_s": size / results[case]["seconds"] / 1e6, "cp_mb_s": size / cp / 1e6,
                     "vs_cp": cp / results[case]["seconds"], "extra_rss_mb": extra / 1e6,
                     "largest_mb": limit / 1e6, "rss_over_largest": extra / limit})

    rows = []
    for case in CASES:
        if case in args.cases and case not in results:
            measure(case)
    if args.llama_cpp:
        rows.append(llama_cpp_row(args.llama_cpp, sources["hf"], work, experts))
    print(f"synthetic Mixtral-shaped checkpoint: {args.layers} layers, hidden {args.hidden}, "
          f"{args.experts} experts x {args.ffn}, {dir_bytes(src) / 1e9:.2f} GB bf16; {os.cpu_count()} CPUs")
    print(f"{'case':16} {'GB':>6} {'s':>7} {'MB/s':>7} {'cp MB/s':>8} {'vs cp':>6} {'+RSS MB':>8} "
          f"{'largest MB':>10} {'rss/largest':>11}")
    for r in rows:
        print(f"{r['case']:16} {r['bytes'] / 1e9:6.2f} {r['seconds']:7.1f} {r['throughput_mb_s']:7.0f} "
              f"{r['cp_mb_s']:8.0f} {r['vs_cp']:6.2f} {r['extra_rss_mb']:8.0f} {r['largest_mb']:10.0f} "
              f"{r['rss_over_largest']:11.2f}")
    (work / "results.json").write_text(json.dumps(rows, indent=2))


def llama_cpp_row(llama_cpp: Path, hf: Path, work: Path, experts: int) -> dict:
    out = work / "llama-cpp.gguf"
    script = llama_cpp / "convert_hf_to_gguf.py"
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, str(script), str(hf), "--outfile",
                           str(out), "--outtype", "bf16"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")})
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-2000:]}")
    peak = int(proc.stderr.strip().splitlines()[-1]) * 1024
    size = dir_bytes(hf)
    cp = cp_seconds(hf, work)
    out.unlink()
    return {"case": "llama.cpp bf16", "bytes": size, "seconds": seconds, "throughput_mb_s": size / seconds / 1e6,
            "cp_mb_s": size / cp / 1e6, "vs_cp": cp / seconds, "extra_rss_mb": peak / 1e6,
            "largest_mb": experts / 1e6, "rss_over_largest": peak / experts}


if __name__ == "__main__":
    main()

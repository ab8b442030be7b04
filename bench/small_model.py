"""mixq beside the tools users compare it with, on the real SmolLM2-135M (CPU is fine): the same model, the same
calibration tokens (King James Bible), the same evaluation windows (Shakespeare); seconds to quantize and the
perplexity of each repository, all read back and evaluated by the same code. Round-to-nearest at the same settings is
the baseline each method is measured against. Group size 64: SmolLM2's hidden size 576 is not a multiple of 128.

- awq: mixq AWQ vs AutoAWQ 0.2.9 (zero point, GEMM). AutoAWQ needs transformers 4.51.3: its wheels come from a copy of
  shared/anchors (`--anchors DIR`) and are installed into a throw-away target. Its CPU path has a defect unrelated to
  the algorithm: `_compute_best_scale` keeps the layer's weights as `{k: v.cpu() ...}`, which for a tensor already on
  the CPU is the tensor itself, so the in-place `mul_` of the first grid point overwrites the saved copy and every
  restore brings back scaled weights (on a GPU `.cpu()` copies). The child fixes that one line (a copy) so the
  algorithms are compared; `--autoawq-as-is` runs it unchanged.
- gptq: mixq GPTQ (its defaults: act-order with static groups, damp 0.01) vs GPTQModel 7.6.0 (its defaults:
  group-aware act-order, damp 0.05), symmetric; GPTQModel is the `test` extra of this environment.
Usage: python bench/small_model.py [--methods awq gptq] [--anchors DIR] [--awq-calib 8x256] [--gptq-calib 16x512]
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

from bench.anchors import anchor_env  # noqa: E402 (after the path insert)

AUTOAWQ = r"""
import inspect, json, sys, textwrap, time, torch
import awq.quantize.quantizer as Q
from awq import AutoAWQForCausalLM
from transformers import AutoTokenizer
src, out, calib, group, mode = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4]), sys.argv[5]
if mode != "as-is":
    code = textwrap.dedent(inspect.getsource(Q.AwqQuantizer._compute_best_scale))
    line = "org_sd = {k: v.cpu() for k, v in module2inspect.state_dict().items()}"
    assert line in code, "AutoAWQ's _compute_best_scale changed; cannot apply the CPU fix"
    scope = {}
    exec(code.replace(line, line.replace("v.cpu()", "v.detach().clone().cpu()")), vars(Q), scope)
    Q.AwqQuantizer._compute_best_scale = scope["_compute_best_scale"]
model = AutoAWQForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(src)
t = time.perf_counter()
model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": group, "w_bit": 4, "version": "GEMM"},
               calib_data=calib, max_calib_samples=len(calib), max_calib_seq_len=len(calib[0]))
seconds = time.perf_counter() - t
model.save_quantized(out)
tokenizer.save_pretrained(out)
print(json.dumps({"seconds": seconds}))
"""

GPTQMODEL = r"""
import json, sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
src, out, calib, group = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=group, sym=True),
                       device="cuda:0" if torch.cuda.is_available() else "cpu")
t = time.perf_counter()
model.quantize([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calib], batch_size=1)
seconds = time.perf_counter() - t
model.save(out)
print(json.dumps({"seconds": seconds}))
"""


def run_child(code: str, argv: list[str], env: dict, name: str, cwd: Path) -> float:
    """Seconds the tool itself reports; run in `cwd` (GPTQModel writes a logs/ folder where it runs)."""
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", choices=["awq", "gptq"], default=["awq", "gptq"])
    ap.add_argument("--anchors", type=Path, default=None, help="a copy of shared/anchors (AutoAWQ's wheels)")
    ap.add_argument("--awq-calib", default="8x256", help="SAMPLESxSEQLEN")
    ap.add_argument("--gptq-calib", default="16x512", help="SAMPLESxSEQLEN")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=8, help="512-token Shakespeare windows")
    ap.add_argument("--autoawq-as-is", action="store_true", help="do not fix AutoAWQ's CPU weight-restore defect")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache/bench-small-model")
    args = ap.parse_args()
    args.work = args.work.resolve()

    from mixq.calibration import load_tokenizer, prepare
    from mixq.calibration.blocks import evaluation_ids
    from mixq.calibration.fixtures import smollm2_hf
    from mixq.convert import open_checkpoint, progress
    from mixq.quantize import Settings, quantize_model
    from mixq.quantize.check.evaluate import make_windows, perplexity
    from mixq.quantize.check.repository import read_quantized
    from mixq.quantize.formats import FORMATS
    progress.set_quiet(True)

    smol = smollm2_hf("f32")
    tokenizer = load_tokenizer(smol)
    ids, _ = evaluation_ids(tokenizer, "shakespeare")
    windows = make_windows(ids, 512, max_tokens=args.eval_windows * 512)
    args.work.mkdir(parents=True, exist_ok=True)
    base = perplexity(open_checkpoint(smol), windows)["perplexity"]
    results = {"unquantized": {"perplexity": base}}

    def measure(label: str, out: Path, make) -> None:
        """`make(out)` writes the repository and returns its own quantize seconds, or None to time it whole."""
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        seconds = make(out)
        results[label] = {"seconds": seconds if seconds is not None else time.perf_counter() - t,
                          "perplexity": perplexity(read_quantized(out), windows)["perplexity"]}

    def mixq(settings, blocks=None):
        return lambda out: quantize_model(smol, out, settings, blocks) and None

    def child(code: str, name: str, env: dict, calib_file: Path, *extra: str):
        return lambda out: run_child(code, [str(smol), str(out), str(calib_file), str(args.group_size), *extra],
                                     env, name, args.work)

    for method in args.methods:
        samples, seqlen = map(int, getattr(args, f"{method}_calib").split("x"))
        blocks = prepare(smol, "kjv", samples=samples, seqlen=seqlen, seed=0, tokenizer=tokenizer)
        calib_file = args.work / f"calib-{method}.json"
        calib_file.write_text(json.dumps(blocks.tokens.tolist()))
        scheme = FORMATS[method].scheme(4, args.group_size, method == "gptq")
        tag = f"{method} {samples}x{seqlen}"
        measure(f"{tag} round-to-nearest", args.work / f"{method}-rtn",
                mixq(Settings(method="rtn", scheme=scheme, fmt=method)))
        measure(f"{tag} mixq", args.work / f"{method}-mixq", mixq(Settings(method=method, scheme=scheme, fmt=method),
                                                                 blocks))
        if method == "gptq":
            env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(os.cpu_count()), "HF_HUB_OFFLINE": "1"}
            measure(f"{tag} gptqmodel 7.6.0", args.work / "gptq-gptqmodel",
                    child(GPTQMODEL, "GPTQModel", env, calib_file))
        elif args.anchors:
            mode = "as-is" if args.autoawq_as_is else "CPU restore fixed"
            measure(f"{tag} autoawq 0.2.9 ({mode})", args.work / "awq-autoawq",
                    child(AUTOAWQ, "AutoAWQ", anchor_env(args.anchors, "autoawq"), calib_file, mode))
        else:
            print("AutoAWQ skipped: pass --anchors DIR (a copy of shared/anchors)", file=sys.stderr)

    print(f"SmolLM2-135M, 4-bit group {args.group_size}, calibration KJV, evaluation Shakespeare "
          f"{windows.tokens.shape[0]}x512 windows. increase: over the unquantized model; of RTN: that increase as a "
          "share of round-to-nearest's at the same settings")
    print(f"{'':42} {'seconds':>8} {'perplexity':>11} {'increase':>9} {'of RTN':>7}")
    for label, r in results.items():
        rtn = next((v for k, v in results.items() if k.endswith("round-to-nearest") and
                    k.split()[:2] == label.split()[:2]), None)
        seconds = f"{r['seconds']:8.1f}" if "seconds" in r else f"{'-':>8}"
        share = (f"{(r['perplexity'] - base) / (rtn['perplexity'] - base):7.0%}" if rtn and rtn is not r
                 else f"{'-':>7}")
        print(f"{label:42} {seconds} {r['perplexity']:11.3f} {(r['perplexity'] - base) / base:9.2%} {share}")
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

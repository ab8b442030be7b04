"""mixq's methods and options beside the tools users compare them with, on the real SmolLM2-135M (CPU is fine): one
table of seconds to quantize, perplexity, its increase over the original, that increase as a share of round-to-
nearest's at the same bits, group and symmetry, and the KL divergence to the original, every repository read back
and evaluated by the same code on the same windows, every tool calibrated on the same tokens. Each pair of texts
(calibration:evaluation, disjoint) is a table of its own: a ranking that holds on one pair only is luck. Group size
64: SmolLM2's hidden size 576 is not a multiple of 128.

- awq: mixq AWQ vs AutoAWQ 0.2.9 (zero point, GEMM). AutoAWQ needs transformers 4.51.3: its wheels come from a copy of
  shared/anchors (`--anchors DIR`) and are installed into a throw-away target. Its CPU path has a defect unrelated to
  the algorithm: `_compute_best_scale` keeps the layer's weights as `{k: v.cpu() ...}`, which for a tensor already on
  the CPU is the tensor itself, so the in-place `mul_` of the first grid point overwrites the saved copy and every
  restore brings back scaled weights (on a GPU `.cpu()` copies). The child fixes that one line (a copy) so the
  algorithms are compared; `--autoawq-as-is` runs it unchanged.
- gptq: mixq GPTQ (its defaults: act-order with static groups, damp 0.01) vs GPTQModel 7.6.0 (its defaults:
  group-aware act-order, damp 0.05), symmetric; GPTQModel is the `test` extra of this environment.
Usage: python bench/small_model.py [--methods awq gptq] [--anchors DIR] [--calib 16x512]
                                   [--pairs kjv:shakespeare shakespeare:kjv] [--options ...]
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


# the mixq rows of each method, after its round-to-nearest baseline: label (the command's flags) -> Settings overrides.
# Settings' own defaults are the plain algorithms; None: the command's own defaults (mixq.api), the "(default)" rows.
OPTIONS = {
    "gptq": {"gptq --search minmax --no-gptaq": {}, "gptq --no-gptaq": {"search": "mse"},
             "gptq --search minmax": {"gptaq": True}, "gptq (default)": None,
             "gptq --search minmax --no-gptaq --refit": {"refit": True},
             "gptq --no-gptaq --refit": {"search": "mse", "refit": True},
             "gptq --refit": {"search": "mse", "gptaq": True, "refit": True},
             "gptq --awq-gptq --search minmax --no-gptaq": {"awq_gptq": True},
             "gptq --awq-gptq --no-gptaq": {"awq_gptq": True, "search": "mse"}},
    "awq": {"awq --no-awq-gptq": {}, "awq --no-awq-gptq --search mse": {"search": "mse"},
            "awq --no-gptaq": {"awq_gptq": True}, "awq (default)": None,
            "awq --no-gptaq --refit": {"awq_gptq": True, "refit": True},
            "awq --refit": {"awq_gptq": True, "gptaq": True, "refit": True},
            "awq --search mse": {"awq_gptq": True, "gptaq": True, "search": "mse"}},
}
SYMMETRIC = {"gptq": True, "awq": False}   # each format's default: vLLM reads GPTQ sym and AWQ with zero points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", choices=list(OPTIONS), default=list(OPTIONS))
    ap.add_argument("--options", nargs="*", default=None, help="mixq rows to run (labels of OPTIONS; default all)")
    ap.add_argument("--pairs", nargs="*", default=["kjv:shakespeare", "shakespeare:kjv"],
                    help="CALIBRATION:EVALUATION text pairs, one table each")
    ap.add_argument("--anchors", type=Path, default=None, help="a copy of shared/anchors (AutoAWQ's wheels)")
    ap.add_argument("--no-anchors", action="store_true", help="mixq's rows only (no GPTQModel, no AutoAWQ)")
    ap.add_argument("--calib", default="16x512", help="SAMPLESxSEQLEN, the same tokens for every tool")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32,
                    help="512-token evaluation windows (on 8, calibration sizes of one method differ by a point)")
    ap.add_argument("--autoawq-as-is", action="store_true", help="do not fix AutoAWQ's CPU weight-restore defect")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache/bench-small-model")
    args = ap.parse_args()
    args.work = args.work.resolve()

    from mixq.api import SEARCH, method_options
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
    original = open_checkpoint(smol)
    tokenizer = load_tokenizer(smol)
    samples, seqlen = map(int, args.calib.split("x"))
    args.work.mkdir(parents=True, exist_ok=True)
    tables = {}
    for pair in args.pairs:
        calib, evaluation = pair.split(":")
        ids, _ = evaluation_ids(tokenizer, evaluation)
        windows = make_windows(ids, 512, max_tokens=args.eval_windows * 512)
        blocks = prepare(smol, calib, samples=samples, seqlen=seqlen, seed=0, tokenizer=tokenizer)
        calib_file = args.work / "calib.json"
        calib_file.write_text(json.dumps(blocks.tokens.tolist()))
        base = perplexity(original, windows)["perplexity"]
        rows = tables[pair] = {"unquantized": {"perplexity": base, "kl": 0.0}}

        def measure(label: str, make) -> None:
            """`make(out)` writes the repository and returns its own quantize seconds, or None to time it whole."""
            out = args.work / "repo"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            seconds = make(out)
            r = perplexity(read_quantized(out), windows, reference=original)
            rows[label] = {"seconds": seconds if seconds is not None else time.perf_counter() - t,
                           "perplexity": r["perplexity"], "kl": r["kl"], "family": label.split()[0]}
            shutil.rmtree(out, ignore_errors=True)

        def child(code: str, name: str, env: dict, *extra: str):
            return lambda out: run_child(code, [str(smol), str(out), str(calib_file), str(args.group_size), *extra],
                                         env, name, args.work)

        for method in args.methods:
            scheme = FORMATS[method].scheme(4, args.group_size, SYMMETRIC[method])
            measure(f"{method} round-to-nearest", lambda out: quantize_model(
                smol, out, Settings(method="rtn", scheme=scheme, fmt=method)) and None)
            for label, overrides in OPTIONS[method].items():
                if overrides is None:   # the command's defaults, as mixq.api resolves them
                    o = method_options(method)
                    overrides = {"search": SEARCH[method], "awq_gptq": o["awq_gptq"], "gptaq": o["gptaq"]}
                if args.options is None or label in args.options:
                    search = overrides.get("search", "minmax")
                    settings = Settings(method=method, scheme=FORMATS[method].scheme(4, args.group_size,
                                                                                     SYMMETRIC[method], search),
                                        fmt=method, **{k: v for k, v in overrides.items() if k != "search"})
                    measure(label, lambda out, s=settings: quantize_model(smol, out, s, blocks) and None)
            if args.no_anchors:
                continue
            if method == "gptq":
                env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(os.cpu_count()), "HF_HUB_OFFLINE": "1"}
                measure("gptq: GPTQModel 7.6.0", child(GPTQMODEL, "GPTQModel", env))
            elif args.anchors:
                mode = "as-is" if args.autoawq_as_is else "CPU restore fixed"
                measure(f"awq: AutoAWQ 0.2.9 ({mode})", child(AUTOAWQ, "AutoAWQ", anchor_env(args.anchors, "autoawq"),
                                                             mode))
            else:
                print("AutoAWQ skipped: pass --anchors DIR (a copy of shared/anchors)", file=sys.stderr)
        print_table(pair, rows, samples, seqlen, windows.tokens.shape[0], args.group_size)
    (args.work / "results.json").write_text(json.dumps(tables, indent=2))


def print_table(pair: str, rows: dict, samples: int, seqlen: int, windows: int, group: int) -> None:
    calib, evaluation = pair.split(":")
    base = rows["unquantized"]["perplexity"]
    print(f"\nSmolLM2-135M, 4-bit group {group}: calibration {calib} {samples}x{seqlen}, evaluation {evaluation} "
          f"{windows}x512. increase: over the original; of RTN: that increase as a share of round-to-nearest's "
          "(GPTQ rows: symmetric; AWQ rows: zero point); KL: mean per token, nats")
    print(f"{'':34} {'seconds':>8} {'perplexity':>11} {'increase':>9} {'of RTN':>7} {'KL':>7}")
    for label, r in rows.items():
        family = r.get("family", "").rstrip(":")
        rtn = rows.get(f"{family} round-to-nearest")
        seconds = f"{r['seconds']:8.1f}" if "seconds" in r else f"{'-':>8}"
        share = (f"{(r['perplexity'] - base) / (rtn['perplexity'] - base):7.0%}" if rtn and rtn is not r
                 else f"{'-':>7}")
        print(f"{label:34} {seconds} {r['perplexity']:11.3f} {r['perplexity'] - base:9.3f} {share} {r['kl']:7.4f}")


if __name__ == "__main__":
    main()

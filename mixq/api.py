"""mixq as a library: one function per command, keyword arguments named as the command's options, each
returning the report `--json` prints. The command line only maps flags onto these, so a script makes exactly
the artifacts `mixq` makes.

    import mixq
    mixq.convert("Mixtral-8x7B-v0.1", "mixtral.gguf", to="gguf", outtype="q8_0")
    report = mixq.quantize("mixtral-hf", "mixtral-awq", method="awq", calib="pileval", samples=128)
    check = mixq.check("mixtral-awq", reference="mixtral-hf", eval="wikitext2")

`mixq.convert` and `mixq.quantize` are also the subpackages `mixq.convert` and `mixq.quantize` (the folders
convert/ and quantize/): `callable_package` makes those modules callable as the functions here, so both
`mixq.convert(...)` and `from mixq.convert import open_checkpoint` hold.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

QUANTIZE_METHODS = ("awq", "gptq", "rtn")
# the options of each method beyond the shared ones, with their defaults (the CLI's). The defaults are the settings
# that measured best on both SmolLM2 text pairs (the README's SmolLM2 tables): GPTQ with GPTAQ's calibration (None: on
# wherever GPTQ's solve runs) and, below, the mse range search; AWQ followed by GPTQ's solve, with GPTAQ's.
METHOD_OPTIONS = {
    "gptq": {"sym": True, "damp": 0.01, "act_order": True, "static_groups": None, "true_sequential": True,
             "awq_gptq": False, "gptaq": None, "refit": False},
    "awq": {"zero_point": True, "grid": 20, "clip": True, "duo_scaling": True, "router_scaling": True,
            "awq_gptq": True, "gptaq": None, "refit": False},
    "rtn": {"format": "gptq", "sym": None},
}
# each method's default range search: mse under GPTQ; min/max for AWQ's final step (on SmolLM2's asymmetric grid mse
# raised the error) and for round-to-nearest, the baseline every method is measured against
SEARCH = {"gptq": "mse", "awq": "minmax", "rtn": "minmax"}


def method_options(method: str, options: dict | None = None) -> dict:
    """The method's options, `options` over METHOD_OPTIONS, with `gptaq` None resolved: on wherever GPTQ's solve
    runs (gptq; awq with awq_gptq)."""
    o = METHOD_OPTIONS[method] | (options or {})
    if o.get("gptaq", False) is None:
        o["gptaq"] = method == "gptq" or o["awq_gptq"]
    return o


# the calibration options shared by quantize, imatrix and convert's --imatrix auto, with their defaults
CALIBRATION = {"calib": "kjv", "samples": 128, "seqlen": 512, "seed": 0, "mode": "concat", "split": None,
               "field": None, "allow_fewer": False}


def convert(src, out, *, to: str, layout: str = "auto", dtype: str = "auto", outtype: str | list[str] = "auto",
            shard_size: str | int = "5GB", split_max_size: str | int | None = None, weights: str = "safetensors",
            force: bool = False, imatrix=None, device: str = "auto", compute_dtype: str = "auto",
            **calibration) -> dict:
    """`mixq convert SRC OUT --to {hf,torrent,gguf}`: a checkpoint in another layout, bit-exact at one dtype.
    GGUF: `outtype` may list several types, written in one run to `out` with {outtype} in its name; `imatrix`
    (K-quants and i-quants) is llama.cpp's importance matrix file, or "auto" to compute one from `calibration`
    (CALIBRATION's options, as quantize takes them) on `device`."""
    from mixq.convert import convert_checkpoint
    from mixq.convert.errors import MixqError
    from mixq.convert.hub import resolve_model
    from mixq.convert.imatrix import read_imatrix
    _refuse_unknown(calibration, "convert")
    if calibration and imatrix != "auto":
        raise MixqError(f"{', '.join(sorted(calibration))}: calibration options are used only with --imatrix auto")
    src = resolve_model(src)
    matrix, name = None, None
    if imatrix == "auto":
        from mixq.quantize.imatrix import compute_imatrix
        options = CALIBRATION | calibration
        # computed once the outputs are known to be free and the outtypes to use it, not before
        matrix = lambda: compute_imatrix(src, _blocks(src, options), device=device, dtype=compute_dtype)  # noqa: E731
        name = f"auto ({options['calib']}, {options['samples']} x {options['seqlen']} tokens)"
    elif imatrix is not None:
        matrix, name = read_imatrix(imatrix), Path(imatrix).name
    return convert_checkpoint(src, out, to, dtype=dtype, shard_size=shard_size, force=force,
                              weights_format=weights, outtype=outtype, split_max_size=split_max_size,
                              layout=layout, imatrix=matrix, imatrix_name=name)


def imatrix(model, output, *, device: str = "auto", compute_dtype: str = "auto", batch: int = 8,
            force: bool = False, **calibration) -> dict:
    """`mixq imatrix MODEL OUTPUT`: llama.cpp's importance matrix of `model` on calibration text, written as the
    GGUF file llama.cpp's imatrix tool writes (for `mixq convert --imatrix FILE` or llama-quantize --imatrix)."""
    from mixq.convert.errors import MixqError
    from mixq.convert.hub import resolve_model
    from mixq.convert.output import claim, refuse_existing, staged_file
    from mixq.quantize.imatrix import compute_imatrix
    _refuse_unknown(calibration, "imatrix")
    output = Path(output)
    if output.suffix != ".gguf":
        raise MixqError(f"{output}: an importance matrix is written as GGUF: the path must end in .gguf")
    refuse_existing([output], force)
    model = resolve_model(model)
    blocks = _blocks(model, CALIBRATION | calibration)
    with claim(output):
        matrix = compute_imatrix(model, blocks, device=device, dtype=compute_dtype, batch=batch)
        refuse_existing([output], force)
        with staged_file(output) as tmp:
            matrix.write(tmp)
    return {"output": str(output), "entries": len(matrix.entries), "datasets": matrix.datasets,
            "chunks": matrix.chunk_count, "chunk_size": matrix.chunk_size, "calibration": blocks.provenance}


def _refuse_unknown(calibration: dict, command: str) -> None:
    from mixq.convert.errors import MixqError
    unknown = set(calibration) - set(CALIBRATION)
    if unknown:
        raise MixqError(f"{command} has no option {sorted(unknown)[0]!r}")


def _blocks(model, options: dict):
    from mixq.calibration import prepare
    return prepare(model, options["calib"], samples=options["samples"], seqlen=options["seqlen"],
                   seed=options["seed"], mode=options["mode"], split=options["split"], text_field=options["field"],
                   allow_fewer=options["allow_fewer"])


def prepare_calibration(model, calib: str = "kjv", *, output=None, samples: int = 128, seqlen: int = 512,
                        seed: int = 0, mode: str = "concat", split: str | None = None, field: str | None = None,
                        allow_fewer: bool = False, force: bool = False) -> dict:
    """`mixq calibration prepare`: token blocks of `calib` for `model`'s tokenizer, saved at `output` if given."""
    from mixq.calibration import prepare
    from mixq.convert.hub import resolve_model
    from mixq.convert.output import refuse_existing
    if output is not None:
        refuse_existing([Path(output)], force)
    blocks = prepare(resolve_model(model), calib, samples=samples, seqlen=seqlen, seed=seed, mode=mode,
                     split=split, text_field=field, allow_fewer=allow_fewer)
    if output is not None:
        blocks.save(output)
    return {"output": None if output is None else str(output), **blocks.provenance}


def check(model, *, reference=None, eval: str = "shakespeare", eval_method: str = "windows", seqlen: int = 2048,
          max_tokens: int | None = None, prompts=None, max_new_tokens: int = 128, temperature: float = 0.0,
          top_p: float = 1.0, seed: int = 0, eval_batch: int = 4, split: str | None = None,
          field: str | None = None, device: str = "auto", compute_dtype: str = "auto", output=None,
          force: bool = False, stream=None, device_memory=None, fail_above: float | None = None) -> dict:
    """`mixq check`: perplexity (against `reference` when given, with KL) and sample generations.

    `fail_above`: a gate; when the perplexity exceeds the reference's by more than this many percent, the report
    is returned as `exceeded(report)` says and `output` is left as it was (a pipeline then still holds the last
    report that passed, and remakes the failed one next time).

    `device_memory`: bytes (or a size such as "20GB") the check may keep on the device at once (default: the
    device's, less a margin; unlimited on a CPU). `output`: write the report there (refused before the evaluation
    if it exists, unless `force`); `stream`: called as stream(prompt_index, text) while generating.
    """
    from mixq.convert.errors import MixqError
    from mixq.convert.hub import resolve_model
    from mixq.convert.output import refuse_existing
    from mixq.quantize.check import run_check, save_report
    model = resolve_model(model)
    reference = None if reference is None else resolve_model(reference)
    if output is not None:
        refuse_existing([Path(output)], force)
        if not Path(output).parent.is_dir():
            raise MixqError(f"{output}: no folder {Path(output).parent} to write the report into")
    report = run_check(model, eval_source=eval, reference=reference, method=eval_method, seqlen=seqlen,
                       max_tokens=max_tokens, prompts=None if prompts is None else list(prompts) or None,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       device=device, dtype=compute_dtype, batch=eval_batch, split=split, text_field=field,
                       stream=stream, device_memory=device_memory)
    if output is not None and not exceeded(report, fail_above):
        save_report(report, output)
    return report


def exceeded(report: dict, fail_above: float | None) -> bool:
    """Whether a check report fails the gate `fail_above` (percent over the reference's perplexity)."""
    return fail_above is not None and report.get("delta_percent", 0) > fail_above


def quantize(model, out, method: str = "awq", *, calib: str | None = "kjv", samples: int = 128, seqlen: int = 512,
             seed: int = 0, mode: str = "concat", split: str | None = None, field: str | None = None,
             allow_fewer: bool = False, bits: int = 4, group_size: int = 128, expert_naming: str = "classic",
             device: str = "auto", compute_dtype: str = "auto", batch: int = 8, shard_size: str | int = "5GB",
             resume: bool = False, force: bool = False, check: bool | dict = False, device_memory=None,
             checkpoint_every: int = 1, allow_unloadable: bool = False, search: str | None = None, **options) -> dict:
    """`mixq quantize METHOD MODEL OUT`: an AWQ-GEMM or GPTQ-v1 repository at `out`; returns its report.

    `options` are the method's own (METHOD_OPTIONS: gptq sym, damp, act_order, static_groups, true_sequential;
    awq zero_point, grid, clip, duo_scaling, router_scaling; both awq_gptq, AWQ's scales then GPTQ's solve, with
    the other method's defaults, gptaq, GPTQ's solve against the unquantized model's inputs too, and refit, GPTQ's
    group scales solved again for the codes it chose; rtn format,
    sym). `check`: True, or a dict of
    `check()`'s keyword arguments, runs the check against `model` afterwards and adds it to the report (the
    evaluation text is resolved before any work). `device_memory`: as check()'s, for the quantization (the
    calibration activations move to host memory when they do not fit beside one layer's work) and its check.
    `checkpoint_every`: layers between resume checkpoints (each writes the next layer's inputs).
    `search`: how each group's range is chosen, "minmax" or "mse" (quantizer.py; AWQ: its final step only);
    None: the method's default (SEARCH). `gptaq` None: on wherever GPTQ's solve runs (gptq; awq with awq_gptq).
    Settings a runtime the card names refuses or serves slowly (quantize.runtimes) are refused before any work
    unless `allow_unloadable`; the report's `runtimes` and the card then say which.
    """
    from mixq.calibration import prepare
    from mixq.calibration.sources import load_texts
    from mixq.convert.errors import MixqError
    from mixq.convert.hf import parse_size
    from mixq.convert.hub import resolve_model
    from mixq.quantize import Settings, quantize_model
    from mixq.quantize.check import CHECK_FILE, save_report
    from mixq.quantize.formats import get_format
    from mixq.quantize.runner import check_inputs  # refuses bits, group size and the output path
    from mixq.quantize.runtimes import refusal, verdicts
    if method not in QUANTIZE_METHODS:
        raise MixqError(f"unknown method {method!r} (choose from {', '.join(QUANTIZE_METHODS)})")
    unknown = set(options) - set(METHOD_OPTIONS[method])
    if unknown:
        raise MixqError(f"{method} has no option {sorted(unknown)[0]!r} (its options: "
                        f"{', '.join(METHOD_OPTIONS[method])})")
    o = method_options(method, options)
    search = SEARCH[method] if search is None else search
    fmt = get_format(o["format"] if method == "rtn" else method)
    extra = {}
    if method == "gptq":
        sym = o["sym"]
        extra = {"damp": o["damp"], "act_order": o["act_order"], "true_sequential": o["true_sequential"],
                 "static_groups": o["act_order"] if o["static_groups"] is None else o["static_groups"],
                 "awq_gptq": o["awq_gptq"], "gptaq": o["gptaq"], "refit": o["refit"]}
    elif method == "awq":
        sym = not o["zero_point"]
        extra = {"grid": o["grid"], "clip": o["clip"], "duo_scaling": o["duo_scaling"],
                 "scale_router": o["router_scaling"], "awq_gptq": o["awq_gptq"],
                 "gptaq": o["gptaq"], "refit": o["refit"]}
    else:  # round-to-nearest: symmetric for GPTQ's consumers, zero point for AWQ's, unless told
        sym = fmt.name == "gptq" if o["sym"] is None else o["sym"]
    settings = Settings(method=method, scheme=fmt.scheme(bits, group_size, sym, search), fmt=fmt.name,
                        expert_naming=expert_naming, device=device, dtype=compute_dtype, batch=batch,
                        shard_size=parse_size(shard_size), device_memory=device_memory,
                        checkpoint_every=checkpoint_every, **extra)
    check_options = ({} if check is True else dict(check)) if check else None
    model = resolve_model(model)   # a Hub id fetched (once) into the cache
    ckpt = check_inputs(model, out, settings, force)  # before the calibration text is tokenized
    refused = refusal(verdicts(settings, ckpt.spec))
    if refused and not allow_unloadable:
        raise MixqError(refused)
    if check_options is not None:  # the evaluation text must resolve before hours of quantization, not after
        load_texts(check_options.get("eval", "shakespeare"), evaluation=True)
    blocks = None
    if method != "rtn":
        if calib is None:
            raise MixqError(f"{method.upper()} needs calibration data (calib)")
        blocks = prepare(model, calib, samples=samples, seqlen=seqlen, seed=seed, mode=mode, split=split,
                         text_field=field, allow_fewer=allow_fewer)
    report = quantize_model(model, out, settings, blocks, force=force, resume=resume)
    if check_options is not None:
        shared = {"device": device, "compute_dtype": compute_dtype, "device_memory": device_memory}
        result = globals()["check"](out, reference=model, **(shared | check_options))
        save_report(result, Path(out) / CHECK_FILE)
        report["check"] = result
        save_report(report, Path(out) / "report.json")
    return dict(report, output=str(out))


def callable_package(name: str, function: str) -> None:
    """Make the package module `name` callable as this module's `function` (see the module docstring)."""
    module = sys.modules[name]

    class CallablePackage(types.ModuleType):
        __doc__ = module.__doc__

        def __call__(self, *args, **kwargs):
            return globals()[function](*args, **kwargs)

    module.__class__ = CallablePackage

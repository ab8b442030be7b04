"""Model cards (README.md) for the repositories mixq produces, written from their own reports: front matter,
prompt template, files, check results, sample generations, and how to run them in vLLM, TGI, transformers and
llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from mixq.convert.errors import MixqError
from mixq.convert.jsonfile import read_json
from mixq.convert.llama_quantize import IMATRIX_KEYS
from mixq.convert.output import write_file
from mixq.convert.progress import human_bytes
from mixq.convert.provenance import hub_id, public_name

from ..check import CHECK_FILE, read_check
from ..formats import FORMATS
from ..runtimes import Verdict
from .metadata import CardData, calibration_dataset
from .summary import artifact_bytes

CARD = "README.md"


def prompt_template(repo: Path) -> str:
    """The chat template rendered around a '{prompt}' placeholder (Mixtral: <s>[INST] {prompt} [/INST])."""
    try:
        from mixq.calibration import load_tokenizer
        tokenizer = load_tokenizer(repo)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": "{prompt}"}], tokenize=False,
                                                 add_generation_prompt=True)
    except MixqError:
        pass
    return "{prompt}"


@dataclass(frozen=True)
class Publishing:
    """What the person publishing says about a card (flags): each None takes the source's own card, or is left
    out."""
    base_model: str | None = None     # ORG/NAME on the Hub
    license: str | None = None
    language: tuple[str, ...] | None = None
    quantized_by: str | None = None
    related: tuple[str, ...] = ()     # the other repositories of the release (Hub ids)

    def card_data(self, source: str | None, source_card: dict | None, **fields) -> CardData:
        return CardData(base_model=self.base_model or source, source=source_card or {}, license=self.license,
                        language=list(self.language) if self.language else None, quantized_by=self.quantized_by,
                        **fields)


def _related(related: tuple[str, ...]) -> list[str]:
    if not related:
        return []
    return ["## Other formats", "", *(f"- [{r}](https://huggingface.co/{r})" for r in related), ""]


def _original(card: dict | None) -> list[str]:
    """The source's own card under a heading of its own, its headings one level down."""
    text = (card or {}).get("text")
    if not text:
        return []
    body = [("#" + line) if line.startswith("#") else line for line in text.splitlines()]
    return ["## Original model card", "", *body, ""]


def _generations(generations: list[dict]) -> list[str]:
    lines = []
    for g in generations:
        lines += [f"**{g['prompt']}**", "", "```", g["text"].strip(), "```", ""]
    return lines


def _check_section(check: dict | None) -> list[str]:
    if not check:
        return ["## Check", "", "Not checked yet: `mixq check REPO --reference BASE`.", ""]
    ev = check.get("eval", {})
    lines = ["## Check", "",
             f"Perplexity on `{ev.get('source')}` (text sha256 `{str(ev.get('text_sha256'))[:16]}`), "
             f"method `{check['method']}` ({check['windows']} windows of {check['seqlen']} tokens, "
             f"{check['tokens']} tokens scored), computed by mixq on {check['device']} in {check['dtype']}.", "",
             "| model | perplexity |", "|---|---|", f"| this repository | {check['perplexity']:.4f} |"]
    if check.get("reference_perplexity") is not None:
        lines += [f"| reference (`{check['reference']}`) | {check['reference_perplexity']:.4f} |", "",
                  f"Difference: {check['delta']:+.4f} ({check['delta_percent']:+.2f}%); "
                  f"mean KL divergence from the reference: {check['kl']:.5f} per token."]
    lines.append("")
    if check.get("generations"):
        how = (f"Greedy decoding, at most {check['sampling']['max_new_tokens']} new tokens"
               if not check["sampling"]["temperature"] else
               f"Sampling at temperature {check['sampling']['temperature']}, top-p {check['sampling']['top_p']}")
        dtype = check.get("generation_dtype", check["dtype"])
        lines += ["## Sample generations", "",
                  f"{how}, computed by mixq on {check['device']} in {dtype}"
                  + (" (what fp16 runtimes such as vLLM, TGI and AutoAWQ reproduce)." if dtype == "float16" else
                     "; runtimes serving in fp16 may part from these tokens (`mixq check --dtype f16` gives theirs)."),
                  "", *_generations(check["generations"])]
    return lines


def quantized_card(repo: Path, publishing: Publishing = Publishing()) -> str:
    config = read_json(repo / "config.json", missing_ok=True) or {}
    qc = config.get("quantization_config") or {}
    fmt = FORMATS.get(qc.get("quant_method"))
    if fmt is None:
        raise MixqError(f"{repo}: not a quantized repository mixq makes (config.json's quantization_config names "
                        f"none of {', '.join(FORMATS)})")
    report = read_json(repo / "report.json", missing_ok=True) or {}
    check = read_check(repo / CHECK_FILE) or report.get("check")
    settings = report.get("settings", {})
    calib = report.get("calibration") or {}
    base = public_name(publishing.base_model or report.get("model")) or "unknown"
    name = Path(base).name
    template = prompt_template(repo)
    arch = config.get("model_type", "")
    naming = settings.get("expert_naming", "classic")
    title = fmt.title
    tags = [fmt.name, f"{qc.get('bits', 4)}-bit", "mixq"] + (["moe", "mixtral"] if arch == "mixtral" else [])
    detail = fmt.describe(qc, settings)
    dataset = calibration_dataset(calib.get("source"))
    data = publishing.card_data(report.get("model"), report.get("source_card"), library="transformers",
                                model_type=arch, prompt_template=template, tags=tags,
                                datasets=[dataset] if dataset else [])
    lines = [data.front_matter(), f"# {name} - {title}", "",
             f"{title} {qc.get('bits')}-bit quantization of `{base}`, made with mixq "
             f"({report.get('method', fmt.name)} on {report.get('device', '?')}).", "",
             "## Prompt template", "", "```", template, "```", "",
             "## Provided files", "",
             "| files | bits | group size | settings | calibration dataset | calibration tokens | sequence length "
             "| size |",
             "|---|---|---|---|---|---|---|---|",
             f"| this repository | {qc.get('bits')} | {qc.get('group_size')} | {detail} | {calib.get('source', '-')} "
             f"| {calib.get('tokens', '-')} | {calib.get('seqlen', '-')} | {human_bytes(artifact_bytes(repo))} |", ""]
    lines += _check_section(check)
    lines += _usage_quantized(fmt.name, arch, naming, report.get("runtimes") or [])
    lines += _related(publishing.related)
    lines += _details(report)
    lines += _original(report.get("source_card"))
    return "\n".join(lines).rstrip() + "\n"


def _usage_quantized(fmt: str, arch: str, naming: str, runtimes: list[dict]) -> list[str]:
    lines = ["## How to use", ""]
    if runtimes:   # written with --allow-unloadable
        lines += ["**Not every runtime loads this repository**, made with settings some refuse or serve slowly:", "",
                  *(f"- {Verdict.from_dict(v).line()}" for v in runtimes), ""]
    readers = "vLLM, TGI and AutoAWQ" if fmt == "awq" else "vLLM and TGI"
    if arch == "mixtral":
        lines += [f"Expert tensors use the **{naming}** names: "
                  + (f"`block_sparse_moe.experts.E.w1/w2/w3`, the keys {readers} read (transformers 5 with "
                     "GPTQModel loads these experts uninitialised: make the transformers-named variant with "
                     "`--expert-naming transformers` for it)." if naming == "classic" else
                     "`mlp.experts.E.gate_proj/up_proj/down_proj`, for transformers 5 with GPTQModel and defuser "
                     f"({readers} read the classic names: make that variant with `--expert-naming classic`)."),
                  "The router (`gate`) is not quantized.", ""]
    # a Mixtral's experts are read under one naming each: vLLM, TGI and AutoAWQ the classic one, transformers 5
    # (with defuser) the transformers one; each runtime is shown only for the naming it loads
    classic = arch != "mixtral" or naming == "classic"
    if classic:
        lines += ["### vLLM", "",
                  "vLLM reads the quantization config and picks its fastest kernels (on Hopper Machete or Marlin "
                  "for the linears, Marlin for the MoE); "
                  "forcing `--quantization` makes it take the slower one.", "",
                  "```shell", "vllm serve REPO --dtype half", "```", "",
                  "### Text Generation Inference", "",
                  "TGI is archived upstream (March 2026); its last release still serves this repository:", "",
                  "```shell",
                  f"docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/REPO:/model "
                  f"ghcr.io/huggingface/text-generation-inference --model-id /model --quantize {fmt}", "```", ""]
    if classic and fmt == "awq":
        lines += ["### AutoAWQ / text-generation-webui", "",
                  "AutoAWQ 0.2.9 with transformers 4.51.3, on a CUDA GPU:", "",
                  "```python", "from awq import AutoAWQForCausalLM",
                  "model = AutoAWQForCausalLM.from_quantized(\"REPO\", fuse_layers=False)", "```", ""]
    if arch != "mixtral" or naming == "transformers":
        lines += ["### transformers", "",
                  "Needs `gptqmodel` and `optimum` (transformers 5 loads AWQ and GPTQ through them).",
                  "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
        if arch == "mixtral":
            lines += ["import defuser",
                      "defuser.replace_fused_blocks(\"mixtral\")  # else the experts load fused and random"]
        lines += ["tokenizer = AutoTokenizer.from_pretrained(\"REPO\")",
                  "model = AutoModelForCausalLM.from_pretrained(\"REPO\", device_map=\"auto\")",
                  "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello\"}], "
                  "add_generation_prompt=True, return_tensors=\"pt\").to(model.device)",
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=128)[0]))", "```", ""]
    lines += ["### mixq", "", "```shell", "mixq check REPO --reference BASE_MODEL", "```", ""]
    return lines


def _details(report: dict) -> list[str]:
    if not report:
        return []
    s = report.get("settings", {})
    keys = ("method", "format", "expert_naming", "damp", "act_order", "static_groups", "true_sequential", "grid",
            "clip", "duo_scaling", "scale_router", "awq_gptq", "gptaq", "refit")
    rows = [f"| {k} | {report.get(k, s.get(k))} |" for k in keys if report.get(k, s.get(k)) is not None]
    lines = ["## Quantization details", "", "| setting | value |", "|---|---|", *rows,
             f"| scheme | {s.get('scheme')} |", f"| time | {report.get('seconds')} s |", ""]
    errors = [layer["output_error"] for layer in report.get("layers", []) if "output_error" in layer]
    if errors:
        lines += [f"Relative error of each layer's output against the unquantized layer on the first chunk of "
                  f"the calibration data: mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}.", ""]
    if report.get("expert_coverage"):
        c = report["expert_coverage"]
        lines += [f"Expert statistics: {c.get('expert_statistics')}. The router stays in fp16. The fewest "
                  f"calibration tokens routed to an expert: {c['min_routed_tokens']} "
                  f"({c['experts_without_routed_tokens']} expert-layers without any); every expert is quantized.", ""]
    return lines


def gguf_card(folder: Path, publishing: Publishing = Publishing()) -> str:
    from mixq.convert import inspect_checkpoint
    files = sorted(p for p in folder.glob("*.gguf"))
    if not files:
        raise MixqError(f"{folder}: no .gguf files")
    infos = {f: inspect_checkpoint(f) for f in files}
    info = infos[files[0]]
    checks = {f.name: read_check(f.with_suffix(".check.json")) for f in files}
    source = next((c.get("reference") for c in checks.values() if c and c.get("reference")), None)
    base = public_name(publishing.base_model or source or info["metadata"].get("general.name") or files[0].stem)
    template = prompt_template(files[0])
    reference_card = next((c["reference_card"] for c in checks.values() if c and c.get("reference_card")), None)
    # what llama.cpp's quantize tool records of an importance matrix (llama_quantize.IMATRIX_KEYS)
    imatrix = {f: {k: infos[f]["metadata"].get(key) for k, key in IMATRIX_KEYS.items()} for f in files}
    calibrated = sorted({m["dataset"] for m in imatrix.values() if m["dataset"]})
    data = publishing.card_data(source, reference_card, library="gguf", model_type=info["architecture"],
                                prompt_template=template, tags=["gguf", "llama.cpp", "mixq"]
                                + (["imatrix"] if any(m["file"] for m in imatrix.values()) else []),
                                datasets=[d for d in map(calibration_dataset, calibrated) if d])
    lines = [data.front_matter(), f"# {Path(str(base)).name} - GGUF", "",
             f"GGUF files of `{base}` for llama.cpp and the runtimes built on it, made with mixq.", "",
             "## Prompt template", "", "```", template, "```", "",
             "## Provided files", "",
             "| file | type | size | bits per weight | importance matrix | perplexity | vs reference |",
             "|---|---|---|---|---|---|---|"]
    for f in files:
        check = checks[f.name]
        size = f.stat().st_size
        params = infos[f]["parameters"]
        ppl = f"{check['perplexity']:.4f}" if check else "-"
        delta = f"{check['delta_percent']:+.2f}%" if check and check.get("delta_percent") is not None else "-"
        types = ", ".join(sorted(infos[f]["dtypes"]))
        matrix = imatrix[f]["file"] or "-"
        lines.append(f"| {f.name} | {types} | {human_bytes(size)} | {8 * size / params:.2f} | {matrix} | {ppl} | "
                     f"{delta} |")
    lines.append("")
    if calibrated:
        lines += [f"The importance matrix (llama.cpp's: each weight's rounding weighed by its input column's mean "
                  f"squared activation) was computed by mixq on `{', '.join(calibrated)}`.", ""]
    first = next((c for c in checks.values() if c), None)
    if first:
        ev = first.get("eval", {})
        lines += [f"Perplexity on `{ev.get('source')}`, method `{first['method']}`, {first['seqlen']}-token "
                  f"windows, {first['tokens']} tokens; reference `{first.get('reference')}` at "
                  f"{first.get('reference_perplexity', float('nan')):.4f}.", ""]
        for name, check in checks.items():
            if check and check.get("generations"):
                lines += [f"### Sample generations: {name}", "", *_generations(check["generations"])]
    lines += ["## How to use", "", "### llama.cpp", "", "```shell",
              f"llama-cli -m {files[0].name} -cnv", "```", "", "### llama-cpp-python", "", "```python",
              "from llama_cpp import Llama",
              f"llm = Llama(\"{files[0].name}\", n_ctx=4096)",
              "print(llm.create_chat_completion([{\"role\": \"user\", \"content\": \"Hello\"}]))", "```", "",
              "### Back to PyTorch", "", "```shell", f"mixq convert {files[0].name} OUT --to hf", "```", ""]
    lines += _related(publishing.related)
    lines += _original(reference_card)
    return "\n".join(lines).rstrip() + "\n"


def write_card(path: str | Path, publishing: Publishing = Publishing()) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MixqError(f"{path}: not a folder (give the repository or the folder of .gguf files)")
    if publishing.base_model and not hub_id(publishing.base_model):
        raise MixqError(f"--base-model {publishing.base_model}: not a Hub id (ORG/NAME); the card's base_model names "
                        f"the original on the Hub")
    for related in publishing.related:
        if not hub_id(related):
            raise MixqError(f"--related {related}: not a Hub id (ORG/NAME)")
    text = gguf_card(path, publishing) if any(path.glob("*.gguf")) else quantized_card(path, publishing)
    return write_file(path / CARD, text)


def read_front_matter(card: Path) -> dict:
    text = card.read_text()
    if not text.startswith("---\n"):
        raise MixqError(f"{card}: no front matter")
    return yaml.safe_load(text.split("---\n", 2)[1])

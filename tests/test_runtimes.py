"""The runtimes users deploy on, as judges of mixq's outputs: AutoAWQ 0.2.9 loads and runs them, vLLM 0.33.0 parses
their configs, picks its kernels and loads every tensor into its own Mixtral (tests/runtimes/). Pinned
(tests/runtimes/PINS) and installed by `make consumers`; each judge runs in its own process.

vLLM's decisions are compared with mixq's table of what runtimes refuse (quantize/runtimes.py), setting by
setting: a vLLM release that changes one fails here. Each judge is also shown to fail on a broken output: a tensor
renamed, the router quantized, `modules_to_not_convert` dropped.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixq.calibration import load_tokenizer, prepare
from mixq.calibration.fixtures import smollm2_hf
from mixq.convert import open_checkpoint
from mixq.quantize import Scheme, Settings, quantize_model
from mixq.quantize.check.generate import DEFAULT_PROMPTS, LoadedModel, generate, prompt_ids
from mixq.quantize.check.repository import read_quantized
from mixq.quantize.formats import FORMATS
from mixq.quantize.runtimes import verdicts
from tests.runtimes import PINS, folder, installed, run_judge
from tests.test_quantize_engine import CONSUMER_BOUND, forward_logits, tiny_hf
from tests.upcycle import upcycle

pytestmark = pytest.mark.runtimes
NEW_TOKENS = 16


def need(name: str) -> None:
    """CI installs every runtime (make test depends on make consumers): there a missing one is a failure."""
    if not installed(name):
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{name} is not installed: run `make consumers`")


def awq(group: int = 128, **options) -> Settings:
    return Settings(method="awq", scheme=FORMATS["awq"].scheme(4, group, options.pop("sym", False)), fmt="awq",
                    **options)


def gptq(group: int = 128, sym: bool = True, **options) -> Settings:
    return Settings(method="gptq", scheme=Scheme(4, group, sym=sym), fmt="gptq", **options)


# ---- the outputs judged ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 8-expert Mixtral, hidden 128 (group 128), routing margins wide: quick to make in every setting."""
    model = tiny_hf(tmp_path_factory.mktemp("tiny"), experts=8)
    return model, prepare(model, "kjv", samples=4, seqlen=64)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """quantize_model once per (model, settings): a repository each, shared by the tests of this module."""
    root, cache = tmp_path_factory.mktemp("made"), {}

    def make(model: Path, settings: Settings, blocks) -> Path:
        key = (str(model), repr(settings))
        if key not in cache:
            out = root / str(len(cache))
            quantize_model(model, out, settings, blocks)
            cache[key] = out
        return cache[key]
    return make


@pytest.fixture(scope="module")
def smol():
    model = smollm2_hf("f32")
    return model, prepare(model, "kjv", samples=4, seqlen=128, tokenizer=load_tokenizer(model))


@pytest.fixture(scope="module")
def moe(tmp_path_factory, smol):
    """An 8-expert Mixtral upcycled from SmolLM2's first four layers, experts made distinct by noise, the router's
    margins widened so that fp16 rounding cannot flip a token's experts (a flip moves a logit by far more than
    rounding does, and would say nothing about the format); hidden 576, so group 64."""
    model = upcycle(smol[0], tmp_path_factory.mktemp("moe") / "hf", experts=8, noise=0.05, seed=1, layers=4,
                    router_scale=20)
    return model, prepare(model, "kjv", samples=4, seqlen=128, tokenizer=load_tokenizer(model))


# ---- AutoAWQ ---------------------------------------------------------------------------------------------------

def mixq_greedy_fp16(repo: Path, max_new: int) -> list[int]:
    """The greedy continuation of the first default prompt by `mixq check --dtype f16`'s own generation."""
    model = LoadedModel(read_quantized(repo, torch.float16), torch.device("cpu"), torch.float16)
    return generate(model, load_tokenizer(repo), DEFAULT_PROMPTS[:1], max_new)[0]["tokens"]


def judge_autoawq(repo: Path) -> tuple[dict, list[str]]:
    """AutoAWQ's result on `repo` and the problems found in it (none for a repository it loads as mixq wrote it)."""
    tokens = prompt_ids(load_tokenizer(repo), DEFAULT_PROMPTS[0])
    try:
        result = run_judge("autoawq", repo, json.dumps(tokens), NEW_TOKENS)
    except AssertionError as e:
        return {}, [f"AutoAWQ failed to load it: {str(e)[-300:]}"]
    problems = [f"{key}: {result[key][:5]}" for key in ("unexpected", "missing", "meta") if result[key]]
    routers = {name: kind for name, kind in result["linears"].items() if name.endswith("block_sparse_moe.gate")}
    problems += [f"{name} is {kind}, not an unquantized Linear" for name, kind in routers.items() if kind != "Linear"]
    quantized = {kind for name, kind in result["linears"].items() if name not in routers and name != "lm_head"}
    if quantized != {"WQLinear_GEMM"}:
        problems.append(f"quantized linears are {sorted(quantized)}")
    result["tokens"] = tokens
    return result, problems


# AutoAWQ's WQLinear_GEMM (without its CUDA extension) dequantizes to fp16 and multiplies x @ W in fp16, as mixq's
# fp16 forward multiplies h @ W.T: each rounds to fp16 a few times per layer, in an order the CPU's fp16 GEMM picks
# for the operands' layout. So AutoAWQ's fp16 logits are held to the exact (fp32) ones as tightly as mixq's own fp16
# logits are, within a factor of two and CONSUMER_BOUND (ten unit roundoffs of the largest logit). Measured: on an
# Intel CPU of an earlier session the two fp16 results were identical; on this AMD EPYC (AVX-512 BF16) SmolLM2 parts
# by 14.5 roundoffs after 30 layers.
@pytest.mark.slow
@pytest.mark.parametrize("which", ["smol", "moe", "tiny"])
def test_autoawq_loads_and_runs_mixqs_awq(made, smol, moe, tiny, which):
    need("autoawq")
    model, blocks = {"smol": smol, "moe": moe, "tiny": tiny}[which]
    repo = made(model, awq(128 if which == "tiny" else 64), blocks)
    result, problems = judge_autoawq(repo)
    assert problems == []
    if which != "smol":
        assert sum(name.endswith("block_sparse_moe.gate") for name in result["linears"]) == \
            open_checkpoint(model).spec.num_layers
    logits = forward_logits(read_quantized(repo, torch.float16), result["tokens"], torch.float16).float()
    exact = forward_logits(read_quantized(repo), result["tokens"])
    tokens = mixq_greedy_fp16(repo, NEW_TOKENS)
    theirs = torch.tensor(result["logits"]).float()
    ours_off, theirs_off = float((logits - exact).abs().max()), float((theirs - exact).abs().max())
    assert theirs_off <= 2 * ours_off + CONSUMER_BOUND * float(exact.abs().max()), (theirs_off, ours_off)
    eos = load_tokenizer(repo).eos_token_id
    assert [t for t in result["generated"] if t != eos] == tokens


def _mutated(repo: Path, dest: Path, rename=None, quantize_router=False, config=None) -> Path:
    shutil.copytree(repo, dest)
    (file,) = dest.glob("*.safetensors")
    tensors = load_file(str(file))
    if rename:
        tensors[rename[1]] = tensors.pop(rename[0])
    if quantize_router:   # the router written as AWQ's packed tensors, as a tool that forgot to skip it would
        from mixq.quantize.quantizer import rtn
        fmt = FORMATS["awq"]
        for name in [n for n in tensors if n.endswith("block_sparse_moe.gate.weight")]:
            scheme = fmt.scheme(4, 128, False)
            packed = fmt.pack(rtn(tensors.pop(name).float(), scheme), scheme)
            tensors.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in packed.items()})
    save_file(tensors, str(file), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dest / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


EXPERT = "model.layers.0.block_sparse_moe.experts.3.w1.qweight"
MUTATIONS = {
    "renamed": dict(rename=(EXPERT, EXPERT.replace(".w1.", ".w_1."))),
    "router quantized": dict(quantize_router=True),
    "modules_to_not_convert dropped": dict(config={"modules_to_not_convert": None}),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_autoawq_fails_a_broken_awq(tmp_path, made, tiny, mutation):
    need("autoawq")
    repo = _mutated(made(tiny[0], awq(grid=2, clip=False), tiny[1]), tmp_path / "broken", **MUTATIONS[mutation])
    _, problems = judge_autoawq(repo)
    assert problems, mutation


# ---- vLLM ------------------------------------------------------------------------------------------------------

# vLLM's fast int4 paths: Hopper's Machete or Marlin for the dense linears, Marlin for the MoE (int_wna16)
FAST_DENSE = {"MacheteLinearKernel", "MarlinLinearKernel"}
FAST_MOE = {"MARLIN"}
QUANTIZED = (".self_attn.qkv_proj", ".self_attn.o_proj", ".experts.routed_experts", ".mlp.gate_up_proj",
             ".mlp.down_proj")


def vllm_verdict(result: dict) -> tuple[bool, bool, str]:
    """(refused, slow, why) as vLLM decided them for one repository."""
    if "refused" in result or "load_error" in result:
        return True, False, result.get("refused") or result["load_error"]
    slow = []
    for name, kind in result["kernels"].items():
        if not name.endswith(QUANTIZED):
            continue
        method, _, kernel = kind.partition("/")
        fast = FAST_MOE if name.endswith(".experts.routed_experts") else FAST_DENSE
        if kernel not in fast:
            slow.append(f"{name}: {kind}")
    return False, bool(slow), "; ".join(slow)


def assert_vllm_matches_mixq(result: dict, settings: Settings, spec) -> None:
    refused, slow, why = vllm_verdict(result)
    ours = verdicts(settings, spec)
    assert (refused, slow) == (any("vLLM" in v.refused_by for v in ours), any("vLLM" in v.slower_in for v in ours)), \
        (why, ours)
    if refused:  # mixq's refusal quotes vLLM's own words
        quotes = [v.why.split("vLLM: ")[1].split(";")[0] for v in ours if "vLLM" in v.refused_by]
        assert any(quote in why for quote in quotes), (why, quotes)
        return
    assert result["unloaded"] == [] and result["unread"] == [], (result["unloaded"][:5], result["unread"][:5])
    assert all(name.endswith(".g_idx") for name in result["dropped"]), result["dropped"][:5]
    kernels = result["kernels"]
    assert not any(kernels[n].startswith("Unquantized") for n in kernels if n.endswith(QUANTIZED)), kernels
    routers = [n for n in kernels if n.endswith("block_sparse_moe.gate")]
    assert all(kernels[n] == "UnquantizedLinearMethod" for n in routers), kernels


# every output setting mixq offers for the two formats; the tiny Mixtral's hidden size 128 Marlin tiles
SETTINGS = {
    "awq": awq(grid=2, clip=False),
    "awq group 64": awq(64, grid=2, clip=False),
    "awq --no-zero-point": awq(sym=True, grid=2, clip=False),
    "awq --expert-naming transformers": awq(grid=2, clip=False, expert_naming="transformers"),
    "gptq": gptq(act_order=True, static_groups=True),
    "gptq group 32": gptq(32, act_order=True, static_groups=True),
    "gptq --no-desc-act": gptq(act_order=False),
    "gptq --asym": gptq(sym=False, act_order=True, static_groups=True),
    "gptq --desc-act --no-static-groups": gptq(act_order=True, static_groups=False),
    "gptq --expert-naming transformers": gptq(act_order=True, static_groups=True, expert_naming="transformers"),
}


@pytest.mark.parametrize("name", PINS)
def test_each_runtime_is_installed_at_its_pins(name):
    need(name)

    def canonical(project: str) -> str:
        return re.sub(r"[-_.]+", "-", project).lower()
    dists = importlib.metadata.distributions(path=[str(folder(name))])
    found = {canonical(d.metadata["Name"]): d.version for d in dists}
    assert {canonical(p.split("==")[0]): p.split("==")[1] for p in PINS[name]}.items() <= found.items()


@pytest.mark.parametrize("setting", SETTINGS)
def test_vllm_decides_as_mixqs_table_says(made, tiny, setting):
    need("vllm")
    model, blocks = tiny
    repo = made(model, SETTINGS[setting], blocks)
    result = run_judge("vllm", repo)
    assert result["versions"] == {"vllm": "0.33.0", "transformers": "5.20.2"}
    assert result["platform"].startswith("NVIDIA H100")
    assert_vllm_matches_mixq(result, SETTINGS[setting], open_checkpoint(model).spec)


@pytest.mark.slow
@pytest.mark.parametrize("which,settings", [("smol", awq(64)), ("smol", gptq(64, act_order=True, static_groups=True)),
                                            ("moe", awq(64))])
def test_vllm_loads_the_real_models(made, smol, moe, which, settings):
    """SmolLM2 (vLLM's Llama) in both formats, and the upcycled MoE, whose hidden size 576 costs vLLM its Marlin
    MoE kernel: mixq refuses it unless told, and vLLM indeed falls back."""
    need("vllm")
    model, blocks = {"smol": smol, "moe": moe}[which]
    result = run_judge("vllm", made(model, settings, blocks))
    assert result["model"] == ("LlamaForCausalLM" if which == "smol" else "MixtralForCausalLM")
    assert_vllm_matches_mixq(result, settings, open_checkpoint(model).spec)


@pytest.mark.parametrize("mutation", ["renamed", "router quantized"])
def test_vllm_fails_a_broken_output(tmp_path, made, tiny, mutation):
    """(vLLM's router is a plain GateLinear whatever the config says, so dropping modules_to_not_convert does not
    matter to it; AutoAWQ's test covers that mutation.)"""
    need("vllm")
    repo = _mutated(made(tiny[0], awq(grid=2, clip=False), tiny[1]), tmp_path / "broken", **MUTATIONS[mutation])
    result = run_judge("vllm", repo)
    # vLLM raises on a name no module has; a name its expert loader does not match it skips without a word,
    # leaving that expert's memory as it was allocated: only the judge's count of what was copied sees it
    assert "load_error" in result or result["unread"], result

"""The check: perplexity against a direct transformers computation, generation against transformers' generate,
quantized repositories through an independent unpacker, bad input."""

import json
import math

import pytest
import torch

from mixq.calibration import load_tokenizer, prepare
from mixq.calibration.blocks import evaluation_ids
from mixq.convert import MixqError
from mixq.quantize import Scheme, Settings, quantize_model
from mixq.quantize.check import open_any, run_check
from mixq.quantize.check.evaluate import make_windows, perplexity
from mixq.quantize.check.generate import LoadedModel, generate, prompt_ids
from mixq.quantize.formats import FORMATS
from tests.test_quantize_engine import tiny_hf

SEQLEN = 128


def transformers_ppl(model, windows, first_scored: int) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0].double()
            logp = torch.log_softmax(logits[first_scored:-1], -1)
            nll -= logp.gather(1, row[first_scored + 1:, None]).sum().item()
            count += len(row) - 1 - first_scored
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return tiny_hf(tmp_path_factory.mktemp("m"), decisive_router=False)


@pytest.fixture(scope="module")
def tokenizer(mixtral):
    return load_tokenizer(mixtral)


@pytest.mark.parametrize("method", ["windows", "llamacpp"])
def test_perplexity_equals_transformers(mixtral, tokenizer, method):
    from transformers import AutoModelForCausalLM
    ids, _ = evaluation_ids(tokenizer, "shakespeare")
    windows = make_windows(ids, SEQLEN, method, bos_id=tokenizer.bos_token_id, max_tokens=4 * SEQLEN)
    if method == "llamacpp":
        assert (windows.tokens[:, 0] == 1).all() and windows.first_scored == SEQLEN // 2
    ours = perplexity(open_any(mixtral), windows, batch=3)
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    assert ours["perplexity"] == pytest.approx(transformers_ppl(model, windows.tokens, windows.first_scored),
                                               rel=1e-5)
    assert ours["tokens"] == 4 * (SEQLEN - 1 - windows.first_scored)


def test_greedy_generation_equals_transformers_generate(mixtral, tokenizer):
    from transformers import AutoModelForCausalLM
    prompts = ["What is your favourite condiment?", "Hello"]
    ours = generate(LoadedModel(open_any(mixtral), "cpu", torch.float32), tokenizer, prompts, max_new_tokens=12)
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    for prompt, result in zip(prompts, ours):
        ids = prompt_ids(tokenizer, prompt)
        assert ids[:4] == [1, 733, 16289, 28793]  # <s> [INST]
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=2)
        new = expected[0, len(ids):].tolist()
        if 2 in new:
            new = new[:new.index(2)]
        assert result["tokens"] == new and len(new) > 0


def _dense_from_spec_unpacker(repo, out):
    """A dense HF checkpoint whose linears are the repository's packed tensors decoded by the tests' own
    unpackers (written from the format specifications)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.test_awq import unpack_awq_from_spec
    from tests.test_quantize_engine import unpack_gptq_from_spec
    config = json.loads((repo / "config.json").read_text())
    qc = config.pop("quantization_config")
    tensors = {}
    with safe_open(repo / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for name in names:
            if name.endswith(".qweight"):
                base = name[: -len(".qweight")]
                parts = {s: f.get_tensor(f"{base}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")
                         if f"{base}.{s}" in names}
                if qc["quant_method"] == "awq":
                    w = unpack_awq_from_spec(parts["qweight"], parts["qzeros"], parts["scales"], qc["group_size"])
                else:
                    w = unpack_gptq_from_spec(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"],
                                              qc["bits"])
                tensors[f"{base}.weight"] = w.float().contiguous()
            elif not name.endswith((".qzeros", ".scales", ".g_idx")):
                tensors[name] = f.get_tensor(name).float()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_quantized_repositories(tmp_path, fmt):
    from transformers import AutoModelForCausalLM
    hf = tiny_hf(tmp_path, hidden_dim=128, layers=1)
    blocks = prepare(hf, "kjv", samples=2, seqlen=32)
    settings = Settings(method=fmt, scheme=FORMATS[fmt].scheme(4, 128), fmt=fmt)
    quantize_model(hf, tmp_path / "q", settings, blocks)
    tokenizer = load_tokenizer(tmp_path / "q")
    ids, _ = evaluation_ids(tokenizer, "shakespeare")
    windows = make_windows(ids, 64, max_tokens=2 * 64)
    ours = perplexity(open_any(tmp_path / "q"), windows)["perplexity"]
    dense = AutoModelForCausalLM.from_pretrained(_dense_from_spec_unpacker(tmp_path / "q", tmp_path / "dense"),
                                                 dtype=torch.float32)
    assert ours == pytest.approx(transformers_ppl(dense, windows.tokens, 0), rel=1e-5)


def test_cli_report(cli, tmp_path, mixtral):
    settings = Settings(method="rtn", scheme=Scheme(4, 128, sym=True), fmt="gptq")
    quantize_model(mixtral, tmp_path / "q", settings)
    result = cli("check", tmp_path / "q", "--reference", mixtral, "--seqlen", 64, "--max-tokens", 256,
                 "--max-new-tokens", 4, "--prompt", "Hi", "--json", "-o", tmp_path / "check.json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"perplexity", "tokens", "method", "seqlen", "generations", "reference_perplexity", "kl"} <= set(report)
    assert report["generations"][0]["prompt"] == "Hi" and isinstance(report["generations"][0]["text"], str)
    assert report["tokens"] == 4 * 63 and report["method"] == "windows" and report["kl"] > 0
    assert json.loads((tmp_path / "check.json").read_text())["perplexity"] == report["perplexity"]
    failed = cli("check", tmp_path / "q", "--reference", mixtral, "--seqlen", 64, "--max-tokens", 128,
                 "--max-new-tokens", 0, "--fail-above", "0", "-o", tmp_path / "check.json", "--force")
    assert failed.exit_code == 3 and "check failed" in failed.stderr and "left as it was" in failed.stderr
    # the report that passed stays: a pipeline remakes the failed check next time instead of trusting it
    assert json.loads((tmp_path / "check.json").read_text())["perplexity"] == report["perplexity"]


def test_sample_generations_state_their_dtype(mixtral):
    """fp16 on a GPU (what the runtimes serve in) unless asked; a CPU keeps the compute dtype; the card says which."""
    from mixq.quantize.device import generation_dtype
    from mixq.quantize.release.card import _check_section
    cuda = torch.device("cuda")
    assert generation_dtype("auto", cuda) == torch.float16 and generation_dtype("bf16", cuda) == torch.bfloat16
    assert generation_dtype("auto", torch.device("cpu")) == torch.float32
    for label, name in (("auto", "float32"), ("f16", "float16")):
        report = run_check(mixtral, seqlen=64, max_tokens=128, max_new_tokens=3, prompts=["Hi"], dtype=label)
        assert report["generation_dtype"] == name and report["generations"][0]["new_tokens"] >= 1
        line = next(x for x in _check_section(report) if x.startswith("Greedy decoding"))
        assert f"computed by mixq on cpu in {name}" in line
        assert ("what fp16 runtimes such as vLLM" in line) == (name == "float16")


def test_reference_equal_to_model_has_zero_kl(mixtral, tokenizer):
    report = run_check(mixtral, reference=mixtral, seqlen=64, max_tokens=128, max_new_tokens=0)
    assert report["kl"] == pytest.approx(0, abs=1e-9) and report["delta"] == pytest.approx(0, abs=1e-9)


def test_eval_text_shorter_than_one_window(cli, tmp_path, mixtral):
    text = tmp_path / "short.txt"
    text.write_text("Too short.")
    result = cli("check", mixtral, "--eval", text, "--seqlen", 512)
    assert result.exit_code == 1 and "fewer than one window of 512" in result.stderr


def test_unknown_layout(cli, tmp_path):
    (tmp_path / "nothing").mkdir()
    result = cli("check", tmp_path / "nothing")
    assert result.exit_code == 1 and "not a checkpoint" in result.stderr
    with pytest.raises(MixqError):
        open_any(tmp_path / "nothing")


def test_a_gate_needs_a_reference(cli, mixtral):
    """--fail-above without --reference would compare with nothing and always pass: a usage error, before work."""
    result = cli("check", mixtral, "--fail-above", "5")
    assert result.exit_code == 2 and "--fail-above needs --reference" in result.stderr


@pytest.mark.parametrize("reference", [None, "base/model"])
def test_make_check_compares_with_the_reference_it_is_given(reference):
    """`make check MODEL=X` checks X alone; with REFERENCE=Y against Y, named once (never X against itself)."""
    import shlex
    import subprocess
    from pathlib import Path
    args = ["make", "-n", "--no-print-directory", "check", "MODEL=some/model", "INSTALL=", "MIXQ=mixq"]
    args += [f"REFERENCE={reference}"] if reference else []
    out = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True).stdout
    command = shlex.split(next(line for line in out.splitlines() if line.startswith("mixq check")))
    given = [command[i + 1] for i, a in enumerate(command) if a == "--reference"]
    assert command[2] == "some/model" and given == ([reference] if reference else [])


@pytest.mark.parametrize("content, says", [("{not json", "invalid JSON at line 1 column 2"),
                                           ("[1, 2]", "expected a JSON object, found list"),
                                           (b"\xff\xfe{}", "not UTF-8 text")])
def test_unreadable_json_in_a_repository_is_bad_input(cli, tmp_path, mixtral, content, says):
    """Any JSON a user hands mixq goes through one reader: exit 1 and a line naming the file, never exit 70."""
    quantize_model(mixtral, tmp_path / "q", Settings(method="rtn", scheme=Scheme(4, 128, sym=True), fmt="gptq"))
    bad = tmp_path / "q" / "generation_config.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = cli("check", tmp_path / "q", "--seqlen", 64, "--max-tokens", 128, "--max-new-tokens", 0)
    assert result.exit_code == 1, result.stderr
    assert f"{bad}: {says}" in result.stderr and result.stderr.count("\n") == 1

"""The check under a device-memory budget: the same numbers and tokens as without one, the accountant's peak inside
the budget, quantized layers kept packed, only routed experts touched at decode, a too-small budget refused."""

import math

import pytest
import torch

from mixq.calibration import load_tokenizer
from mixq.calibration.blocks import evaluation_ids
from mixq.convert import MixqError
from mixq.convert.architecture import plan
from mixq.quantize import Settings, quantize_model
from mixq.quantize.check import open_any, run_check
from mixq.quantize.check.evaluate import make_windows, perplexity
from mixq.quantize.check.generate import LoadedModel, generate
from mixq.quantize.formats import FORMATS
from mixq.quantize.forward import KVCache, Rotary
from mixq.quantize.memory import Budget, tensor_bytes
from tests.test_quantize_engine import tiny_hf

PROMPTS = ["Write a haiku about the sea.", "Hello"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 4-layer, 8-expert Mixtral and its AWQ and GPTQ repositories (round-to-nearest: the format is the point)."""
    root = tmp_path_factory.mktemp("budget")
    hf = tiny_hf(root / "src", layers=4, experts=8, hidden_dim=256)
    out = {"hf": hf}
    for fmt in ("awq", "gptq"):
        settings = Settings(method="rtn", scheme=FORMATS[fmt].scheme(4, 128, fmt == "gptq"), fmt=fmt)
        quantize_model(hf, root / fmt, settings)
        out[fmt] = root / fmt
    return out


def _sizes(ckpt, dtype=torch.float32):
    """(every layer in the compute dtype, every layer in its compact form, one layer in the compute dtype)."""
    layer = sum(tensor_bytes(s, dtype) for s in plan(ckpt.spec).tensor_shapes.values())
    compact = sum(sum(p.nbytes for p in ref.packed.values()) if ref.packed else tensor_bytes(ref.shape, dtype)
                  for name, ref in ckpt.tensors.items() if name.startswith("model.layers."))
    return ckpt.spec.num_layers * layer, compact, layer


def _fixed(ckpt, context):
    unlimited = LoadedModel(ckpt, "cpu", torch.float32, Budget(None, "cpu"), context)
    return unlimited.budget.resident - _sizes(ckpt)[0]


def _generate(path, budget, context=64, host=None):
    ckpt = open_any(path)
    model = LoadedModel(ckpt, "cpu", torch.float32, budget, context, host)
    return model, generate(model, load_tokenizer(path), PROMPTS, max_new_tokens=12)


@pytest.mark.parametrize("kind", ["awq", "gptq", "hf"])
def test_generation_under_a_budget_is_token_identical(models, kind):
    path = models[kind]
    ckpt = open_any(path)
    full, compact, layer = _sizes(ckpt)
    fixed = _fixed(ckpt, 64)
    _, expected = _generate(path, Budget(None, "cpu"))
    # nothing fits beside the room for one layer: every layer read (and dequantized) per token
    small = fixed + layer + layer // 10
    model, got = _generate(path, Budget(small, "cpu"))
    assert model.store.streamed == ckpt.spec.num_layers
    assert [g["tokens"] for g in got] == [g["tokens"] for g in expected]
    assert model.budget.peak <= small and model.budget.peak > fixed
    assert all(g["bytes_moved_per_step"] > 0 for g in got)
    if kind != "hf":
        # between the packed and the dequantized size: every layer resident, packed, dequantized just in time
        assert compact + layer < full
        mid = fixed + layer + compact + 4096
        model, got = _generate(path, Budget(mid, "cpu"))
        assert model.store.streamed == 0 and model.budget.peak <= mid
        assert all(isinstance(model.store.resident[0][f"{m}.weight"], dict) for m in plan(ckpt.spec).modules)
        assert [g["tokens"] for g in got] == [g["tokens"] for g in expected]
        assert all(g["bytes_moved_per_step"] == 0 and g["dequantized_per_step"] > 0 for g in got)
        # a budget that holds every layer dequantized keeps them so: nothing is dequantized per token
        model, got = _generate(path, Budget(fixed + full, "cpu"))
        assert all(isinstance(t, torch.Tensor) for t in model.store.resident[0].values())
        assert [g["tokens"] for g in got] == [g["tokens"] for g in expected]
        assert all(g["dequantized_per_step"] == 0 for g in got)


@pytest.mark.parametrize("kind", ["awq", "hf"])
def test_streamed_layers_held_in_host_memory_give_the_same_tokens(models, kind):
    """The GPU's path (pinned host memory, which a CPU cannot pin): streamed layers copied once into host memory as
    far as `host` allows, and read from there per token; what does not fit is read from the checkpoint."""
    path = models[kind]
    ckpt = open_any(path)
    _, compact, layer = _sizes(ckpt)
    small = _fixed(ckpt, 64) + layer + layer // 10
    _, expected = _generate(path, Budget(None, "cpu"))
    model, got = _generate(path, Budget(small, "cpu"), host=compact)
    assert all(model.store.host) and model.store.streamed == ckpt.spec.num_layers
    assert [g["tokens"] for g in got] == [g["tokens"] for g in expected]
    assert set(model.store.read_from) == {"host"}
    layers = ckpt.spec.num_layers
    model, got = _generate(path, Budget(small, "cpu"), host=compact * 2 // layers)   # room for two layers
    assert [bool(h) for h in model.store.host] == [True, True] + [False] * (layers - 2)
    assert [g["tokens"] for g in got] == [g["tokens"] for g in expected]
    assert set(model.store.read_from) == {"host", "checkpoint"}


def test_decode_touches_only_the_routed_experts(models):
    path = models["awq"]
    ckpt = open_any(path)
    fixed, (_, compact, layer) = _fixed(ckpt, 64), _sizes(ckpt)
    model = LoadedModel(ckpt, "cpu", torch.float32, Budget(fixed + layer + compact + 4096, "cpu"), 64)
    spec = ckpt.spec
    rope, cache = Rotary.build(spec, 64, "cpu", torch.float32), KVCache(spec.num_layers)
    with torch.no_grad():
        model.step(torch.tensor([[1, 733, 16289, 28793, 22557]]), cache, rope)   # prefill: several tokens
        before = dict(model.store.unpacked)
        model.step(torch.tensor([[1824]]), cache, rope)                         # one decode step
    done = {key: n - before.get(key, 0) for key, n in model.store.unpacked.items() if n - before.get(key, 0)}
    assert all(n == 1 for n in done.values())
    for layer in range(spec.num_layers):
        modules = [m for (i, m) in done if i == layer]
        experts = {m.split(".")[2] for m in modules if ".experts." in m}
        assert len(experts) == spec.experts_per_tok    # two of eight experts, each of w1, w3 and w2 once
        assert len(modules) == 4 + 3 * spec.experts_per_tok   # and q, k, v, o


@pytest.mark.parametrize("kind", ["gptq", "hf"])
def test_perplexity_in_groups_of_windows_is_the_same(models, kind):
    path = models[kind]
    tokenizer = load_tokenizer(path)
    ids, _ = evaluation_ids(tokenizer, "shakespeare")
    windows = make_windows(ids, 64, max_tokens=8 * 64)
    expected = perplexity(open_any(path), windows, batch=1, reference=open_any(models["hf"]))
    ckpt = open_any(path)
    state = 2 * 64 * ckpt.spec.hidden_size * 4
    heads = 2 * (tensor_bytes(ckpt.tensors["lm_head.weight"].shape, torch.float32) + ckpt.spec.hidden_size * 4)
    logits = 4 * 64 * ckpt.spec.vocab_size * 4
    limit = heads + logits + 3 * state   # three windows' states at a time: three groups
    budget = Budget(limit, "cpu")
    got = perplexity(ckpt, windows, batch=1, reference=open_any(models["hf"]), budget=budget)
    assert got["perplexity"] == expected["perplexity"] and got["kl"] == expected["kl"]
    assert (expected["window_groups"], got["window_groups"]) == (1, 3)
    assert budget.peak <= limit
    with pytest.raises(MixqError, match="too small: perplexity.*needs at least"):
        perplexity(open_any(path), windows, batch=1, budget=Budget(limit // 4, "cpu"))


def test_a_budget_below_one_layer_is_refused_in_one_line(cli, models, tmp_path):
    result = cli("check", models["awq"], "--device-memory", "1MB", "--max-tokens", 128, "--seqlen", 64,
                 "-o", tmp_path / "c.json")
    assert result.exit_code == 1 and "--device-memory 1.0 MB is too small" in result.stderr, result.stderr
    assert "needs at least" in result.stderr and not (tmp_path / "c.json").exists()
    assert cli("check", models["awq"], "--device-memory", "lots").exit_code == 2


def test_check_reports_its_peak_under_the_budget(models):
    report = run_check(models["gptq"], eval_source="shakespeare", seqlen=64, max_tokens=4 * 64, prompts=["Hi"],
                       max_new_tokens=4, device="cpu", batch=1, device_memory="60MB")
    assert report["device_memory"] == 60_000_000 and 0 < report["peak_device_bytes"] <= 60_000_000
    assert math.isfinite(report["perplexity"]) and report["generations"][0]["new_tokens"] > 0


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantization_under_a_budget_smaller_than_its_activations_is_byte_identical(tmp_path, method):
    from mixq.calibration import prepare
    from mixq.quantize.runner import METHOD_COPIES, layer_working_set
    hf = tiny_hf(tmp_path / "src", layers=2, experts=8, hidden_dim=256)
    blocks = prepare(hf, "kjv", samples=16, seqlen=64)
    settings = Settings(method=method, scheme=FORMATS[method].scheme(4, 128, method == "gptq"), fmt=method, batch=4)
    spec = open_any(hf).spec
    working = layer_working_set(spec, settings, torch.float32, 64)
    activations = (2 + METHOD_COPIES[method]) * 16 * 64 * spec.hidden_size * 4
    unlimited = quantize_model(hf, tmp_path / "a", settings, blocks)
    budget = working + activations // 2      # one layer's work fits, the activations do not
    bounded = quantize_model(hf, tmp_path / "b", Settings(**{**settings.__dict__, "device_memory": budget}), blocks)
    for f in sorted((tmp_path / "a").glob("*.safetensors")) + [tmp_path / "a/config.json"]:
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    assert unlimited["peak_device_bytes"] > budget >= bounded["peak_device_bytes"] >= working
    assert bounded["device_memory"] == budget and unlimited["device_memory"] is None
    if method == "gptq":   # the eight down projections swept together, in sweeps of fewer, or one by one
        assert "8 of 8 expert down projections swept at once" in unlimited["memory_plan"]
        assert "8 of 8" not in bounded["memory_plan"] and "1 of 8" not in bounded["memory_plan"]
        one = quantize_model(hf, tmp_path / "c", Settings(**{**settings.__dict__, "device_memory": working}), blocks)
        assert "1 of 8 expert down projections" in one["memory_plan"]
        for f in sorted((tmp_path / "a").glob("*.safetensors")):
            assert f.read_bytes() == (tmp_path / "c" / f.name).read_bytes(), f.name


def test_a_quantization_budget_below_one_layer_is_refused(cli, tmp_path):
    hf = tiny_hf(tmp_path / "src", layers=1)
    result = cli("quantize", "gptq", hf, tmp_path / "out", "--calib", "kjv", "--samples", 2, "--seqlen", 32,
                 "--device-memory", "100kB")
    assert result.exit_code == 1 and "is too small: quantizing one layer with GPTQ needs at least" in result.stderr
    assert not (tmp_path / "out").exists()


CHECK_RSS = """
import json, os, sys, threading, time
from mixq.convert import progress
from mixq.quantize.check import run_check
progress.set_quiet(True)
small, big, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
kwargs = dict(eval_source="shakespeare", seqlen=64, max_tokens=4 * 64, prompts=["Hi"], max_new_tokens=3,
              device="cpu", batch=1)

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

run_check(small, **kwargs)   # imports, tokenizer, text and first allocations: the interpreter's share
base, peak, running = resident(), [0], [True]

def sample():
    while running[0]:
        peak[0] = max(peak[0], resident())
        time.sleep(0.002)

thread = threading.Thread(target=sample)
thread.start()
report = run_check(big, device_memory=budget, **kwargs)
running[0] = False
thread.join()
print(json.dumps({"grew": peak[0] - base, "peak": report["peak_device_bytes"]}))
"""


def test_on_a_cpu_the_budget_bounds_the_process(tmp_path):
    """A model several times the budget: the process grows by no more than the budget and two layers (one read
    from the file's pages, one in the compute dtype); it grew by the whole model when read pages stayed."""
    import json
    import subprocess
    import sys
    small = tiny_hf(tmp_path / "small", layers=1, dim=64, hidden_dim=128)
    big = tiny_hf(tmp_path / "big", layers=8, dim=256, hidden_dim=2048, experts=8)
    ckpt = open_any(big)
    full, _, layer = _sizes(ckpt)
    fixed = _fixed(ckpt, 80)
    budget = fixed + layer + layer // 4
    assert full + fixed > 3 * budget
    proc = subprocess.run([sys.executable, "-c", CHECK_RSS, str(small), str(big), str(budget)], capture_output=True,
                          text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peak"] <= budget
    assert result["grew"] <= budget + 2 * layer < full, (result, budget, layer)   # keeping the layers would fail

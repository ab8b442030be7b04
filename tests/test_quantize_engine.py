"""The quantization engine and GPTQ: reference forward, format against an independent unpacker, a real consumer,
experts without routed tokens, resume, bad input."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixq.calibration import Blocks, prepare
from mixq.convert import convert_checkpoint, open_checkpoint
from mixq.convert.errors import MixqError
from mixq.quantize import Scheme, Settings, quantize_model
from mixq.quantize.check.repository import read_quantized
from mixq.quantize.formats import FORMATS
from mixq.quantize.forward import Rotary, decoder_layer, rms_norm
from mixq.quantize.gptq_solver import Hessian, gptq_quantize
from mixq.quantize.quantizer import rtn
from tests.gptq_reference import gptq_reference
from tests.models import native_state, tiny_params, write_torrent

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [1, 733, 16289, 28793, 1824, 349, 574, 16020, 2076, 2487, 28804, 733, 28748, 16289, 28793, 22557, 1526]


def tiny_hf(path: Path, arch="mixtral", seed=0, decisive_router=True, **shape) -> Path:
    """A tiny model with hidden size 128 (one group of 128); a router scaled so routing has clear margins."""
    params = tiny_params(arch, **({"dim": 128, "hidden_dim": 256} | shape))
    state = native_state(params, torch.float32, seed)
    if decisive_router:
        for name in state:
            if name.endswith("feed_forward.gate.weight"):
                state[name] *= 20
    write_torrent(path / "src", params, state)
    convert_checkpoint(path / "src", path / "hf", "hf")
    return path / "hf"


def forward_logits(ckpt, tokens, dtype=torch.float32) -> torch.Tensor:
    """The engine's reference forward over a whole checkpoint (canonical tensors, fp32 unless told)."""
    spec = ckpt.spec
    x = ckpt.get("model.embed_tokens.weight").to(dtype)[torch.tensor([tokens])]
    rope = Rotary.build(spec, len(tokens), "cpu", dtype)
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        weights = {n[len(prefix):]: ckpt.get(n).to(dtype) for n in ckpt.tensors if n.startswith(prefix)}
        x = decoder_layer(x, weights, spec, rope)
    head = ckpt.get("model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight").to(dtype)
    return (rms_norm(x, ckpt.get("model.norm.weight").to(dtype), spec.rms_norm_eps) @ head.T)[0].float()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return tiny_hf(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def blocks(mixtral):
    return prepare(mixtral, "kjv", samples=8, seqlen=64)


# ---- the reference forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mixtral", "mistral", "llama"])
def test_reference_forward_equals_transformers(tmp_path, arch):
    hf = tiny_hf(tmp_path, "mistral" if arch == "llama" else arch, decisive_router=False)
    if arch == "llama":  # the same weights as a Llama checkpoint
        config = json.loads((hf / "config.json").read_text())
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        config.pop("sliding_window")
        (hf / "config.json").write_text(json.dumps(config))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert type(model).__name__.lower().startswith(arch)
    with torch.no_grad():
        expected = model(torch.tensor([TOKENS])).logits[0]
    assert torch.allclose(forward_logits(open_checkpoint(hf), TOKENS), expected, atol=1e-5, rtol=1e-5)


# ---- the GPTQ format against an unpacker written from its specification --------------------------------------

def unpack_gptq_from_spec(qweight, qzeros, scales, g_idx, bits):
    """AutoGPTQ v1, element by element: q[8r+j, o] is nibble j of qweight[r, o]; zero = stored nibble + 1 (mod
    16); W[o, k] = scale[g_idx[k], o] * (q[k, o] - zero[g_idx[k], o])."""
    qweight, qzeros = qweight.numpy().view(np.uint32), qzeros.numpy().view(np.uint32)
    per, mask = 32 // bits, (1 << bits) - 1
    in_features, out_features = qweight.shape[0] * per, qweight.shape[1]
    w = np.zeros((out_features, in_features), dtype=np.float64)
    for k in range(in_features):
        g = int(g_idx[k])
        for o in range(out_features):
            q = (int(qweight[k // per, o]) >> (bits * (k % per))) & mask
            z = (((int(qzeros[g, o // per]) >> (bits * (o % per))) & mask) + 1) & mask
            w[o, k] = float(scales[g, o]) * (q - z)
    return torch.from_numpy(w)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_format_against_spec_unpacker(sym, act_order, static):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    hessian = Hessian(64, "cpu")
    hessian.add(x)
    scheme = Scheme(4, 16, sym=sym)
    result = gptq_quantize(w, hessian.value(), scheme, act_order=act_order, static_groups=static)
    packed = FORMATS["gptq"].pack(result.weight, scheme)
    assert packed["qweight"].shape == (8, 16) and packed["qzeros"].shape == (4, 2)
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
    unpacked = unpack_gptq_from_spec(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    assert torch.equal(unpacked.float(), result.weight.dequantize())
    monotonic = bool((packed["g_idx"][1:] >= packed["g_idx"][:-1]).all())
    assert monotonic == (not act_order or static)
    if sym:
        assert (packed["qzeros"].numpy().view(np.uint32) == 0x77777777).all()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_solver_against_the_paper_in_float64(sym, act_order, static):
    """The engine's solver (blocks, sub-blocks, the flipped-Cholesky inverse, fp32) against Algorithm 1 in float64
    with every update applied at once: the same codes (a rounding tie may flip one in a thousand) and the same
    loss within 1e-5 (measured: within 3e-6, no code different, over three seeds)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(128, 512, generator=g)
    mix = torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512 ** 0.5
    hessian = Hessian(512, "cpu")
    hessian.add(torch.randn(2048, 512, generator=g) @ mix * torch.linspace(0.2, 2, 512))
    scheme = Scheme(4, 64, sym=sym)
    result = gptq_quantize(w, hessian.value(), scheme, act_order=act_order, static_groups=static)
    codes, loss = gptq_reference(w, hessian.value(), scheme, act_order=act_order, static_groups=static)
    assert (result.weight.q.float() != codes).float().mean() <= 1e-3
    assert abs(result.loss - loss) <= 1e-5 * loss


def test_gptq_beats_round_to_nearest_on_its_inputs():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    x = torch.randn(2048, 256) @ torch.randn(256, 256) * 0.1
    hessian = Hessian(256, "cpu")
    hessian.add(x)
    scheme = Scheme(4, 64, sym=True)
    error = lambda q: ((x @ (w - q).T).norm() / (x @ w.T).norm()).item()  # noqa: E731
    assert error(gptq_quantize(w, hessian.value(), scheme).weight.dequantize()) < \
        0.8 * error(rtn(w, scheme).dequantize())


# ---- end to end ---------------------------------------------------------------------------------------------

# GPTQModel's plain torch kernels, requested by name (tests/consumer.py): TorchLinear dequantizes GPTQ weights with
# fp16 scales (each weight rounded to fp16 once) and multiplies in fp32; AwqTorchLinear computes in fp16
# (activations and weights rounded to fp16 at every linear). Both round to fp16's unit roundoff 2^-11 a few times
# per layer; measured against the engine's fp32 forward, as a share of the largest logit: GPTQ 6e-4 (tiny Mixtral)
# and 2.2e-3 (30-layer SmolLM2), AWQ 2.7e-3 and 2.6e-3. The bound is ten unit roundoffs, about twice the worst.
# (GPTQModel's auto choice on a CPU with AVX-512 BF16 is its ATen int4 kernel in bf16: 1.1e-2 and 4.9e-2, and a
# different argmax on SmolLM2; that is why the tests name their kernel.)
CONSUMER_KERNELS = {"gptq": "TorchLinear", "awq": "AwqTorchLinear"}
CONSUMER_BOUND = 10 * 2.0 ** -11


def consumer_output(repo: Path, tokens, backend: str = "torch") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests/consumer.py"), str(repo), json.dumps(tokens), backend],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def run_consumer(repo: Path, tokens) -> torch.Tensor:
    """The consumer's logits through GPTQModel's torch kernel; fails unless that kernel, and only it, ran."""
    proc = consumer_output(repo, tokens)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    method = json.loads((Path(repo) / "config.json").read_text())["quantization_config"]["quant_method"]
    assert result["kernels"] == [CONSUMER_KERNELS[method]], result["kernels"]
    return torch.tensor(result["logits"])


def assert_consumer_agrees(logits: torch.Tensor, expected: torch.Tensor) -> None:
    assert (logits - expected).abs().max() < CONSUMER_BOUND * expected.abs().max(), \
        float((logits - expected).abs().max() / expected.abs().max())
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_and_gptqmodel_load_the_gptq_mixtral(tmp_path, mixtral, blocks, sym):
    settings = Settings(method="gptq", scheme=Scheme(4, 128, sym=sym), fmt="gptq", expert_naming="transformers")
    quantize_model(mixtral, tmp_path / "q", settings, blocks)
    expected = forward_logits(read_quantized(tmp_path / "q"), TOKENS)
    assert_consumer_agrees(run_consumer(tmp_path / "q", TOKENS), expected)


def test_random_experts_fail_the_consumer_check(tmp_path, mixtral, blocks):
    """Classic expert names are what vLLM/TGI read; transformers 5 + defuser silently leaves those experts
    random (or fails): the logits check must not pass."""
    settings = Settings(method="gptq", scheme=Scheme(4, 128, sym=False), fmt="gptq", expert_naming="classic")
    quantize_model(mixtral, tmp_path / "q", settings, blocks)
    expected = forward_logits(read_quantized(tmp_path / "q"), TOKENS)
    proc = consumer_output(tmp_path / "q", TOKENS)
    if proc.returncode == 0:
        logits = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])["logits"])
        assert (logits - expected).abs().max() > 0.1 * expected.abs().max()


def test_experts_without_routed_tokens_are_quantized_from_all_tokens(tmp_path, mixtral):
    """One repeated token routes every position to the same two experts; the other two still get GPTQ."""
    calib = Blocks(torch.full((4, 32), 1824, dtype=torch.long), {"source": "one repeated token"})
    settings = Settings(method="gptq", scheme=Scheme(4, 128, sym=True), fmt="gptq")
    report = quantize_model(mixtral, tmp_path / "q", settings, calib)
    routed = report["layers"][0]["routed_tokens"]
    idle = [e for e, n in enumerate(routed) if n == 0]
    assert len(idle) == 2 and report["expert_coverage"]["experts_without_routed_tokens"] >= 2
    quantized = read_quantized(tmp_path / "q")
    source = open_checkpoint(mixtral)
    for e in idle:
        for proj in ("w1", "w2", "w3"):
            name = f"model.layers.0.block_sparse_moe.experts.{e}.{proj}.weight"
            w = source.get(name)
            q = quantized.get(name)
            assert torch.isfinite(q).all()
            assert not torch.equal(q, rtn(w, Scheme(4, 128, sym=True)).dequantize())  # GPTQ, not a fallback
            assert report["layers"][0]["gptq_loss"][name.split(".", 3)[3][: -len(".weight")]] > 0


def test_report_and_files(cli, tmp_path, mixtral):
    out = tmp_path / "q"
    result = cli("quantize", "gptq", mixtral, out, "--calib", "kjv", "--samples", 4, "--seqlen", 32, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "quantize_config.json", "report.json", "generation_config.json", "tokenizer.json",
            "tokenizer.model", "model.safetensors"} <= files
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 128 and qc["sym"] is True
    assert qc["checkpoint_format"] == "gptq" and qc["static_groups"] is True and qc["desc_act"] is False
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert report["calibration"]["samples"] == 4 and report["calibration"]["source"] == "kjv"
    assert len(report["layers"]) == 2 and all(layer["seconds"] > 0 for layer in report["layers"])
    assert all(0 < layer["output_error"] < 1 for layer in report["layers"])
    assert len(report["layers"][0]["routed_tokens"]) == 4 and sum(report["layers"][0]["routed_tokens"]) == 2 * 4 * 32
    from safetensors import safe_open
    keys = set(safe_open(out / "model.safetensors", "pt").keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.qweight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys  # the router stays in fp16
    assert not any(k.startswith("model.layers.0.block_sparse_moe.gate.q") for k in keys)


def test_transformers_expert_naming(tmp_path, mixtral, blocks):
    settings = Settings(method="rtn", scheme=Scheme(4, 128, sym=True), fmt="gptq", expert_naming="transformers")
    quantize_model(mixtral, tmp_path / "q", settings)
    from safetensors import safe_open
    keys = set(safe_open(tmp_path / "q/model.safetensors", "pt").keys())
    assert "model.layers.1.mlp.experts.2.down_proj.qweight" in keys and "model.layers.1.mlp.gate.weight" in keys
    assert not any("block_sparse_moe" in k for k in keys)


def _digests(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.name != "report.json"}


def test_resume_is_byte_identical(tmp_path, mixtral, blocks, monkeypatch):
    settings = Settings(method="gptq", scheme=Scheme(4, 128, sym=False), fmt="gptq")
    quantize_model(mixtral, tmp_path / "whole", settings, blocks)
    import mixq.quantize.runner as runner
    real = runner._write_layer

    def crash_after_first(path, layer, *args):
        if layer == 1:
            raise KeyboardInterrupt("killed")
        return real(path, layer, *args)

    monkeypatch.setattr(runner, "_write_layer", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(mixtral, tmp_path / "resumed", settings, blocks)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.mixq-partial").is_dir()
    monkeypatch.setattr(runner, "_write_layer", real)
    report = quantize_model(mixtral, tmp_path / "resumed", settings, blocks, resume=True)
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "resumed")
    assert not (tmp_path / ".resumed.mixq-partial").exists()


@pytest.mark.parametrize("method, gptaq", [("gptq", False), ("awq", False), ("gptq", True)])
def test_resume_from_a_checkpoint_every_two_layers_is_byte_identical(tmp_path, method, gptaq, monkeypatch):
    """Layers are written behind the compute and the resume checkpoint only every second layer: a crash while the
    fourth layer is written leaves the progress of the second, and the resumed run redoes the third and fourth to
    the same bytes as a run that checkpointed every layer (GPTAQ: both hidden-state streams saved and restored)."""
    model = tiny_hf(tmp_path / "m", layers=4)
    four = prepare(model, "kjv", samples=4, seqlen=32)
    fmt = FORMATS[method]
    settings = Settings(method=method, scheme=fmt.scheme(4, 128, method == "gptq"), fmt=method, gptaq=gptaq)
    quantize_model(model, tmp_path / "whole", settings, four)
    import mixq.quantize.runner as runner
    real, saved = runner._write_layer, []

    def crash_at_the_last(path, layer, *args):
        if layer == 3:
            raise KeyboardInterrupt("killed")
        return real(path, layer, *args)

    monkeypatch.setattr(runner, "_write_layer", crash_at_the_last)
    monkeypatch.setattr(runner.Work, "save", lambda self, state, hidden, save=runner.Work.save:
                        saved.append(state["next_layer"]) or save(self, state, hidden))
    every_two = dataclasses.replace(settings, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, tmp_path / "resumed", every_two, four)
    work = tmp_path / ".resumed.mixq-partial"
    assert saved == [2] and json.loads((work / "state.json").read_text())["next_layer"] == 2
    assert not (tmp_path / "resumed").exists() and (work / "layer-00002.safetensors").is_file()
    monkeypatch.setattr(runner, "_write_layer", real)
    report = quantize_model(model, tmp_path / "resumed", every_two, four, resume=True)
    assert saved == [2, 4] and [layer["layer"] for layer in report["layers"]] == [0, 1, 2, 3]
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "resumed")


def test_deterministic(tmp_path, mixtral, blocks):
    settings = Settings(method="gptq", scheme=Scheme(4, 128, sym=True), fmt="gptq")
    quantize_model(mixtral, tmp_path / "a", settings, blocks)
    quantize_model(mixtral, tmp_path / "b", settings, blocks)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


# ---- bad input ---------------------------------------------------------------------------------------------

def _fails(cli, tmp_path, *args, match):
    out = tmp_path / "out"
    result = cli("quantize", *args[:1], *args[1:2], out, *args[2:])
    assert result.exit_code == 1, result.output
    assert match in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


CALIB_ARGS = ("--calib", "kjv", "--samples", "2", "--seqlen", "16")


@pytest.mark.parametrize("method,args,match", [
    ("gptq", ["--asym"], "gptq --asym: vLLM will not load it, TGI serves it on a slow path (vLLM: Unsupported "
                         "quantization config: bits=4, sym=False; TGI runs every expert on every token)"),
    ("gptq", ["--desc-act", "--no-static-groups"], "gptq --desc-act --no-static-groups: vLLM will not load it"),
    ("awq", ["--no-zero-point"], "awq --no-zero-point: vLLM serves it on a slow path"),
    ("awq", ["--expert-naming", "transformers"],
     "--expert-naming transformers: vLLM, TGI and AutoAWQ will not load it"),
])
def test_settings_a_runtime_refuses_are_refused_before_any_work(cli, tmp_path, mixtral, method, args, match):
    _fails(cli, tmp_path, method, mixtral, *args, *CALIB_ARGS, match=match)


def test_a_moe_hidden_size_marlin_cannot_tile_is_refused(cli, tmp_path):
    model = tiny_hf(tmp_path / "m", dim=64, hidden_dim=128)
    _fails(cli, tmp_path, "awq", model, "--group-size", "32", *CALIB_ARGS,
           match="hidden size 64: vLLM serves it on a slow path (its Marlin MoE kernel needs a multiple of 128); "
                 "pass --allow-unloadable")


def test_allow_unloadable_writes_it_and_the_card_names_the_runtimes(cli, tmp_path, mixtral):
    from mixq.quantize.release.card import quantized_card
    for name, extra in (("default", []), ("asym", ["--asym", "--allow-unloadable"])):
        result = cli("quantize", "gptq", mixtral, tmp_path / name, *extra, *CALIB_ARGS)
        assert result.exit_code == 0, result.output
    asym = json.loads((tmp_path / "asym/report.json").read_text())["runtimes"]
    assert [(v["setting"], v["refused_by"]) for v in asym] == [("gptq --asym", ["vLLM"])]
    assert json.loads((tmp_path / "default/report.json").read_text())["runtimes"] == []
    card = quantized_card(tmp_path / "asym")
    assert "Not every runtime loads this repository" in card and "- gptq --asym: vLLM will not load it" in card
    default = quantized_card(tmp_path / "default")
    assert "Not every runtime" not in default
    # vLLM left to pick Marlin (a forced --quantization takes the slow kernel); TGI's whole docker line
    assert "vllm serve REPO --dtype half\n" in default and "--quantization gptq" not in default
    assert "docker run --gpus all --shm-size 1g -p 8080:80 " in default and "archived upstream" in default
    assert "AutoAWQ" not in default.split("## How to use")[1]
    # each runtime only for the expert naming it loads: transformers 5 reads the classic names into random experts
    assert "### transformers" not in default and "### vLLM" in default
    result = cli("quantize", "gptq", mixtral, tmp_path / "named", "--expert-naming", "transformers",
                 "--allow-unloadable", *CALIB_ARGS)
    assert result.exit_code == 0, result.output
    named = quantized_card(tmp_path / "named")
    assert "### transformers" in named and "defuser" in named
    assert "### vLLM" not in named and "### Text Generation Inference" not in named
    assert "- --expert-naming transformers: vLLM and TGI will not load it" in named


def test_non_hf_source(cli, tmp_path, mixtral):
    _fails(cli, tmp_path, "gptq", mixtral.parent / "src", match="quantization reads Hugging Face checkpoints")


def test_bits_the_format_cannot_hold(cli, tmp_path, mixtral):
    """A usage error on the command line (exit 2, before any work); a MixqError from the Python API."""
    for args, match in ((["gptq", mixtral, tmp_path / "out", "--bits", "3"], "3: the GPTQ format holds 2 or 4 or 8"),
                        (["rtn", mixtral, tmp_path / "out", "--format", "awq", "--bits", "8"], "AWQ format holds 4")):
        result = cli("quantize", *args)
        assert result.exit_code == 2 and match in result.stderr, result.stderr
    with pytest.raises(MixqError, match="--bits 3: the GPTQ format holds"):
        quantize_model(mixtral, tmp_path / "out", Settings(method="rtn", scheme=Scheme(3, 128), fmt="gptq"))
    assert not list(tmp_path.glob("*out*"))


def test_group_size_that_does_not_divide(cli, tmp_path):
    hf = tiny_hf(tmp_path, dim=96, hidden_dim=192, heads=4, kv_heads=2)
    _fails(cli, tmp_path, "rtn", hf, "--group-size", "64",
           match="model.layers.0.self_attn.q_proj: in_features 96 is not a multiple of --group-size 64")


def test_calibration_shorter_than_requested(cli, tmp_path, mixtral):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text.")
    _fails(cli, tmp_path, "gptq", mixtral, "--calib", text, "--samples", "8", "--seqlen", "64",
           match="fewer than the 8 requested")

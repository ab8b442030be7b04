"""torrent <-> Hugging Face: bit-exact round trips, logits against an independent native forward, bad input."""

import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from mixq.convert import convert_checkpoint, open_checkpoint
from tests.models import native_state, tiny_params, tiny_torrent, write_torrent
from tests.oracle import native_logits

PROMPT = [1, 733, 16289, 28793, 1824, 349, 574, 16020, 2076, 2487, 28804, 733, 28748, 16289, 28793]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double()


@pytest.mark.parametrize("arch", ["mixtral", "mistral"])
@pytest.mark.parametrize("weights", ["pth", "safetensors"])
def test_torrent_hf_torrent_is_bit_exact(tmp_path, arch, weights):
    params = tiny_params(arch)
    state = native_state(params, torch.bfloat16)
    write_torrent(tmp_path / "src", params, state, weights)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back", "torrent", weights_format=weights)
    back = (torch.load(tmp_path / "back/consolidated.00.pth", weights_only=True) if weights == "pth"
            else load_file(tmp_path / "back/consolidated.safetensors"))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert (tmp_path / "back/tokenizer.model").read_bytes() == (tmp_path / "src/tokenizer.model").read_bytes()


def test_hf_torrent_hf_is_byte_identical(tmp_path):
    tiny_torrent(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf", shard_size="3MB")
    convert_checkpoint(tmp_path / "hf", tmp_path / "t", "torrent")
    convert_checkpoint(tmp_path / "t", tmp_path / "hf2", "hf", shard_size="3MB")
    first = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "hf2").iterdir())
    assert "model.safetensors.index.json" in first and "model-00002-of-00003.safetensors" in first
    for name in first:
        if name.endswith(".safetensors"):
            assert _sha(tmp_path / "hf" / name) == _sha(tmp_path / "hf2" / name), name


@pytest.mark.parametrize("arch", ["mixtral", "mistral"])
def test_hf_logits_equal_native_forward(tmp_path, arch):
    params = tiny_params(arch)
    state = native_state(params, torch.float32, seed=1)
    write_torrent(tmp_path / "src", params, state)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["rope_theta"] == 1e6 and config["max_position_embeddings"] == 32768
    assert config["architectures"] == [{"mixtral": "MixtralForCausalLM", "mistral": "MistralForCausalLM"}[arch]]
    logits = _hf_logits(tmp_path / "hf", PROMPT)
    reference = native_logits(state, params, PROMPT, rope_theta=1e6)
    assert (logits - reference).abs().max() < 1e-4 * reference.abs().max()


def test_wrong_rotary_permutation_is_caught(tmp_path, monkeypatch):
    params = tiny_params("mixtral")
    state = native_state(params, torch.float32, seed=1)
    write_torrent(tmp_path / "src", params, state)
    monkeypatch.setattr("mixq.convert.torrent.interleaved_to_half", lambda weight, heads: weight)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    logits = _hf_logits(tmp_path / "hf", PROMPT)
    reference = native_logits(state, params, PROMPT, rope_theta=1e6)
    assert (logits - reference).abs().max() > 1e-2 * reference.abs().max()


def test_rope_theta_defaults(tmp_path):
    moe = open_checkpoint(tiny_torrent(tmp_path / "moe"))
    assert moe.spec.rope_theta == 1e6 and moe.spec.max_position_embeddings == 32768
    params = tiny_params("mistral") | {"sliding_window": 4096}
    write_torrent(tmp_path / "sw", params, native_state(params))
    assert open_checkpoint(tmp_path / "sw").spec.rope_theta == 1e4  # Mistral-7B-v0.1
    params = tiny_params("mistral") | {"rope_theta": 5e5}
    write_torrent(tmp_path / "explicit", params, native_state(params))
    assert open_checkpoint(tmp_path / "explicit").spec.rope_theta == 5e5


def test_torrent_output_params_are_explicit(tmp_path):
    tiny_torrent(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "t", "torrent")
    params = json.loads((tmp_path / "t/params.json").read_text())
    assert params == tiny_params("mixtral") | {"rope_theta": 1e6, "max_seq_len": 32768, "sliding_window": None,
                                               "moe": {"num_experts": 4, "num_experts_per_tok": 2}}


def test_reads_transformers5_fused_experts(tmp_path):
    """A checkpoint saved with transformers 5's in-memory names (mlp.experts.gate_up_proj, mlp.gate)."""
    tiny_torrent(tmp_path / "src", dtype=torch.float32)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    from safetensors import safe_open
    keys = set(safe_open(tmp_path / "fused/model.safetensors", "pt").keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.gate.weight" in keys
    convert_checkpoint(tmp_path / "fused", tmp_path / "t", "torrent")
    back, original = load_file(tmp_path / "t/consolidated.safetensors"), torch.load(
        tmp_path / "src/consolidated.00.pth", weights_only=True)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_dtype_conversion(tmp_path):
    tiny_torrent(tmp_path / "src", dtype=torch.float32)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf", dtype="bf16")
    tensors = load_file(tmp_path / "hf/model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"


def test_streaming_reads_through_mmap(tmp_path, monkeypatch):
    """Each tensor is loaded once, just before it is written, and its pages are released after."""
    tiny_torrent(tmp_path / "src", weights="safetensors")
    ckpt = open_checkpoint(tmp_path / "src")
    events = []
    for name, ref in ckpt.tensors.items():
        load, release = ref.load, ref.release
        ref.load = lambda n=name, f=load: (events.append(("load", n)), f())[1]
        ref.release = lambda n=name, f=release: (events.append(("release", n)), f())[1]
    from mixq.convert.hf import write_hf
    (tmp_path / "out").mkdir()
    write_hf(ckpt, tmp_path / "out", None, 10**9)
    assert events == [(kind, n) for n in ckpt.tensors for kind in ("load", "release")]


# ---- bad input: one line naming what and where, non-zero exit, nothing at OUT ----------------------------------

def _fails(cli, tmp_path, src, *args, match):
    out = tmp_path / "out"
    result = cli("convert", src, out, "--to", "hf", *args)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and match in result.stderr, result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_tensor(cli, tmp_path):
    params = tiny_params()
    state = native_state(params)
    del state["layers.1.feed_forward.experts.2.w3.weight"]
    write_torrent(tmp_path / "src", params, state)
    _fails(cli, tmp_path, tmp_path / "src", match="missing tensor model.layers.1.block_sparse_moe.experts.2.w3.weight")


def test_extra_tensor(cli, tmp_path):
    params = tiny_params()
    state = native_state(params) | {"layers.7.attention.wq.weight": torch.zeros(64, 64)}
    write_torrent(tmp_path / "src", params, state)
    _fails(cli, tmp_path, tmp_path / "src", match="layers.7.attention.wq.weight: unexpected tensor")


def test_shape_contradicting_params(cli, tmp_path):
    params = tiny_params()
    state = native_state(params)
    state["layers.0.feed_forward.experts.1.w2.weight"] = torch.zeros(64, 80, dtype=torch.bfloat16)
    write_torrent(tmp_path / "src", params, state, weights="safetensors")
    _fails(cli, tmp_path, tmp_path / "src",
           match="consolidated.safetensors: layers.0.feed_forward.experts.1.w2.weight: shape [64, 80] contradicts")


@pytest.mark.parametrize("weights", ["pth", "safetensors"])
def test_truncated_file(cli, tmp_path, weights):
    src = tiny_torrent(tmp_path / "src", weights=weights)
    file = next(src.glob("consolidated.*"))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _fails(cli, tmp_path, src, match="truncated")


def test_unknown_architecture(cli, tmp_path):
    src = tiny_torrent(tmp_path / "src")
    convert_checkpoint(src, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps(config | {"model_type": "qwen2"}))
    _fails(cli, tmp_path, tmp_path / "hf", match="unsupported architecture model_type='qwen2'")


def test_not_a_checkpoint(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(cli, tmp_path, tmp_path / "empty", match="not a checkpoint")


class Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickle_with_code_is_refused_not_run(cli, tmp_path, capfd):
    params = tiny_params()
    src = write_torrent(tmp_path / "src", params, native_state(params))
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    state["evil"] = Payload()
    torch.save(state, src / "consolidated.00.pth", pickle_module=pickle)
    _fails(cli, tmp_path, src, match="refused to load")
    assert "executed" not in capfd.readouterr().out


def test_existing_output_needs_force(cli, tmp_path):
    src = tiny_torrent(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = cli("convert", src, out, "--to", "hf")
    assert result.exit_code == 1 and "already exists (use --force" in result.stderr
    assert (out / "keep").exists()
    result = cli("convert", src, out, "--to", "hf", "--force", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tensors"] == 41 and not (out / "keep").exists()


def test_inspect_json(cli, tmp_path):
    src = tiny_torrent(tmp_path / "src")
    info = json.loads(cli("inspect", src, "--json").stdout)
    assert info["layout"] == "torrent" and info["architecture"] == "mixtral"
    assert info["hyperparameters"]["num_experts"] == 4 and info["tensors"] == 41
    assert info["dtypes"] == {"BF16": 41} and info["chat_template"] is True
    assert info["tokenizer"]["vocab_size"] == 32000 and info["tokenizer"]["bos"] == "<s>"

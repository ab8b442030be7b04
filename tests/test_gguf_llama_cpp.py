"""llama.cpp itself (llama-cpp-python, the llama-cpp extra) as the consumer of mixq's GGUF files."""

import numpy as np
import pytest
import torch

from mixq.convert import convert_checkpoint, inspect_checkpoint, open_checkpoint
from tests.models import native_state, tiny_params, tiny_torrent, write_torrent

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the llama-cpp extra (llama-cpp-python)")
pytestmark = pytest.mark.llamacpp


def test_the_file_types_are_llama_cpps():
    """gguf's LlamaFileType, by which the converter names its file types, against llama.cpp's own ids."""
    import gguf

    from mixq.convert.ggufio import GGUF_PY_TYPES, LLAMA_CPP_TYPES
    for name in [name for _, name in GGUF_PY_TYPES.values()] + list(LLAMA_CPP_TYPES.values()):
        assert gguf.LlamaFileType[name] == getattr(llama_cpp, f"LLAMA_FTYPE_{name}"), name


@pytest.fixture
def llama():
    models = []

    def load(path, **kwargs):
        models.append(llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                                      **kwargs))
        return models[-1]
    yield load
    for model in models:
        model.close()


def test_llama_cpp_runs_the_mixtral_gguf(tmp_path, llama):
    params = tiny_params("mixtral")
    write_torrent(tmp_path / "src", params, native_state(params, torch.float32, seed=3))
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "m.gguf", "gguf", outtype="f32")
    model = llama(tmp_path / "m.gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["[INST] What is your favourite condiment? [/INST]", "Hello world", "  two  spaces, über 123"]:
        assert model.tokenize(text.encode(), add_bos=True) == tokenizer(text).input_ids
    tokens = model.tokenize(b"[INST] What is your favourite condiment? [/INST]", add_bos=True)
    model.eval(tokens)
    logits = torch.tensor(np.array(model.scores[:len(tokens)])).double()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0].double()
    assert (logits - expected).abs().max() < 2e-3 * expected.abs().max()
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_k_quants_through_llama_cpp(tmp_path, llama):
    tiny_torrent(tmp_path / "src", dim=256, hidden_dim=512)
    result = convert_checkpoint(tmp_path / "src", tmp_path / "k.gguf", "gguf", outtype="q4_k_m")
    assert result["outtype"] == "q4_k_m" and not list(tmp_path.glob(".k.gguf*"))
    info = inspect_checkpoint(tmp_path / "k.gguf")
    assert info["dtypes"]["Q4_K"] > 0 and info["metadata"]["general.file_type"] == 15
    model = llama(tmp_path / "k.gguf")
    model.eval(model.tokenize(b"Hello world", add_bos=True))
    assert np.isfinite(np.array(model.scores[:3])).all()
    back = open_checkpoint(tmp_path / "k.gguf")  # K-quants dequantize on the way back
    assert back.get("model.layers.0.block_sparse_moe.experts.0.w1.weight").isfinite().all()


def test_several_outtypes_in_one_run_write_one_intermediate(tmp_path, monkeypatch, cli):
    """Two K-quants and the float type they are made from: one float GGUF written, the f16 output itself, and
    each K-quant equal to the one a run of its own makes."""
    from mixq.convert import ggufio
    tiny_torrent(tmp_path / "src", dim=256, hidden_dim=512)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf", dtype="f16")
    writes = []
    write = ggufio.write_gguf
    monkeypatch.setattr(ggufio, "write_gguf", lambda ckpt, path, *a, **k: writes.append(path.name) or
                        write(ckpt, path, *a, **k))
    result = cli("convert", tmp_path / "hf", tmp_path / "m-{outtype}.gguf", "--to", "gguf", "--outtype", "q4_k_m",
                 "--outtype", "q3_k_m", "--outtype", "f16", "--json")
    assert result.exit_code == 0, result.output
    assert writes == ["m-f16.gguf"]     # the K-quants' intermediate is the f16 output
    writes.clear()
    assert convert_checkpoint(tmp_path / "hf", tmp_path / "k-{outtype}.gguf", "gguf",
                              outtype=["q4_k_m", "q3_k_m"])["outtype"] == ["q4_k_m", "q3_k_m"]
    assert writes == ["intermediate-f16.gguf"]
    convert_checkpoint(tmp_path / "hf", tmp_path / "alone.gguf", "gguf", outtype="q4_k_m")
    assert (tmp_path / "m-q4_k_m.gguf").read_bytes() == (tmp_path / "alone.gguf").read_bytes()
    assert (tmp_path / "k-q4_k_m.gguf").read_bytes() == (tmp_path / "alone.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["alone.gguf", "k-q3_k_m.gguf", "k-q4_k_m.gguf",
                                                             "m-f16.gguf", "m-q3_k_m.gguf", "m-q4_k_m.gguf"]
    refused = cli("convert", tmp_path / "hf", tmp_path / "x.gguf", "--to", "gguf", "--outtype", "q4_k_m",
                  "--outtype", "f16")
    assert refused.exit_code == 1 and "several --outtype need {outtype} in the output name" in refused.stderr

"""GGUF both ways: bit-exact round trips, gguf-py as an independent reader, llama.cpp as the consumer."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize
from safetensors.torch import load_file

from mixq.convert import convert_checkpoint, open_checkpoint
from mixq.convert.gguf_stream import PRIVATE, VERIFIED
from tests.models import native_state, tiny_params, tiny_torrent, write_torrent
from tests.oracle import native_logits

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [1, 733, 16289, 28793, 1824, 349, 574, 16020, 2076, 2487, 28804, 733, 28748, 16289, 28793]


def _tensors(path):
    return load_file(path / "model.safetensors") if (path / "model.safetensors").exists() else load_file(
        path / "consolidated.safetensors")


def _equal_dicts(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ["mixtral", "mistral"])
@pytest.mark.parametrize("dtype,outtype", [(torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")])
def test_hf_gguf_hf_bit_exact(tmp_path, arch, dtype, outtype):
    tiny_torrent(tmp_path / "src", arch, dtype=dtype)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "m.gguf", "gguf", outtype=outtype)
    convert_checkpoint(tmp_path / "m.gguf", tmp_path / "back", "hf")
    _equal_dicts(_tensors(tmp_path / "hf"), _tensors(tmp_path / "back"))
    assert (json.loads((tmp_path / "back/config.json").read_text())["architectures"]
            == json.loads((tmp_path / "hf/config.json").read_text())["architectures"]) or arch == "mistral"


@pytest.mark.parametrize("arch", ["mixtral", "mistral"])
def test_torrent_gguf_torrent_bit_exact(tmp_path, arch):
    params = tiny_params(arch)
    state = native_state(params, torch.bfloat16)
    write_torrent(tmp_path / "src", params, state)
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", "gguf")  # auto keeps bf16
    convert_checkpoint(tmp_path / "m.gguf", tmp_path / "back", "torrent")
    _equal_dicts(state, _tensors(tmp_path / "back"))
    assert json.loads((tmp_path / "back/params.json").read_text())["rope_theta"] == 1e6


def test_gguf_layout_as_llama_cpp_writes_it(tmp_path):
    tiny_torrent(tmp_path / "src", dtype=torch.bfloat16)
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", "gguf", outtype="q8_0")
    reader = GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    shapes = {t.name: tuple(t.shape.tolist()) for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.ffn_gate_exps.weight"] == types["token_embd.weight"] == "Q8_0"
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 96, 4)      # ggml order: {n_embd, n_ff, n_expert}
    assert shapes["blk.1.ffn_down_exps.weight"] == (96, 64, 4)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (64, 4)
    assert not any(".ffn_gate.0." in name for name in types)
    kv = {name: field.contents() for name, field in reader.fields.items()}
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == 7
    assert kv["general.quantization_version"] == 2
    assert kv["llama.expert_count"] == 4 and kv["llama.expert_used_count"] == 2
    assert kv["llama.rope.freq_base"] == 1e6 and kv["llama.context_length"] == 32768
    assert kv["llama.block_count"] == 2 and kv["llama.attention.head_count_kv"] == 2
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == 32000
    assert kv["tokenizer.ggml.tokens"][733] == "▁[" and kv["tokenizer.ggml.token_type"][3] == 6
    assert kv["tokenizer.ggml.bos_token_id"] == 1 and kv["tokenizer.ggml.add_bos_token"] is True
    assert "[INST]" in kv["tokenizer.chat_template"]


def _native_from_gguf(path):
    """Torrent-named tensors straight from gguf-py's reader: GGUF rows are in native (interleaved) order."""
    names = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "attn_norm": "attention_norm",
             "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
             "attn_output": "attention.wo",
             "ffn_norm": "ffn_norm", "ffn_gate_inp": "feed_forward.gate", "ffn_gate": "feed_forward.w1",
             "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}
    state = {}
    for t in GGUFReader(path).tensors:
        values = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(tuple(reversed(t.shape.tolist())))
        parts = t.name.split(".")
        if parts[0] == "blk":
            key = parts[2]
            if key.endswith("_exps"):
                w = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}[key]
                for e in range(values.shape[0]):
                    state[f"layers.{parts[1]}.feed_forward.experts.{e}.{w}.weight"] = values[e]
                continue
            state[f"layers.{parts[1]}.{names[key]}.weight"] = values
        else:
            state[f"{names[parts[0]]}.weight"] = values
    return state


def test_independent_reader_gives_transformers_logits(tmp_path):
    params = tiny_params("mixtral")
    write_torrent(tmp_path / "src", params, native_state(params, torch.float32, seed=2))
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "m.gguf", "gguf", outtype="f32")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].double()
    logits = native_logits(_native_from_gguf(tmp_path / "m.gguf"), params, PROMPT, rope_theta=1e6)
    assert (logits - expected).abs().max() < 1e-4 * expected.abs().max()


def test_legacy_per_expert_and_split_input(tmp_path):
    """A GGUF from before April 2024 (blk.N.ffn_gate.E.weight), written as llama.cpp split files."""
    tiny_torrent(tmp_path / "src", dtype=torch.float16)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "m.gguf", "gguf", outtype="f16")
    reader = GGUFReader(tmp_path / "m.gguf")
    writer = GGUFWriter(tmp_path / "legacy.gguf", "llama", split_max_size=2_000_000)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, vtype = field.contents(), field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith("_exps.weight"):
            base = t.name.replace("_exps.weight", "")
            for e in range(data.shape[0]):
                writer.add_tensor(f"{base}.{e}.weight", data[e])
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted(tmp_path.glob("legacy-*-of-*.gguf"))
    assert len(parts) > 1
    convert_checkpoint(parts[0], tmp_path / "back", "hf")
    _equal_dicts(_tensors(tmp_path / "hf"), _tensors(tmp_path / "back"))


def test_split_output_reads_back(tmp_path):
    tiny_torrent(tmp_path / "src")
    result = convert_checkpoint(tmp_path / "src", tmp_path / "s.gguf", "gguf", split_max_size="3MB")
    assert result["shards"] == 3 and not (tmp_path / "s.gguf").exists()
    first = tmp_path / "s-00001-of-00003.gguf"
    kv = {name: field.contents() for name, field in GGUFReader(first).fields.items()}
    assert kv["split.count"] == 3 and kv["split.no"] == 0
    convert_checkpoint(first, tmp_path / "back", "torrent")
    _equal_dicts(torch.load(tmp_path / "src/consolidated.00.pth", weights_only=True), _tensors(tmp_path / "back"))


def test_tied_embeddings(tmp_path):
    params = tiny_params("mistral", tied=True)
    state = native_state(params, torch.float32)
    write_torrent(tmp_path / "src", params, state)
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", "gguf", outtype="f32")
    assert "output.weight" not in {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    convert_checkpoint(tmp_path / "m.gguf", tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in _tensors(tmp_path / "hf")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].double()
    expected = native_logits(state, params, PROMPT, rope_theta=1e6)
    assert (logits - expected).abs().max() < 1e-4 * expected.abs().max()


def test_quantized_types_read_back(tmp_path):
    tiny_torrent(tmp_path / "src", dtype=torch.float32)
    for outtype in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
        convert_checkpoint(tmp_path / "src", tmp_path / f"{outtype}.gguf", "gguf", outtype=outtype)
        back = open_checkpoint(tmp_path / f"{outtype}.gguf")
        name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
        source = open_checkpoint(tmp_path / "src").get(name)
        error = (back.get(name).float() - source).abs().max() / source.abs().max()
        assert 0 < error < {"q8_0": 0.01}.get(outtype, 0.15), (outtype, error)
        assert back.tensors[name].stored == outtype.upper()


def test_sentencepiece_vocabulary_round_trip(tmp_path):
    import sentencepiece as spm
    tiny_torrent(tmp_path / "src", layers=1)
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", "gguf")
    convert_checkpoint(tmp_path / "m.gguf", tmp_path / "back", "torrent")
    original = spm.SentencePieceProcessor(model_file=str(tmp_path / "src/tokenizer.model"))
    rebuilt = spm.SentencePieceProcessor(model_file=str(tmp_path / "back/tokenizer.model"))
    for text in ["Hello world", "  two  spaces", "über 123456 🙂", "[INST] a [/INST]", "\n\tline"]:
        assert rebuilt.encode(text) == original.encode(text)


def test_a_byte_level_bpe_without_merges_is_refused(tmp_path):
    """gguf-py leaves an empty merges key out and llama.cpp refuses the file: refused before it is written."""
    from dataclasses import replace

    from mixq.convert import MixqError
    from mixq.convert.ggufio import write_gguf_file
    tiny_torrent(tmp_path / "src", layers=1)
    ckpt = open_checkpoint(tmp_path / "src")
    ckpt.vocab = replace(ckpt.vocab, model="gpt2", merges=[])
    with pytest.raises(MixqError, match="byte-level BPE \\(gpt2\\) without merges"):
        write_gguf_file(ckpt, tmp_path / "m.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_inspect_gguf(cli, tmp_path):
    tiny_torrent(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", "gguf", outtype="q8_0")
    info = json.loads(cli("inspect", tmp_path / "m.gguf", "--json").stdout)
    assert info["layout"] == "gguf" and info["architecture"] == "mixtral"
    assert info["dtypes"] == {"Q8_0": 34, "F32": 7}
    assert info["metadata"]["general.file_type"] == 7 and info["chat_template"] is True


def test_the_type_tables_name_gguf_enums_with_llama_h_ids():
    """The converter names gguf's enum members; gguf holds the numbers, which are llama.h's. The tokenizer's token
    types are numbers of its own (tokenizer.py does not import gguf), gguf's TokenType."""
    import gguf

    from mixq.convert import tokenizer
    from mixq.convert.ggufio import GGUF_PY_TYPES, LLAMA_CPP_TYPES
    assert all(gguf.GGMLQuantizationType[t] in gguf.GGML_QUANT_SIZES for t, _ in GGUF_PY_TYPES.values())
    names = {outtype: name for outtype, (_, name) in GGUF_PY_TYPES.items()} | LLAMA_CPP_TYPES
    assert {outtype: gguf.LlamaFileType[name] for outtype, name in names.items()} == {  # llama.h's llama_ftype
        "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10,
        "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
        "iq2_xxs": 19, "iq2_xs": 20, "q2_k_s": 21, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25,
        "iq3_s": 26, "iq3_m": 27, "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31}
    assert {t.name: t.value for t in gguf.TokenType} == {
        name: getattr(tokenizer, name) for name in ("NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE")}


def test_the_pinned_gguf_range_is_the_verified_one():
    assert f'"gguf{VERIFIED}"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", PRIVATE)
def test_a_gguf_without_the_writer_state_streamed_through_is_refused(cli, tmp_path, monkeypatch, name):
    """Experts are streamed through GGUFWriter's private state: a gguf-py without it gives one line, no output."""
    import gguf

    class Renamed(gguf.GGUFWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            setattr(self, "_" + name, self.__dict__.pop(name))

    monkeypatch.setattr(gguf, "GGUFWriter", Renamed)
    tiny_torrent(tmp_path / "src", layers=1)
    result = cli("convert", tmp_path / "src", tmp_path / "m.gguf", "--to", "gguf")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"lacks GGUFWriter.{name}," in result.stderr and f"install gguf{VERIFIED}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---- bad input ---------------------------------------------------------------------------------------------

def _fails(cli, tmp_path, src, match):
    out = tmp_path / "out"
    result = cli("convert", src, out, "--to", "hf")
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and match in result.stderr, result.stderr
    assert not out.exists()


@pytest.fixture
def gguf_file(tmp_path):
    tiny_torrent(tmp_path / "src", layers=1)
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", "gguf", outtype="f16")
    return tmp_path / "m.gguf"


def test_wrong_magic(cli, tmp_path, gguf_file):
    data = bytearray(gguf_file.read_bytes())
    data[:4] = b"GGML"
    gguf_file.write_bytes(bytes(data))
    _fails(cli, tmp_path, gguf_file, "not a GGUF file")


def test_truncated_tensor_data(cli, tmp_path, gguf_file):
    gguf_file.write_bytes(gguf_file.read_bytes()[:-5000])
    _fails(cli, tmp_path, gguf_file, "truncated")


def test_unknown_tensor_type(cli, tmp_path, gguf_file):
    reader = GGUFReader(gguf_file)
    field = reader.tensors[0].field
    type_offset = field.offset + sum(int(p.nbytes) for p in field.parts[:4])
    data = bytearray(gguf_file.read_bytes())
    data[type_offset:type_offset + 4] = struct.pack("<I", 99)
    gguf_file.write_bytes(bytes(data))
    _fails(cli, tmp_path, gguf_file, "unknown ggml type id 99")


def rewrite_gguf(src, dst, drop=(), replace=None) -> None:
    """`src` rewritten at `dst` by gguf-py's writer without the keys in `drop` and with `replace`'s values
    (key -> (value, GGUFValueType)): metadata crafted on a real file."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, "llama")
    replace = replace or {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        if name in replace:
            writer.add_key_value(name, *replace[name])
            continue
        vtype = field.types[0]
        writer.add_key_value(name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_missing_hyperparameter(cli, tmp_path, gguf_file):
    rewrite_gguf(gguf_file, tmp_path / "nokey.gguf", drop=("llama.block_count",))
    _fails(cli, tmp_path, tmp_path / "nokey.gguf", "missing metadata key llama.block_count")


def test_k_quant_without_llama_cpp_names_the_extra(cli, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "llama_cpp" else real_import(name, *a, **k))
    tiny_torrent(tmp_path / "src", layers=1)
    result = cli("convert", tmp_path / "src", tmp_path / "k.gguf", "--to", "gguf", "--outtype", "q4_k_m")
    assert result.exit_code == 1 and "mixq[llama-cpp]" in result.stderr
    assert not (tmp_path / "k.gguf").exists()


def test_the_source_cards_license_and_base_model_are_written(tmp_path):
    """As llama.cpp's converter writes them from the model card: general.license, general.languages and
    general.base_model.N.*; a source without a card gets none of them."""
    from tests.test_quantize_engine import tiny_hf
    hf = tiny_hf(tmp_path / "m")
    convert_checkpoint(hf, tmp_path / "bare.gguf", "gguf")
    assert not [k for k in GGUFReader(tmp_path / "bare.gguf").fields if "license" in k or "base_model" in k]
    (hf / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [fr, en]\nbase_model: mistralai/Mixtral-8x7B"
                                  "-v0.1\n---\n# a card\n")
    convert_checkpoint(hf, tmp_path / "m.gguf", "gguf")
    kv = {name: field.contents() for name, field in GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert kv["general.license"] == "apache-2.0" and kv["general.languages"] == ["fr", "en"]
    assert kv["general.base_model.count"] == 1 and kv["general.base_model.0.name"] == "Mixtral-8x7B-v0.1"
    assert kv["general.base_model.0.organization"] == "mistralai"
    assert kv["general.base_model.0.repo_url"] == "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1"

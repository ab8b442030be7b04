"""llama.cpp's importance matrix: computed from calibration blocks (judged by transformers' own layers), its two
file formats (written from llama.cpp's tools' layout), and K-quants and i-quants made with it by llama.cpp."""

import json
import struct

import numpy as np
import pytest
import torch

from mixq.calibration.blocks import Blocks
from mixq.convert import convert_checkpoint, inspect_checkpoint
from mixq.convert.errors import MixqError
from mixq.convert.imatrix import Entry, Imatrix, read_imatrix
from mixq.quantize.imatrix import compute_imatrix
from tests.models import tiny_torrent
from tests.test_faults import one_line_error, tree

# llama.cpp's tensor names of transformers' modules (llama.cpp's gguf-py tensor map), written out independently
GGUF_OF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}


def _hf(tmp_path, arch, **shape):
    tiny_torrent(tmp_path / "src", arch, dtype=torch.float32, **shape)
    convert_checkpoint(tmp_path / "src", tmp_path / "hf", "hf")
    return tmp_path / "hf"


def _blocks(samples=3, seqlen=24, seed=0):
    tokens = torch.randint(3, 32000, (samples, seqlen), generator=torch.Generator().manual_seed(seed))
    return Blocks(tokens, {"source": "random"})


def _transformers_imatrix(hf, tokens) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The oracle: each linear's inputs as transformers' own modules receive them (hooks), and for the fused
    Mixtral experts the tokens its router sends each expert and the SwiGLU of its own weights."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    sums, counts = {}, {}

    def add(name, row, x, matrices=1):
        x = x.reshape(-1, x.shape[-1]).double()
        s = sums.setdefault(name, np.zeros((matrices, x.shape[-1])))
        c = counts.setdefault(name, np.zeros(matrices))
        s[row] += x.pow(2).sum(0).numpy()
        c[row] += x.shape[0]

    hooks = []
    for name, module in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        if isinstance(module, torch.nn.Linear) or rest in GGUF_OF:
            gguf = f"blk.{layer}.{GGUF_OF[rest]}.weight"
            hooks.append(module.register_forward_pre_hook(lambda m, args, gguf=gguf: add(gguf, 0, args[0])))
        elif type(module).__name__ == "MixtralExperts":
            def experts(m, args, layer=layer):
                h, index = args[0], args[1]
                for e in range(m.num_experts):
                    rows = (index == e).any(-1)
                    gate, up = torch.nn.functional.linear(h[rows], m.gate_up_proj[e]).chunk(2, dim=-1)
                    for stacked in ("ffn_gate_exps", "ffn_up_exps"):
                        add(f"blk.{layer}.{stacked}.weight", e, h[rows], m.num_experts)
                    add(f"blk.{layer}.ffn_down_exps.weight", e, m.act_fn(gate) * up, m.num_experts)
            hooks.append(module.register_forward_pre_hook(experts))
    with torch.no_grad():
        model(tokens)
    return {name: (sums[name], counts[name]) for name in sums}


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_the_importance_matrix_is_what_transformers_layers_receive(tmp_path, arch):
    hf = _hf(tmp_path, arch)
    blocks = _blocks()
    ours = compute_imatrix(hf, blocks, batch=2)
    expected = _transformers_imatrix(hf, blocks.tokens)
    assert sorted(ours.entries) == sorted(expected)
    for name, (sums, counts) in expected.items():
        entry = ours.entries[name]
        np.testing.assert_allclose(entry.sums, sums, rtol=1e-4, err_msg=name)
        assert entry.counts.tolist() == counts.tolist(), name
    if arch == "mixtral":   # every token reaches two of the four experts
        assert ours.entries["blk.0.ffn_down_exps.weight"].counts.sum() == 2 * blocks.tokens.numel()
    assert (ours.datasets, ours.chunk_count, ours.chunk_size) == (["random"], 3, 24)


def test_the_file_is_llama_cpps_gguf_imatrix_and_reads_back(tmp_path):
    import gguf
    matrix = Imatrix({"blk.0.ffn_down_exps.weight": Entry(np.arange(6, dtype=np.float32).reshape(2, 3),
                                                           np.array([4, 0], dtype=np.float32)),
                      "blk.0.attn_q.weight": Entry(np.ones((1, 3), np.float32), np.array([2], np.float32))},
                     ["kjv"], chunk_count=7, chunk_size=512)
    matrix.write(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")   # the layout tools/imatrix/imatrix.cpp writes
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["kjv"]
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert (reader.fields["imatrix.chunk_count"].contents(), reader.fields["imatrix.chunk_size"].contents()) == (7, 512)
    shapes = {t.name: (t.tensor_type.name, t.shape.tolist()) for t in reader.tensors}
    assert shapes == {"blk.0.ffn_down_exps.weight.in_sum2": ("F32", [3, 2]),
                      "blk.0.ffn_down_exps.weight.counts": ("F32", [1, 2]),
                      "blk.0.attn_q.weight.in_sum2": ("F32", [3, 1]), "blk.0.attn_q.weight.counts": ("F32", [1, 1])}
    back = read_imatrix(tmp_path / "m.gguf")
    assert back.datasets == ["kjv"] and (back.chunk_count, back.chunk_size) == (7, 512)
    # what llama-quantize weighs with: sums over counts, a matrix no token reached all ones
    assert back.values()["blk.0.ffn_down_exps.weight"].tolist() == [0, 0.25, 0.5, 1, 1, 1]
    assert back.values()["blk.0.attn_q.weight"].tolist() == [0.5] * 3


def _legacy(entries, chunks=None, dataset=None) -> bytes:
    """llama.cpp's legacy .dat, from the layout its loader reads (common/imatrix-loader.cpp)."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += np.asarray(values, "<f4").tobytes()
    if chunks is not None:
        out += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    return out


def test_the_legacy_dat_is_read_and_bad_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "old.dat").write_bytes(_legacy([("blk.0.attn_k.weight", 4, [8, 4, 2])], chunks=4, dataset="wiki"))
    old = read_imatrix(tmp_path / "old.dat")
    assert list(old.values()) == ["blk.0.attn_k.weight"] and old.values()["blk.0.attn_k.weight"].tolist() == [2, 1, 0.5]
    assert (old.datasets, old.chunk_count) == (["wiki"], 4)
    (tmp_path / "cut.dat").write_bytes((tmp_path / "old.dat").read_bytes()[:30])
    for bad, message in ((tmp_path / "cut.dat", "runs past the end of the file"),
                         (tmp_path / "none.dat", "no such importance matrix file")):
        with pytest.raises(MixqError, match=message):
            read_imatrix(bad)
    convert_checkpoint(_hf(tmp_path, "mistral"), tmp_path / "model.gguf", "gguf", outtype="f32")
    with pytest.raises(MixqError, match="imatrix.datasets"):   # a GGUF, but no importance matrix
        read_imatrix(tmp_path / "model.gguf")


def _needs_llama_cpp():
    return pytest.importorskip("llama_cpp", reason="needs the llama-cpp extra (llama-cpp-python)")


def _llama_logits(path, tokens):
    model = _needs_llama_cpp().Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        model.eval(tokens)
        return np.array(model.scores[:len(tokens)])
    finally:
        model.close()


def test_i_quants_and_k_quants_with_imatrix_auto_load_in_llama_cpp(tmp_path, cli):
    _needs_llama_cpp()
    hf = _hf(tmp_path, "mixtral", dim=256, hidden_dim=512)   # rows of 256: the i-quants' super-block
    result = json.loads(cli("convert", hf, tmp_path / "m-{outtype}.gguf", "--to", "gguf", "--outtype", "iq2_xs",
                            "--outtype", "q4_k_m", "--imatrix", "auto", "--samples", "4", "--seqlen", "32",
                            "--json").stdout)
    assert result["imatrix"] == {"name": "auto (kjv, 4 x 32 tokens)", "entries": 2 * 8, "datasets": ["kjv"],
                                 "chunks": 4}
    for outtype, ggml in (("iq2_xs", "IQ2_XS"), ("q4_k_m", "Q4_K")):
        info = inspect_checkpoint(tmp_path / f"m-{outtype}.gguf")
        assert info["dtypes"][ggml] > 0, info["dtypes"]
        meta = info["metadata"]
        assert meta["quantize.imatrix.file"] == "auto (kjv, 4 x 32 tokens)"
        assert (meta["quantize.imatrix.dataset"], meta["quantize.imatrix.entries_count"],
                meta["quantize.imatrix.chunks_count"]) == ("kjv", 16, 4)
        assert np.isfinite(_llama_logits(tmp_path / f"m-{outtype}.gguf", [1, 415, 2936, 9060])).all()
    # the file `mixq imatrix` writes makes the same model as auto on the same blocks
    cli("imatrix", hf, tmp_path / "kjv.imatrix.gguf", "--samples", "4", "--seqlen", "32")
    convert_checkpoint(hf, tmp_path / "f.gguf", "gguf", outtype="q4_k_m",
                       imatrix=read_imatrix(tmp_path / "kjv.imatrix.gguf"), imatrix_name="auto (kjv, 4 x 32 tokens)")
    assert (tmp_path / "f.gguf").read_bytes() == (tmp_path / "m-q4_k_m.gguf").read_bytes()
    convert_checkpoint(hf, tmp_path / "plain.gguf", "gguf", outtype="q4_k_m")
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "f.gguf").read_bytes()  # the matrix is used


def test_what_needs_an_imatrix_or_cannot_use_it_is_refused_before_any_work(tmp_path, cli):
    _needs_llama_cpp()
    hf = _hf(tmp_path, "mixtral", dim=256, hidden_dim=512)
    other = _hf(tmp_path / "other", "mixtral", dim=512, hidden_dim=512)
    cli("imatrix", other, tmp_path / "other.imatrix.gguf", "--samples", "2", "--seqlen", "16")
    before = tree(tmp_path)
    one_line_error(cli("convert", hf, tmp_path / "a.gguf", "--to", "gguf", "--outtype", "iq2_xxs"), 1,
                   "iq2_xxs need an importance matrix: add --imatrix auto")
    one_line_error(cli("convert", hf, tmp_path / "a.gguf", "--to", "gguf", "--outtype", "q8_0", "--imatrix", "auto"),
                   1, "--imatrix is used only by llama.cpp's quantizer")
    one_line_error(cli("convert", hf, tmp_path / "a.gguf", "--to", "gguf", "--outtype", "q4_k_m", "--imatrix",
                       tmp_path / "other.imatrix.gguf"), 1, "blk.0.attn_q.weight has 512 values, the model's tensor")
    usage = cli("convert", hf, tmp_path / "a.gguf", "--to", "gguf", "--outtype", "q4_k_m", "--samples", "4")
    assert usage.exit_code == 2 and "Error: --samples calibrates --imatrix auto only" in usage.stderr
    one_line_error(cli("imatrix", hf, tmp_path / "x.dat"), 1, "the path must end in .gguf")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_an_importance_matrix_lowers_q2_k_perplexity_on_the_real_smollm2(tmp_path):
    """Calibrated on the King James Bible, judged by llama.cpp's own logits on Shakespeare: Q2_K with the matrix
    is closer to f16 than Q2_K without it."""
    from transformers import AutoTokenizer

    from mixq import api
    from mixq.calibration.fixtures import smollm2_hf
    from tests.test_real_smollm2_gguf import _windows, llama_ppl
    _needs_llama_cpp()
    hf = smollm2_hf("f32")
    api.convert(hf, tmp_path / "plain-{outtype}.gguf", to="gguf", outtype=["f16", "q2_k"])
    api.convert(hf, tmp_path / "imatrix-q2_k.gguf", to="gguf", outtype="q2_k", imatrix="auto", calib="kjv",
                samples=16, seqlen=512)
    windows = _windows(AutoTokenizer.from_pretrained(hf))
    ppl = {name: llama_ppl(tmp_path / f"{name}.gguf", windows) for name in ("plain-f16", "plain-q2_k", "imatrix-q2_k")}
    print(ppl)
    assert ppl["plain-f16"] < ppl["imatrix-q2_k"] < ppl["plain-q2_k"]
    # the matrix removes a real share of the damage, not a rounding's worth (measured: 47% of it is left)
    assert ppl["imatrix-q2_k"] - ppl["plain-f16"] < 0.7 * (ppl["plain-q2_k"] - ppl["plain-f16"])

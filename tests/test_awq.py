"""AWQ: the GEMM format against an unpacker written from its specification, the clip search against AutoAWQ's
token-by-token form, scale invariance (router included), a real consumer, bad input."""

import json

import numpy as np
import pytest
import torch

from mixq.calibration import prepare
from mixq.convert import open_checkpoint
from mixq.quantize import Settings, quantize_model
from mixq.quantize.awq_search import (
    CLIP_SHRINK,
    apply_scales,
    clip,
    group_gram,
    output_loss,
    own_output_loss,
    search_scale,
)
from mixq.quantize.check.repository import read_quantized
from mixq.quantize.formats import FORMATS
from mixq.quantize.forward import Rotary, decoder_layer, rms_norm, route
from mixq.quantize.quantizer import Scheme, fake_quantize, rtn
from tests.test_quantize_engine import TOKENS, assert_consumer_agrees, forward_logits, run_consumer, tiny_hf

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]   # where output column 8c + j sits among a word's nibbles


def unpack_awq_from_spec(qweight, qzeros, scales, group):
    """AutoAWQ GEMM, element by element: q[k, 8c+j] = nibble AWQ_REVERSE_ORDER[j] of qweight[k, c]; zeros the
    same way, unshifted; W[o, k] = (q[k, o] - z[k // group, o]) * scales[k // group, o]."""
    qweight, qzeros = qweight.numpy().view(np.uint32), qzeros.numpy().view(np.uint32)
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    w = np.zeros((out_features, in_features), dtype=np.float64)
    for k in range(in_features):
        g = k // group
        for o in range(out_features):
            shift = 4 * AWQ_REVERSE_ORDER[o % 8]
            q = (int(qweight[k, o // 8]) >> shift) & 0xF
            z = (int(qzeros[g, o // 8]) >> shift) & 0xF
            w[o, k] = (q - z) * float(scales[g, o])
    return torch.from_numpy(w)


@pytest.mark.parametrize("sym", [False, True])
def test_gemm_format_against_spec_unpacker(sym):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.linspace(0.2, 2, 64)
    scheme = FORMATS["awq"].scheme(4, 32, sym)
    qw = rtn(w, scheme)
    packed = FORMATS["awq"].pack(qw, scheme)
    assert packed["qweight"].shape == (64, 3) and packed["qzeros"].shape == (2, 3)
    assert packed["scales"].shape == (2, 24) and packed["scales"].dtype == torch.float16
    assert torch.equal(unpack_awq_from_spec(packed["qweight"], packed["qzeros"], packed["scales"], 32).float(),
                       qw.dequantize())
    if sym:  # no zero point: symmetric codes stored around 8
        assert (qw.zeros == 8).all()


def autoawq_clip(w: torch.Tensor, x: torch.Tensor, scheme: Scheme, grid: int = 20) -> torch.Tensor:
    """AutoAWQ 0.2.9's _search_best_clip as it is written: every group's output on every token, quantized and not,
    subtracted, squared and averaged (the outputs in float64 here), the threshold with the least error kept."""
    out, cols = w.shape
    g = scheme.group_size
    xg = x.double().reshape(-1, cols // g, g)                                   # [tokens, groups, g]
    wg = w.reshape(out, cols // g, g)                                           # [out, groups, g]
    original = torch.einsum("tgk,ogk->otg", xg, wg.double())
    top = wg.abs().amax(-1, keepdim=True)
    best, least = top.clone(), torch.full(top.shape, float("inf"), dtype=torch.float64)
    for step in range(int(CLIP_SHRINK * grid)):
        limit = top * (1 - step / grid)
        q = fake_quantize(torch.maximum(torch.minimum(wg, limit), -limit).reshape(out, cols), scheme)
        err = (torch.einsum("tgk,ogk->otg", xg, q.double().reshape(wg.shape)) - original).pow(2).mean(1)[..., None]
        better = err < least
        least[better], best[better] = err[better], limit[better]
    return torch.maximum(torch.minimum(wg, best), -best).reshape(out, cols)


def test_clip_search_picks_autoawq_thresholds():
    """The Gram-matrix form of the clip error picks the thresholds of the token-by-token form for every group."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 1024, generator=g) / 32
    x = torch.randn(512, 1024, generator=g) * torch.rand(1024, generator=g) * 3   # uneven channels, as activations
    scheme = FORMATS["awq"].scheme(4, 128, False)
    assert torch.equal(clip(w, group_gram(x, 128), scheme), autoawq_clip(w, x, scheme))



def test_own_output_scale_search_picks_the_output_forms_scale():
    """A linear judged by its own output (o after v, each expert's w2): the Gram form of the grid's loss picks the
    scale that the loss over the outputs, as AutoAWQ computes it (both outputs, subtracted, squared), picks."""
    g = torch.Generator().manual_seed(5)
    w = {"lin.weight": torch.randn(256, 384, generator=g) / 16}
    channels = torch.rand(384, generator=g) * 4 + 0.1
    chunks = [torch.randn(2, 256, 384, generator=g) * channels for _ in range(3)]   # 1536 tokens: the Gram is cheaper
    settings = Settings(method="awq", scheme=FORMATS["awq"].scheme(4, 128), fmt="awq")
    by_output = search_scale(chunks, w, ("lin",), lambda ws, c: c @ ws["lin.weight"].T, settings, "cpu")
    by_gram = search_scale(chunks, w, ("lin",), None, settings, "cpu")
    assert torch.equal(by_gram, by_output)
    trial = {"lin.weight": fake_quantize(w["lin.weight"] * by_gram, settings.scheme) / by_gram}
    direct = output_loss(chunks, w, lambda ws, c: c @ ws["lin.weight"].T, "cpu")(trial)
    assert direct > 0 and own_output_loss(chunks, w, "lin.weight", 20, "cpu")(trial) == pytest.approx(direct, rel=1e-5)

def test_awq_layer_files_unpack_to_what_the_engine_used(tmp_path):
    hf = tiny_hf(tmp_path)
    blocks = prepare(hf, "kjv", samples=4, seqlen=32)
    settings = Settings(method="awq", scheme=FORMATS["awq"].scheme(4, 128), fmt="awq")
    report = quantize_model(hf, tmp_path / "q", settings, blocks)
    from safetensors import safe_open
    with safe_open(tmp_path / "q/model.safetensors", "pt") as f:
        parts = {s: f.get_tensor(f"model.layers.1.self_attn.o_proj.{s}") for s in ("qweight", "qzeros", "scales")}
    unpacked = unpack_awq_from_spec(parts["qweight"], parts["qzeros"], parts["scales"], 128).float()
    assert torch.equal(unpacked, read_quantized(tmp_path / "q").get("model.layers.1.self_attn.o_proj.weight"))
    config = json.loads((tmp_path / "q/config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm",
                      "modules_to_not_convert": ["gate"]}
    from mixq.quantize.release.card import quantized_card
    card = quantized_card(tmp_path / "q")    # AutoAWQ's own loader, as text-generation-webui calls it
    assert 'AutoAWQForCausalLM.from_quantized("REPO", fuse_layers=False)' in card and "transformers 4.51.3" in card
    assert set(report["layers"][0]["awq_scale_ratio"]) == {"attn", "mlp", "down0", "down1", "down2", "down3"}


@pytest.mark.parametrize("arch", ["mixtral", "mistral"])
def test_scale_invariance(tmp_path, arch):
    """Before quantization, folding any scales in leaves the layer's output (and the router logits) unchanged."""
    hf = tiny_hf(tmp_path, arch, heads=4, kv_heads=4)  # MHA, so o is scaled after v too
    ckpt = open_checkpoint(hf)
    spec = ckpt.spec
    weights = ckpt.layer(0, "cpu", torch.float64)
    x = torch.randn(2, 16, spec.hidden_size, dtype=torch.float64)
    rope = Rotary.build(spec, 16, "cpu", torch.float64)
    expected = decoder_layer(x, weights, spec, rope)
    g = torch.Generator().manual_seed(0)
    scale = lambda n: torch.exp(torch.randn(n, generator=g, dtype=torch.float64))  # noqa: E731
    scales = {"attn": scale(spec.hidden_size), "o": scale(spec.hidden_size), "mlp": scale(spec.hidden_size)}
    if spec.is_moe:
        scales |= {f"down{e}": scale(spec.intermediate_size) for e in range(spec.num_experts)}
    else:
        scales["down"] = scale(spec.intermediate_size)
    scaled = dict(weights)
    apply_scales(scaled, spec, scales)
    assert torch.allclose(decoder_layer(x, scaled, spec, rope), expected, rtol=1e-10, atol=1e-10)
    if spec.is_moe:
        h = rms_norm(x, weights["post_attention_layernorm.weight"], spec.rms_norm_eps)
        h_scaled = rms_norm(x, scaled["post_attention_layernorm.weight"], spec.rms_norm_eps)
        logits = route(h, weights["block_sparse_moe.gate.weight"], 2)[0]
        assert torch.allclose(route(h_scaled, scaled["block_sparse_moe.gate.weight"], 2)[0], logits, rtol=1e-10)
        unscaled_router = dict(weights)
        apply_scales(unscaled_router, spec, scales, scale_router=False)  # AutoAWQ's Mixtral recipe
        moved = route(h_scaled, unscaled_router["block_sparse_moe.gate.weight"], 2)[0]
        assert (moved - logits).abs().max() > 0.1 * logits.abs().max()


def test_transformers_and_gptqmodel_load_the_awq_mixtral(tmp_path):
    hf = tiny_hf(tmp_path)
    blocks = prepare(hf, "kjv", samples=8, seqlen=64)
    settings = Settings(method="awq", scheme=FORMATS["awq"].scheme(4, 128), fmt="awq", expert_naming="transformers")
    quantize_model(hf, tmp_path / "q", settings, blocks)
    expected = forward_logits(read_quantized(tmp_path / "q"), TOKENS)
    assert_consumer_agrees(run_consumer(tmp_path / "q", TOKENS), expected)


def test_awq_bad_input(cli, tmp_path):
    hf = tiny_hf(tmp_path)
    for args, match in ((["--group-size", "96"], "in_features 128 is not a multiple of --group-size 96"),):
        result = cli("quantize", "awq", hf, tmp_path / "out", *args)
        assert result.exit_code == 1 and match in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()

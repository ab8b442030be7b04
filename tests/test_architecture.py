"""The architecture table and the format registry: the facts every reader of layer structure and of packed tensors
derives from, checked on Mixtral-8x7B's and Llama's real shapes (no weights needed)."""

import math
from types import SimpleNamespace

import pytest
import torch

from mixq.convert.architecture import canonical_module, expert_modules, naming_of, plan, spelled
from mixq.convert.names import expected_shapes
from mixq.convert.spec import ModelSpec
from mixq.quantize.formats import FORMATS, get_format
from mixq.quantize.quantizer import rtn

MIXTRAL = ModelSpec(arch="mixtral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                    intermediate_size=14336, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=1e6,
                    max_position_embeddings=32768, num_experts=8, experts_per_tok=2)
LLAMA_MHA = ModelSpec(arch="llama", hidden_size=2048, num_layers=2, num_heads=16, num_kv_heads=16, head_dim=128,
                      intermediate_size=5632, vocab_size=32000, rms_norm_eps=1e-6, rope_theta=1e4,
                      max_position_embeddings=4096)


def test_mixtral_layer_plan():
    p = plan(MIXTRAL)
    assert p.shape("self_attn.q_proj") == (4096, 4096) and p.shape("self_attn.k_proj") == (1024, 4096)
    assert p.shape("block_sparse_moe.experts.7.w2") == (4096, 14336)
    assert len(p.linears) == 4 + 8 * 3
    # the parameters Mixtral-8x7B is known to have: 46.7 B
    total = MIXTRAL.num_layers * sum(math.prod(s) for s in p.tensor_shapes.values()) + 2 * 32000 * 4096 + 4096
    assert round(total / 1e9, 1) == 46.7
    # linears that share an input, in the order they are computed (what shares a GPTQ Hessian)
    groups = p.groups
    assert list(groups)[:3] == ["attn_norm", "attn_context", "mlp_norm"]
    assert groups["attn_norm"] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert groups["mlp_norm"] == tuple(m for e in range(8) for m in expert_modules(e)[:2])
    assert groups["expert_act.3"] == ("block_sparse_moe.experts.3.w2",)
    assert p.gate_up("expert_act.3") == ("block_sparse_moe.experts.3.w1", "block_sparse_moe.experts.3.w3")
    # AWQ: grouped-query attention has no o smoothing; the router takes the experts' scale
    keys = [g.key for g in p.smoothings]
    assert keys == ["attn", "mlp"] + [f"down{e}" for e in range(8)]
    mlp = p.smoothings[1]
    assert (mlp.before, mlp.into, mlp.also) == ("post_attention_layernorm", "norm", ("block_sparse_moe.gate",))
    assert (p.smoothings[2].before, p.smoothings[2].into) == ("block_sparse_moe.experts.0.w3", "rows")
    assert p.unquantized == ("input_layernorm.weight", "post_attention_layernorm.weight",
                             "block_sparse_moe.gate.weight")
    with pytest.raises(KeyError):   # an unknown name is never given a guessed shape
        p.shape("mlp.down_proj")


def test_dense_plan_smooths_o_after_v():
    p = plan(LLAMA_MHA)
    assert [g.key for g in p.smoothings] == ["attn", "o", "mlp", "down"]
    o = p.smoothings[1]
    assert (o.before, o.into, o.linears) == ("self_attn.v_proj", "rows", ("self_attn.o_proj",))
    assert p.gate_up("mlp_act") == ("mlp.gate_proj", "mlp.up_proj")


def test_expected_shapes_follow_the_plan():
    shapes = expected_shapes(MIXTRAL)
    layer = plan(MIXTRAL).tensor_shapes
    assert {n.split(".", 3)[3]: s for n, s in shapes.items() if n.startswith("model.layers.0.")} == layer
    assert len(shapes) == 32 * len(layer) + 3


@pytest.mark.parametrize("classic,transformers", [
    ("block_sparse_moe.gate", "mlp.gate"),
    ("block_sparse_moe.experts.5.w1", "mlp.experts.5.gate_proj"),
    ("block_sparse_moe.experts.5.w3", "mlp.experts.5.up_proj"),
    ("block_sparse_moe.experts.12.w2", "mlp.experts.12.down_proj"),
])
def test_transformers_spelling_round_trips(classic, transformers):
    assert spelled(classic, "transformers") == transformers and spelled(classic, "classic") == classic
    assert canonical_module(transformers) == classic
    assert naming_of([f"{transformers}.qweight"]) == "transformers"
    assert naming_of([f"{classic}.weight", "mlp.gate_proj.weight", "self_attn.q_proj.weight"]) == "classic"
    assert spelled("self_attn.q_proj", "transformers") == "self_attn.q_proj"
    assert canonical_module("mlp.gate_proj") is None   # Llama's dense gate is not the router


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_registered_format_round_trips(name):
    """pack then unpack returns the dequantized weight, with the shapes the format states, for every bits it holds."""
    fmt = FORMATS[name]
    for bits in fmt.bits:
        scheme = fmt.scheme(bits, 64, sym=False)
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
        qw = rtn(w, scheme)
        packed = fmt.pack(qw, scheme)
        assert tuple(packed) == fmt.suffixes
        assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == fmt.shapes(64, 256, scheme)
        assert torch.equal(fmt.unpack(packed, bits), qw.dequantize())
        assert fmt.bits_problem(bits) is None and fmt.bits_problem(3) and fmt.bits_problem(True)
    assert "in_features 100" in fmt.layout_problem((64, 100), fmt.scheme(fmt.bits[0], 64))
    assert "out_features 4" in fmt.layout_problem((4, 128), fmt.scheme(fmt.bits[0], 64))
    settings = SimpleNamespace(scheme=fmt.scheme(4, 128), damp=0.01, act_order=True, static_groups=True,
                               true_sequential=True)
    qc = fmt.quantization_config(settings, moe=True)
    assert qc["quant_method"] == name and qc["modules_to_not_convert"] == ["gate"]
    assert fmt.read_config(qc, "config.json") == (4, 128)   # what the repository reader takes back


def test_unknown_format_is_one_line():
    with pytest.raises(Exception, match="unknown format 'exl2' \\(choose from gptq, awq\\)"):
        get_format("exl2")

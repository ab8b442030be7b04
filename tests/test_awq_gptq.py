"""--awq-gptq: AWQ's scales folded into the layer, then GPTQ's solve, written in either format."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mixq.calibration import prepare
from mixq.convert import open_checkpoint
from mixq.convert.errors import MixqError
from mixq.quantize import Settings, quantize_model
from mixq.quantize.check.repository import read_quantized
from mixq.quantize.formats import FORMATS
from tests.test_quantize_engine import TOKENS, assert_consumer_agrees, forward_logits, run_consumer, tiny_hf

SCHEMES = {"gptq": FORMATS["gptq"].scheme(4, 128, True), "awq": FORMATS["awq"].scheme(4, 128, False)}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return tiny_hf(tmp_path_factory.mktemp("awq-gptq"))


@pytest.fixture(scope="module")
def blocks(mixtral):
    return prepare(mixtral, "kjv", samples=4, seqlen=64)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_unit_scales_leave_gptq_itself(tmp_path, mixtral, blocks, fmt):
    """One grid point without duo scaling is the scale 1 and no clipping leaves the weights as they are: the
    combination must then write GPTQ's own bytes, so nothing but the scales stands between the two."""
    unit = Settings(method=fmt, scheme=SCHEMES[fmt], fmt=fmt, awq_gptq=True, grid=1, duo_scaling=False, clip=False)
    quantize_model(mixtral, tmp_path / "combined", unit, blocks)
    quantize_model(mixtral, tmp_path / "gptq", Settings(method="gptq", scheme=SCHEMES[fmt], fmt=fmt), blocks)
    combined, gptq = (load_file(tmp_path / name / "model.safetensors") for name in ("combined", "gptq"))
    assert combined.keys() == gptq.keys()
    assert all(torch.equal(combined[k], gptq[k]) for k in gptq)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_combination_scales_then_solves(tmp_path, mixtral, blocks, fmt):
    """Both halves ran (the report holds AWQ's scales and GPTQ's losses, the norms carry the scales), and the
    solve lowers every layer's output error on the calibration data below AWQ's round-to-nearest."""
    awq = quantize_model(mixtral, tmp_path / "awq", Settings(method="awq", scheme=SCHEMES[fmt], fmt="awq"), blocks)
    combined = quantize_model(mixtral, tmp_path / "q", Settings(method=fmt, scheme=SCHEMES[fmt], fmt=fmt,
                                                                awq_gptq=True), blocks)
    for layer, alone in zip(combined["layers"], awq["layers"]):
        assert layer["awq_scale_ratio"] and layer["gptq_loss"]
        assert layer["output_error"] < alone["output_error"], (layer["output_error"], alone["output_error"])
    source, written = open_checkpoint(mixtral), read_quantized(tmp_path / "q")
    norm = "model.layers.0.post_attention_layernorm.weight"
    assert not torch.equal(source.get(norm).float(), written.get(norm).float())
    assert combined["settings"]["awq_gptq"] is True and "GPTQ: every expert" in \
        combined["expert_coverage"]["expert_statistics"]


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_transformers_and_gptqmodel_load_the_combination(tmp_path, mixtral, blocks, fmt):
    settings = Settings(method=fmt, scheme=SCHEMES[fmt], fmt=fmt, awq_gptq=True, expert_naming="transformers")
    quantize_model(mixtral, tmp_path / "q", settings, blocks)
    assert_consumer_agrees(run_consumer(tmp_path / "q", TOKENS), forward_logits(read_quantized(tmp_path / "q"),
                                                                               TOKENS))


def test_awq_format_refuses_a_column_order_it_cannot_hold(tmp_path, mixtral, blocks):
    settings = Settings(method="awq", scheme=SCHEMES["awq"], fmt="awq", awq_gptq=True, act_order=True,
                        static_groups=False)
    with pytest.raises(MixqError, match="the AWQ format has no g_idx to hold its column order"):
        quantize_model(mixtral, tmp_path / "q", settings, blocks)
    assert not (tmp_path / "q").exists()


def test_cli_flags_on_both_commands(cli, tmp_path, mixtral):
    for method in ("gptq", "awq"):
        out = tmp_path / method
        result = cli("quantize", method, mixtral, out, "--awq-gptq", "--gptaq", "--refit", "--samples", 2,
                     "--seqlen", 32, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["settings"]["awq_gptq"] is report["settings"]["gptaq"] is report["settings"]["refit"] is True
        assert report["format"] == method
    assert cli("quantize", "rtn", mixtral, tmp_path / "rtn", "--awq-gptq").exit_code == 2
    for flag, what in (("--gptaq", "--gptaq calibrates GPTQ's solve"), ("--refit", "--refit refits GPTQ's scales")):
        result = cli("quantize", "awq", mixtral, tmp_path / "awq-alone", "--no-awq-gptq", flag, "--samples", 2,
                     "--seqlen", 32)
        assert result.exit_code == 1 and f"{what}: AWQ needs --awq-gptq with it" in result.stderr
        assert not (tmp_path / "awq-alone").exists()


# each command's defaults: what measured best on both SmolLM2 text pairs (tests/test_real_smollm2_quantize.py)
DEFAULTS = {"gptq": {"awq_gptq": False, "gptaq": True, "search": "mse"},
            "awq": {"awq_gptq": True, "gptaq": True, "search": "minmax"},
            "awq --no-awq-gptq": {"awq_gptq": False, "gptaq": False, "search": "minmax"},
            "gptq --no-gptaq --search minmax": {"awq_gptq": False, "gptaq": False, "search": "minmax"},
            "rtn": {"awq_gptq": False, "gptaq": False, "search": "minmax"}}


@pytest.mark.parametrize("command", list(DEFAULTS))
def test_defaults_of_each_command(cli, tmp_path, mixtral, command):
    method, *flags = command.split()
    calib = [] if method == "rtn" else ["--samples", 2, "--seqlen", 32]
    result = cli("quantize", method, mixtral, tmp_path / "q", *flags, *calib, "--json")
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    got = {"awq_gptq": settings["awq_gptq"], "gptaq": settings["gptaq"], "search": settings["scheme"]["search"]}
    assert got == DEFAULTS[command]

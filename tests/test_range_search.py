"""The MSE search of each group's range (--search mse): the least-error shrunk range, in both formats, packed and
decoded as the formats' own unpackers read them."""

import json

import pytest
import torch

from mixq.quantize.formats import FORMATS
from mixq.quantize.quantizer import Scheme, group_params, rtn
from tests.test_awq import unpack_awq_from_spec
from tests.test_quantize_engine import tiny_hf, unpack_gptq_from_spec


def _error(w, scale, zero, maxq):
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return ((q - zero) * scale - w).abs().pow(2.4).sum(1)


@pytest.mark.parametrize("fmt, sym", [("gptq", True), ("gptq", False), ("awq", False)])
def test_mse_keeps_each_groups_least_error_shrunk_range(fmt, sym):
    torch.manual_seed(0)
    w = torch.randn(256, 64)
    w[::7, 3] *= 8                              # outliers: the rows whose range is worth shrinking
    plain = FORMATS[fmt].scheme(4, 64, sym)
    searched = FORMATS[fmt].scheme(4, 64, sym, search="mse")
    scale, zero = group_params(w, searched)
    # the oracle: every shrunk range the rule gives, each row's least error taken one row at a time
    trials = [group_params(w * (1 - i / 100), plain) for i in range(80)]
    errors = torch.stack([_error(w, s, z, 15) for s, z in trials])          # [80, rows]
    least = errors.argmin(0)
    assert torch.equal(scale[:, 0], torch.stack([trials[i][0][r, 0] for r, i in enumerate(least.tolist())]))
    assert torch.equal(zero[:, 0], torch.stack([trials[i][1][r, 0] for r, i in enumerate(least.tolist())]))
    searched_error, minmax = _error(w, scale, zero, 15), _error(w, *group_params(w, plain), 15)
    shrunk = least > 0
    assert shrunk.sum() > 50 and (searched_error[shrunk] < minmax[shrunk]).all()
    assert torch.equal(searched_error[~shrunk], minmax[~shrunk])


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_searched_codes_decode_with_the_spec_unpackers(fmt):
    torch.manual_seed(1)
    w = torch.randn(32, 128) * torch.linspace(0.2, 2, 128)
    scheme = FORMATS[fmt].scheme(4, 64, fmt == "gptq", search="mse")
    qw = rtn(w, scheme)
    packed = FORMATS[fmt].pack(qw, scheme)
    if fmt == "awq":
        decoded = unpack_awq_from_spec(packed["qweight"], packed["qzeros"], packed["scales"], 64)
    else:
        decoded = unpack_gptq_from_spec(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    assert torch.equal(decoded.float(), qw.dequantize())
    assert not torch.equal(qw.dequantize(), rtn(w, FORMATS[fmt].scheme(4, 64, fmt == "gptq")).dequantize())


def test_the_search_is_an_option_of_every_method_and_stated(cli, tmp_path):
    model = tiny_hf(tmp_path / "m")
    result = cli("quantize", "rtn", model, tmp_path / "q", "--search", "mse", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["settings"]["scheme"]["search"] == "mse"
    bad = cli("quantize", "gptq", model, tmp_path / "r", "--search", "l1")
    assert bad.exit_code == 2 and "'l1' is not one of 'minmax', 'mse'" in bad.stderr
    assert Scheme().search == "minmax"

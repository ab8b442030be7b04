"""GPTAQ (asymmetric calibration): GPTQ against the unquantized model's inputs as well as the quantized ones."""

import pytest
import torch
from safetensors.torch import load_file

from mixq.calibration import prepare
from mixq.convert import open_checkpoint
from mixq.quantize import Scheme, Settings, quantize_model
from mixq.quantize.check.repository import read_quantized
from mixq.quantize.gptq_solver import GPTAQ_ALPHA, Hessian, Sweep
from tests.test_quantize_engine import forward_logits, tiny_hf


@pytest.mark.parametrize("act_order", [False, True])
def test_swept_weight_is_the_least_squares_fit(act_order):
    """The weight the sweep starts from is W + a W (C - H)^T (H + damp)^-1, written here in float64 from the
    inputs themselves: a = 1 is the fit of the unquantized outputs X W^T on the quantized inputs X~."""
    g = torch.Generator().manual_seed(0)
    rows, cols, n = 16, 64, 512
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(n, cols, generator=g) * torch.linspace(0.2, 2, cols)
    drifted = x + 0.1 * torch.randn(n, cols, generator=g)
    hess = Hessian(cols, "cpu", cross=True)
    hess.add(drifted, x)
    sweep = Sweep(1, (rows, cols), Scheme(4, 32, sym=True), "cpu", 0.01, act_order)
    sweep.add(w, hess.value(), cross=hess.cross())
    xd, rd, wd = drifted.double(), x.double(), w.double()
    h = 2 / n * xd.T @ xd
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    expected = wd + GPTAQ_ALPHA * wd @ (2 / n * xd.T @ rd - h).T @ torch.linalg.inv(damped)
    order = torch.argsort(torch.diag(h.float()), descending=True) if act_order else torch.arange(cols)
    assert torch.allclose(sweep.w[0].double(), expected[:, order], atol=1e-4), \
        float((sweep.w[0].double() - expected[:, order]).abs().max())
    assert not torch.allclose(expected, wd, atol=1e-2)   # the drift moved the weight: the check is not vacuous


def test_without_drift_it_is_gptq(tmp_path):
    """One layer without true-sequential: every stage's quantized inputs are the unquantized ones, the cross
    products equal the Hessians, and the bytes must be GPTQ's."""
    hf = tiny_hf(tmp_path / "m", layers=1)
    blocks = prepare(hf, "kjv", samples=4, seqlen=32)
    for name, gptaq in (("gptq", False), ("gptaq", True)):
        quantize_model(hf, tmp_path / name, Settings(method="gptq", scheme=Scheme(4, 128, sym=True), fmt="gptq",
                                                     true_sequential=False, gptaq=gptaq), blocks)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("gptq", "gptaq"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_it_lowers_the_models_error_on_its_calibration(tmp_path):
    """Four layers, drift accumulating: the logits on the calibration tokens end closer to the unquantized model's
    than GPTQ's do (what GPTAQ minimises, layer by layer)."""
    hf = tiny_hf(tmp_path / "m", layers=4)
    blocks = prepare(hf, "kjv", samples=8, seqlen=32)
    tokens = blocks.tokens[0].tolist()
    exact = forward_logits(open_checkpoint(hf), tokens)
    error = {}
    for name, gptaq in (("gptq", False), ("gptaq", True)):
        quantize_model(hf, tmp_path / name, Settings(method="gptq", scheme=Scheme(4, 128, sym=True), fmt="gptq",
                                                     gptaq=gptaq), blocks)
        error[name] = float((forward_logits(read_quantized(tmp_path / name), tokens) - exact).pow(2).mean())
    assert error["gptaq"] < error["gptq"], error

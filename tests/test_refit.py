"""--refit: GPTQ's group scales solved again for the codes it chose, by its own H-weighted loss."""

import pytest
import torch

from mixq.quantize import Scheme
from mixq.quantize.gptq_solver import Hessian, gptq_quantize, refit_scales


def problem(rows=24, cols=128, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    hess = Hessian(cols, "cpu")
    hess.add(x)
    return w, hess.value()


def row_losses(w, h, qw):
    d = (w.double() - qw.dequantize().double())
    return ((d @ h.double()) * d).sum(-1)


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, True), (True, False)])
def test_refit_keeps_the_codes_and_lowers_every_rows_loss(act_order, static_groups):
    w, h = problem()
    scheme = Scheme(4, 32, sym=True)
    plain = gptq_quantize(w, h, scheme, act_order=act_order, static_groups=static_groups).weight
    refit = refit_scales(plain, w, h, scheme)
    assert torch.equal(refit.q, plain.q) and torch.equal(refit.zeros, plain.zeros)
    assert torch.equal(refit.g_idx, plain.g_idx) and refit.scales.dtype == torch.float16
    before, after = row_losses(w, h, plain), row_losses(w, h, refit)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < 0.97 * before.sum(), (float(after.sum()), float(before.sum()))   # not vacuous


def test_refit_is_the_weighted_least_squares_scales():
    """The oracle: per row, the scales s minimising |H^1/2 (w - A s)| by float64 least squares, A [cols, groups]
    holding (q - z) in each column's group; the refit's are those rounded to fp16 (where they lower the loss)."""
    w, h = problem(rows=6, cols=96)
    scheme = Scheme(4, 32, sym=False)
    plain = gptq_quantize(w, h, scheme).weight
    refit = refit_scales(plain, w, h, scheme)
    root = torch.linalg.cholesky(h.double()).T     # H = R^T R
    groups = plain.scales.shape[1]
    for r in range(w.shape[0]):
        a = torch.zeros(w.shape[1], groups, dtype=torch.float64)
        g = plain.g_idx.long()
        a[torch.arange(w.shape[1]), g] = plain.q[r].double() - plain.zeros[r].double()[g]
        s = torch.linalg.lstsq(root @ a, root @ w[r].double()[:, None]).solution[:, 0]
        assert torch.allclose(refit.scales[r].double(), s.half().double(), rtol=2e-3), r


def test_refit_by_chunks_of_rows_is_the_same(monkeypatch):
    from mixq.quantize import gptq_solver
    w, h = problem()
    scheme = Scheme(4, 32, sym=True)
    plain = gptq_quantize(w, h, scheme).weight
    whole = refit_scales(plain, w, h, scheme)
    monkeypatch.setattr(gptq_solver, "REFIT_BYTES", 1)   # one row at a time
    assert torch.equal(refit_scales(plain, w, h, scheme).scales, whole.scales)


def test_the_sweep_refits_what_it_swept():
    """Sweep(refit=True): the codes of the plain sweep, the scales refit against the damped H it inverted."""
    from mixq.quantize.gptq_solver import Sweep
    w, h = problem()
    scheme = Scheme(4, 32, sym=True)
    results = {}
    for refit in (False, True):
        sweep = Sweep(1, tuple(w.shape), scheme, "cpu", 0.01, True, True, refit=refit)
        sweep.add(w, h.clone())
        results[refit] = sweep.solve()[0].weight
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0])
    expected = refit_scales(results[False], w, damped, scheme)
    assert torch.equal(results[True].q, results[False].q)
    assert torch.equal(results[True].scales, expected.scales)
    assert not torch.equal(results[True].scales, results[False].scales)


def test_a_refit_repository_keeps_the_first_stages_codes(tmp_path):
    """On a tiny Mixtral: q/k/v of layer 0 (the first solve, before any refit reaches a later stage's inputs)
    have the plain run's packed codes and other scales, and read back each group is the plain weight rescaled by
    the ratio of the two scales."""
    from safetensors.torch import load_file

    from mixq.calibration import prepare
    from mixq.quantize import Settings, quantize_model
    from mixq.quantize.check.repository import read_quantized
    from tests.test_quantize_engine import tiny_hf
    hf = tiny_hf(tmp_path / "m", layers=1)
    blocks = prepare(hf, "kjv", samples=4, seqlen=32)
    for name, refit in (("plain", False), ("refit", True)):
        quantize_model(hf, tmp_path / name, Settings(method="gptq", scheme=Scheme(4, 32, sym=True), fmt="gptq",
                                                     refit=refit), blocks)
    plain, refit = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "refit"))
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(plain[f"{q}.qweight"], refit[f"{q}.qweight"])
    assert not torch.equal(plain[f"{q}.scales"], refit[f"{q}.scales"])
    ratio = (refit[f"{q}.scales"].float() / plain[f"{q}.scales"].float()).T      # [out, groups]
    wp, wr = (read_quantized(tmp_path / name).get(f"{q}.weight") for name in ("plain", "refit"))
    assert torch.allclose(wr, wp * ratio.repeat_interleave(32, dim=1), rtol=1e-3, atol=1e-6)

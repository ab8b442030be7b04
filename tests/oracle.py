"""An independent forward of the original Mistral/Mixtral release, written from mistral-inference's semantics.

It reads the torrent tensor names and applies rotary embeddings to adjacent pairs (complex multiplication), so it
shares nothing with the Q/K permutation under test; float64 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def native_logits(state: dict, params: dict, tokens: list[int], rope_theta: float) -> torch.Tensor:
    s = {k: v.double() for k, v in state.items()}
    hd, nh, nkv = params["head_dim"], params["n_heads"], params["n_kv_heads"]
    eps = params["norm_eps"]
    T = len(tokens)
    x = s["tok_embeddings.weight"][torch.tensor(tokens)]
    freqs = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T).double(), freqs))

    def rope(t):  # t: (T, heads, hd)
        c = torch.view_as_complex(t.reshape(T, t.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(c * rot[:, None, :]).reshape(t.shape)

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        h = _rms(x, s[p + "attention_norm.weight"], eps)
        q = rope((h @ s[p + "attention.wq.weight"].T).reshape(T, nh, hd))
        k = rope((h @ s[p + "attention.wk.weight"].T).reshape(T, nkv, hd))
        v = (h @ s[p + "attention.wv.weight"].T).reshape(T, nkv, hd)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5 + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, nh * hd)
        x = x + attn @ s[p + "attention.wo.weight"].T
        h = _rms(x, s[p + "ffn_norm.weight"], eps)

        def mlp(prefix, inp):
            gate, up = F.silu(inp @ s[prefix + "w1.weight"].T), inp @ s[prefix + "w3.weight"].T
            return (gate * up) @ s[prefix + "w2.weight"].T

        if "moe" in params:
            logits = h @ s[p + "feed_forward.gate.weight"].T
            top, chosen = logits.topk(params["moe"]["num_experts_per_tok"], dim=-1)
            weights = top.softmax(-1)
            out = torch.zeros_like(h)
            for t in range(T):
                for j in range(chosen.shape[1]):
                    e = int(chosen[t, j])
                    out[t] += weights[t, j] * mlp(p + f"feed_forward.experts.{e}.", h[t:t + 1])[0]
            x = x + out
        else:
            x = x + mlp(p + "feed_forward.", h)
    x = _rms(x, s["norm.weight"], eps)
    out = s["output.weight"] if "output.weight" in s else s["tok_embeddings.weight"]
    return x @ out.T

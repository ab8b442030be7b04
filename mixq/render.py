"""What each command prints when it is not asked for --json: its report as a short table."""

from __future__ import annotations

from mixq.convert.progress import human_bytes


def table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def provenance_rows(p: dict) -> list[tuple[str, object]]:
    rows = [("source", p.get("source")), ("blocks", f"{p.get('samples')} x {p.get('seqlen')} tokens "
                                                    f"({p.get('mode')}, seed {p.get('seed')})")]
    if p.get("shortfall"):
        rows.append(("shortfall", f"{p['shortfall']} blocks fewer than the {p['requested_samples']} requested"))
    rows += [("documents", p.get("documents")), ("text sha256", p.get("text_sha256")),
             ("tokenizer", f"{p.get('tokenizer_name')} ({p.get('tokenizer')})")]
    return rows


def render_inspect(i):
    hp = i["hyperparameters"]
    rows = [("path", i["path"]), ("layout", i["layout"]), ("architecture", i["architecture"]),
            ("layers", hp["num_layers"]), ("hidden", hp["hidden_size"]),
            ("heads (kv)", f"{hp['num_heads']} ({hp['num_kv_heads']}), head_dim {hp['head_dim']}"),
            ("ffn", hp["intermediate_size"])]
    if hp["num_experts"]:
        rows.append(("experts", f"{hp['num_experts']} ({hp['experts_per_tok']} per token)"))
    rows += [("vocab", hp["vocab_size"]), ("rope_theta", hp["rope_theta"]),
             ("context", hp["max_position_embeddings"]), ("tied embeddings", hp["tie_word_embeddings"]),
             ("tensors", i["tensors"]), ("parameters", f"{i['parameters']:,}"),
             ("dtypes", ", ".join(f"{k} x{v}" for k, v in sorted(i["dtypes"].items()))),
             ("size", human_bytes(i["total_bytes"]))]
    tok = i["tokenizer"]
    rows.append(("tokenizer", "none" if tok is None else
                 f"{tok['kind']}, {tok['vocab_size']} tokens, bos {tok['bos']!r}, eos {tok['eos']!r}"))
    rows.append(("chat template", "yes" if i["chat_template"] else "no"))
    return table(rows)


def render_check(r: dict) -> str:
    rows = [("model", f"{r['model']} ({r['layout']})")]
    if r.get("reference"):
        rows.append(("reference", r["reference"]))
    rows += [("text", f"{r['eval'].get('source')} (sha256 {str(r['eval'].get('text_sha256'))[:12]})"),
             ("method", f"{r['method']}, {r['windows']} windows of {r['seqlen']}, {r['tokens']} tokens scored"),
             ("perplexity", f"{r['perplexity']:.4f}")]
    if r.get("reference_perplexity") is not None:
        rows += [("reference perplexity", f"{r['reference_perplexity']:.4f}"),
                 ("difference", f"{r['delta']:+.4f} ({r['delta_percent']:+.2f}%)"), ("KL", f"{r['kl']:.5f}")]
    rows += [("device", f"{r['device']} ({r['dtype']})"), ("time", f"{r['seconds']:.1f} s")]
    out = table(rows)
    for i, g in enumerate(r["generations"]):
        out += f"\n\n[{i + 1}] {g['prompt']}\n{g['text'].strip()}"
    return out


def render_quantize(r: dict) -> str:
    s = r["settings"]
    rows = [("output", r.get("output", "")), ("method", f"{r['method']} -> {r['format']} format"),
            ("scheme", f"{s['scheme']['bits']}-bit, group {s['scheme']['group_size']}, "
                       f"{'sym' if s['scheme']['sym'] else 'asym'}"),
            ("layers", len(r["layers"])), ("size", human_bytes(r["bytes"])), ("time", f"{r['seconds']:.1f} s")]
    errors = [layer["output_error"] for layer in r["layers"] if "output_error" in layer]
    if errors:
        rows.append(("layer output error", f"mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}"))
    if r.get("expert_coverage"):
        c = r["expert_coverage"]
        rows.append(("experts", f"fewest routed tokens {c['min_routed_tokens']}, "
                                f"{c['experts_without_routed_tokens']} expert-layers without any"))
    if r.get("check"):
        rows.append(("check", r["check"].get("summary", "")))
    return table(rows)


def render_report(rs):
    head = f"{'artifact':40} {'size':>10} {'perplexity':>11} {'reference':>10} {'delta':>9} {'KL':>9}"
    lines = [head, "-" * len(head)]
    for r in rs:
        ppl = lambda k, f: f.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"{r['artifact'][:40]:40} {human_bytes(r['bytes']):>10} {ppl('perplexity', '{:.4f}'):>11} "
                     f"{ppl('reference_perplexity', '{:.4f}'):>10} {ppl('delta_percent', '{:+.2f}%'):>9} "
                     f"{ppl('kl', '{:.5f}'):>9}")
    return "\n".join(lines)

"""Token blocks for calibration: tokenized with the model's own tokenizer and chat template, sampled
deterministically, saved with their provenance so a run can be repeated and reported."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mixq.convert.errors import MixqError
from mixq.convert.output import staged_file

from .sources import Document, Texts, load_texts

MODES = ("concat", "document")
FORMAT = "mixq-calibration-1"


def load_tokenizer(model: str | Path):
    """The tokenizer of a checkpoint in any layout, as transformers loads it (with its chat template)."""
    from transformers import AutoTokenizer

    from mixq.convert import open_checkpoint
    from mixq.convert.hf import is_hf_dir
    path = Path(model)
    if path.is_dir() and is_hf_dir(path) and (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        vocab = open_checkpoint(path).vocab
        if vocab is None:
            raise MixqError(f"{path}: no tokenizer (tokenizer.model, tokenizer.json or GGUF vocabulary)")
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in vocab.hf_files_out().items():
                (Path(tmp) / name).write_bytes(data)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.name_or_path = str(path)
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.chat_template], ensure_ascii=False).encode()).hexdigest()[:16]


def encode_document(tokenizer, document: Document) -> list[int]:
    """Plain text with the tokenizer's own special tokens (BOS where the model adds one); a conversation
    rendered by the chat template, which writes its own."""
    if isinstance(document, str):
        return tokenizer(document).input_ids
    if not tokenizer.chat_template:
        raise MixqError("conversations need a chat template, and this tokenizer has none")
    try:
        text = tokenizer.apply_chat_template(document, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError, or raise_exception() inside the template
        raise MixqError(f"the chat template of {tokenizer.name_or_path or 'the tokenizer'} rejects a "
                        f"conversation of the calibration text ({type(exc).__name__}: {exc}): "
                        f"{json.dumps(document)[:120]}") from None
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclass
class Blocks:
    tokens: torch.Tensor          # int64 [samples, seqlen]
    provenance: dict

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        with staged_file(path) as tmp:
            save_file({"tokens": self.tokens.to(torch.int32).contiguous()}, str(tmp),
                      metadata={"format": FORMAT, "provenance": json.dumps(self.provenance)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Blocks":
        from safetensors import safe_open
        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise MixqError(f"{path}: not a mixq calibration file (format {meta.get('format')!r})")
                tokens = f.get_tensor("tokens").long()
        except MixqError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise MixqError(f"{path}: unreadable calibration file ({exc})") from None
        return cls(tokens, json.loads(meta["provenance"]))


def sample_blocks(texts: Texts, tokenizer, samples: int, seqlen: int, seed: int = 0, mode: str = "concat",
                  allow_fewer: bool = False) -> Blocks:
    """`samples` blocks of `seqlen` tokens.

    concat: documents shuffled with the seed, tokenized, concatenated, cut into consecutive blocks (AutoAWQ's
    recipe, without its dropping of long documents). document: each block a window at a seeded random offset in a
    seeded random document of at least `seqlen` tokens (GPTQ's c4 recipe). Never padded: fewer tokens than asked
    is an error, or with `allow_fewer` a stated shortfall.
    """
    if mode not in MODES:
        raise MixqError(f"unknown sampling mode {mode!r} (choose from {', '.join(MODES)})")
    if samples <= 0 or seqlen <= 1:
        raise MixqError(f"need samples >= 1 and seqlen >= 2 (got {samples} x {seqlen})")
    rng = random.Random(seed)
    order = list(range(len(texts.documents)))
    rng.shuffle(order)
    digest = hashlib.sha256()
    rows: list[list[int]] = []
    available = 0
    if mode == "concat":
        stream: list[int] = []
        for i in order:
            ids = encode_document(tokenizer, texts.documents[i])
            digest.update(json.dumps(texts.documents[i], ensure_ascii=False).encode())
            stream += ids
            if len(stream) >= samples * seqlen:
                break
        available = len(stream)
        rows = [stream[j * seqlen:(j + 1) * seqlen] for j in range(min(samples, len(stream) // seqlen))]
    else:
        long_enough = []
        for i in order:
            ids = encode_document(tokenizer, texts.documents[i])
            digest.update(json.dumps(texts.documents[i], ensure_ascii=False).encode())
            available += len(ids)
            if len(ids) >= seqlen:
                long_enough.append(ids)
        for _ in range(samples if long_enough else 0):  # with replacement, as GPTQ draws from c4
            ids = rng.choice(long_enough)
            start = rng.randint(0, len(ids) - seqlen)
            rows.append(ids[start:start + seqlen])
    shortfall = samples - len(rows)
    if shortfall:
        what = (f"{available} tokens make {len(rows)} blocks of {seqlen}" if mode == "concat" else
                f"no document has {seqlen} tokens")
        if not allow_fewer or not rows:
            raise MixqError(f"{texts.provenance.get('source', 'calibration text')}: {what}, fewer than the "
                            f"{samples} requested (use fewer --samples, a shorter --seqlen, more text, or "
                            f"--allow-fewer)")
    provenance = dict(texts.provenance, mode=mode, seed=seed, samples=len(rows), requested_samples=samples,
                      seqlen=seqlen, shortfall=shortfall, tokens=len(rows) * seqlen, documents=len(texts.documents),
                      text_sha256=digest.hexdigest(), tokenizer=tokenizer_fingerprint(tokenizer),
                      tokenizer_name=getattr(tokenizer, "name_or_path", ""), format=FORMAT)
    return Blocks(torch.tensor(rows, dtype=torch.long), provenance)


def prepare(model: str | Path, source: str, samples: int = 128, seqlen: int = 512, seed: int = 0,
            mode: str = "concat", split: str | None = None, text_field: str | None = None,
            allow_fewer: bool = False, tokenizer=None) -> Blocks:
    """Calibration blocks for `model` from `source` (a prepared .safetensors file is loaded as it is)."""
    path = Path(source)
    if path.suffix == ".safetensors" and path.is_file():
        blocks = Blocks.load(path)
        if blocks.tokens.shape[0] < samples and not allow_fewer:
            raise MixqError(f"{path}: holds {blocks.tokens.shape[0]} blocks, fewer than the {samples} requested")
        tokens = blocks.tokens[:samples]
        return Blocks(tokens, dict(blocks.provenance, prepared_file=str(path), samples=tokens.shape[0],
                                   requested_samples=samples, tokens=tokens.numel(),
                                   shortfall=max(samples - tokens.shape[0], 0)))
    tokenizer = tokenizer or load_tokenizer(model)
    texts = load_texts(source, split=split, text_field=text_field)
    return sample_blocks(texts, tokenizer, samples, seqlen, seed, mode, allow_fewer)


def evaluation_ids(tokenizer, source: str, split: str | None = None, text_field: str | None = None) -> tuple[
        list[int], dict]:
    """The evaluation text tokenized once, with the tokenizer's own BOS."""
    texts = load_texts(source, split=split, text_field=text_field, evaluation=True)
    plain = [d for d in texts.documents if isinstance(d, str)]
    if not plain:
        raise MixqError(f"{source}: no plain text to evaluate on (conversations are for calibration)")
    # a text file is scored as it is (llama.cpp's perplexity tool and the papers' scripts do); records of a
    # dataset are joined by blank lines, as wikitext's evaluation does
    text = texts.text if texts.text is not None else "\n\n".join(plain)
    provenance = dict(texts.provenance, text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                      characters=len(text), tokenizer=tokenizer_fingerprint(tokenizer))
    return tokenizer(text).input_ids, provenance

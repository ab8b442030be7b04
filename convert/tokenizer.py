"""The vocabulary of a checkpoint, and its files in each layout.

Two kinds of vocabulary occur in this family: SentencePiece BPE (Mistral/Mixtral, Llama 2; `tokenizer.model`,
GGUF `tokenizer.ggml.model = llama`) and byte-level BPE (GGUF `gpt2`, HF `tokenizer.json` only). A `Vocab` holds
either, with the original files when there are any, and renders the files each layout needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MixqError

# Mixtral-8x7B-Instruct-v0.1's "v1" instruct format, the template Mistral ships with system-prompt support.
# Rendered by transformers with the tokenizer.json written here it gives the ids of mistral-common's v1
# instruct tokenizer (tests/test_tokenizer.py holds the oracle).
MISTRAL_V1_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json")

# byte-level BPE pre-tokenizers by GGUF `tokenizer.ggml.pre`
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BPE_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def _sp_pb2():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # pragma: no cover - a dependency
        raise MixqError(f"reading tokenizer.model needs sentencepiece and protobuf ({exc})") from None
    return sentencepiece_model_pb2


def parse_sp_model(data: bytes, where: str):
    proto = _sp_pb2().ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise MixqError(f"{where}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise MixqError(f"{where}: SentencePiece model without pieces")
    if proto.trainer_spec.model_type != 2:  # BPE
        raise MixqError(f"{where}: only SentencePiece BPE models are supported "
                        f"(model_type {proto.trainer_spec.model_type})")
    return proto


@dataclass
class Vocab:
    model: str                                   # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True
    pre: str | None = None
    chat_template: str | None = None
    sp_model: bytes | None = None                # the original tokenizer.model, kept byte for byte
    hf_files: dict[str, bytes] = field(default_factory=dict)  # the original HF tokenizer files

    def __len__(self) -> int:
        return len(self.tokens)

    # ---- readers -------------------------------------------------------------------------------------------

    @classmethod
    def from_sp_model(cls, data: bytes, where: str, chat_template: str | None = None) -> "Vocab":
        proto = parse_sp_model(data, where)
        ts = proto.trainer_spec
        ids = lambda i: i if 0 <= i < len(proto.pieces) else None  # noqa: E731
        return cls(model="llama", tokens=[p.piece for p in proto.pieces], scores=[p.score for p in proto.pieces],
                   types=[int(p.type) for p in proto.pieces], bos_id=ids(ts.bos_id), eos_id=ids(ts.eos_id),
                   unk_id=ids(ts.unk_id), pad_id=ids(ts.pad_id), add_bos=True, add_eos=False,
                   add_space_prefix=proto.normalizer_spec.add_dummy_prefix, chat_template=chat_template,
                   sp_model=data)

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Vocab | None":
        files = {name: (path / name).read_bytes() for name in HF_TOKENIZER_FILES if (path / name).is_file()}
        if not files:
            return None
        try:
            return cls._from_hf_files(path, files)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:  # JSON of the wrong shape
            raise MixqError(f"{path}: malformed tokenizer files ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_hf_files(cls, path: Path, files: dict[str, bytes]) -> "Vocab | None":
        config = _json(files.get("tokenizer_config.json"), path / "tokenizer_config.json") or {}
        template = config.get("chat_template")
        if "chat_template.jinja" in files:
            template = files["chat_template.jinja"].decode()
        elif "chat_template.json" in files:
            template = _json(files["chat_template.json"], path / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # several named templates: keep the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise TypeError(f"chat_template must be text, got {template!r}")
        if "tokenizer.model" in files:
            vocab = cls.from_sp_model(files["tokenizer.model"], str(path / "tokenizer.model"), template)
            vocab.add_bos = bool(config.get("add_bos_token", True))
            vocab.add_eos = bool(config.get("add_eos_token", False))
        elif "tokenizer.json" in files:
            vocab = _bpe_from_tokenizer_json(_json(files["tokenizer.json"], path / "tokenizer.json"), config,
                                             path / "tokenizer.json")
            vocab.chat_template = template
        else:
            return None
        vocab.hf_files = files
        return vocab

    # ---- writers -------------------------------------------------------------------------------------------

    def special_token(self, token_id: int | None) -> str | None:
        return self.tokens[token_id] if token_id is not None and 0 <= token_id < len(self.tokens) else None

    def to_sp_model(self) -> bytes:
        """tokenizer.model: the original when there is one, else rebuilt from the pieces (GGUF input)."""
        if self.model != "llama":
            raise MixqError(f"a {self.model!r} (byte-level BPE) vocabulary has no SentencePiece tokenizer.model")
        if self.sp_model is not None:
            return self.sp_model
        pb2 = _sp_pb2()
        proto = pb2.ModelProto()
        for token, score, kind in zip(self.tokens, self.scores, self.types):
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = token, float(score), kind
        ts = proto.trainer_spec
        ts.model_type = 2
        ts.vocab_size = len(self.tokens)
        ts.byte_fallback = BYTE in self.types
        ts.unk_id = self.unk_id if self.unk_id is not None else -1
        ts.bos_id = self.bos_id if self.bos_id is not None else -1
        ts.eos_id = self.eos_id if self.eos_id is not None else -1
        ts.pad_id = self.pad_id if self.pad_id is not None else -1
        for attr, token_id in (("unk_piece", self.unk_id), ("bos_piece", self.bos_id), ("eos_piece", self.eos_id),
                               ("pad_piece", self.pad_id)):
            if token_id is not None:
                setattr(ts, attr, self.tokens[token_id])
        ns = proto.normalizer_spec
        ns.name = "identity"
        ns.add_dummy_prefix = self.add_space_prefix
        ns.remove_extra_whitespaces = False
        ns.escape_whitespaces = True
        return proto.SerializeToString()

    def hf_files_out(self) -> dict[str, bytes]:
        """The Hugging Face tokenizer files: the originals when read from HF, else built here."""
        if self.hf_files:
            return dict(self.hf_files)
        files = {"tokenizer.json": _dump(self.tokenizer_json())}
        special = {k: v for k, v in (("bos_token", self.special_token(self.bos_id)),
                                     ("eos_token", self.special_token(self.eos_id)),
                                     ("unk_token", self.special_token(self.unk_id)),
                                     ("pad_token", self.special_token(self.pad_id))) if v is not None}
        # PreTrainedTokenizerFast loads tokenizer.json as written; transformers 5's LlamaTokenizer rebuilds the
        # normalizer and then differs from SentencePiece on leading and repeated spaces.
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "add_bos_token": self.add_bos, "add_eos_token": self.add_eos, **special,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000_000}
        if self.model == "llama":
            files["tokenizer.model"] = self.to_sp_model()
        if self.pre:
            config["gguf_pre"] = self.pre
        if self.chat_template:
            config["chat_template"] = self.chat_template
        files["tokenizer_config.json"] = _dump(config)
        files["special_tokens_map.json"] = _dump(special)
        return files

    def tokenizer_json(self) -> dict:
        special = [i for i, t in enumerate(self.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        added = [{"id": i, "content": self.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": self.types[i] == USER_DEFINED and self.model == "llama",
                  "special": self.types[i] != USER_DEFINED} for i in special]
        bos = self.special_token(self.bos_id) if self.add_bos else None
        eos = self.special_token(self.eos_id) if self.add_eos else None
        def segment(seq: str, type_id: int) -> list[dict]:
            return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []) + \
                [{"Sequence": {"id": seq, "type_id": type_id}}] + \
                ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])

        post = {"type": "TemplateProcessing", "single": segment("A", 0), "pair": segment("A", 0) + segment("B", 1),
                "special_tokens": {t: {"id": t, "ids": [self.tokens.index(t)], "tokens": [t]}
                                   for t in (bos, eos) if t}}
        if self.model == "llama":
            return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": (
                        [{"type": "Prepend", "prepend": "\u2581"}] if self.add_space_prefix else []) + [
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
                    "pre_tokenizer": None,
                    "post_processor": post,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"}]
                        + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if self.add_space_prefix
                           else [])},
                    "model": {"type": "BPE", "dropout": None, "unk_token": self.special_token(self.unk_id),
                              "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                              "byte_fallback": BYTE in self.types, "ignore_merges": False,
                              "vocab": {t: i for i, t in enumerate(self.tokens)},
                              "merges": sentencepiece_merges(self.tokens, self.scores, self.types)}}
        pre = BPE_PRE_TOKENIZERS.get(self.pre or "default", _BYTE_LEVEL)
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": None, "pre_tokenizer": pre, "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                          "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": {t: i for i, t in enumerate(self.tokens)},
                          "merges": [m.split(" ", 1) for m in self.merges]}}


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """BPE merges that make a `tokenizers` BPE choose what SentencePiece chooses.

    SentencePiece merges, at each step, the adjacent pair whose concatenation is the highest-scoring piece.
    Ranking every split of every normal piece by that piece's score reproduces it, including the pieces with
    score -1e9 (runs of '▁') that SentencePiece only uses last; converters that rank by id do not.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _bpe_from_tokenizer_json(data: dict, config: dict, where: Path) -> Vocab:
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise MixqError(f"{where}: only BPE tokenizers are supported, this one is {model.get('type')!r}")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = NORMAL
    for content, token in added.items():
        types[token["id"]] = CONTROL if token.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    by_name = {t: i for i, t in enumerate(tokens)}

    def special(key):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return by_name.get(value)

    pre = config.get("gguf_pre") or _detect_pre(data.get("pre_tokenizer"))
    return Vocab(model="gpt2", tokens=tokens, scores=[0.0] * size, types=types, merges=merges,
                 bos_id=special("bos_token"), eos_id=special("eos_token"), unk_id=special("unk_token"),
                 pad_id=special("pad_token"), add_bos=bool(config.get("add_bos_token", False)),
                 add_eos=bool(config.get("add_eos_token", False)), add_space_prefix=False, pre=pre)


def _detect_pre(pre_tokenizer: dict | None) -> str:
    for name, known in BPE_PRE_TOKENIZERS.items():
        if pre_tokenizer == known:
            return name
    return "default"


def _json(data: bytes | None, where: Path):
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MixqError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MixqError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()

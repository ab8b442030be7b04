"""Calibration text: sources, chat rendering against mistral-common, deterministic sampling, bad input."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixq.calibration import Blocks, load_texts, load_tokenizer, prepare, sample_blocks
from mixq.calibration.blocks import encode_document
from mixq.convert import MixqError
from tests.models import tiny_torrent

TEXT = "\n\n".join(f"Paragraph {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40)) for i in range(60))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_torrent(tmp_path_factory.mktemp("m") / "src", layers=1)


@pytest.fixture(scope="module")
def tokenizer(model):
    return load_tokenizer(model)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_same_seed_same_blocks_other_seed_other_blocks(tokenizer, text_file):
    texts = load_texts(str(text_file))
    a = sample_blocks(texts, tokenizer, samples=8, seqlen=64, seed=1)
    b = sample_blocks(texts, tokenizer, samples=8, seqlen=64, seed=1)
    c = sample_blocks(texts, tokenizer, samples=8, seqlen=64, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.provenance["text_sha256"] == b.provenance["text_sha256"]


@pytest.mark.parametrize("mode", ["concat", "document"])
def test_exact_token_counts(tokenizer, text_file, mode):
    blocks = sample_blocks(load_texts(str(text_file)), tokenizer, samples=5, seqlen=32, seed=0, mode=mode)
    assert blocks.tokens.shape == (5, 32) and blocks.provenance["tokens"] == 160
    assert blocks.provenance["shortfall"] == 0 and blocks.provenance["mode"] == mode


def test_concat_blocks_are_consecutive_text(tokenizer, text_file):
    """Concatenate-and-chunk: the blocks are one stream of the shuffled documents' tokens, in order."""
    texts = load_texts(str(text_file))
    blocks = sample_blocks(texts, tokenizer, samples=4, seqlen=50, seed=3)
    import random
    order = list(range(len(texts.documents)))
    random.Random(3).shuffle(order)
    stream = [t for i in order for t in tokenizer(texts.documents[i]).input_ids]
    assert blocks.tokens.flatten().tolist() == stream[:200]


def test_document_mode_windows_come_from_single_documents(tokenizer, text_file):
    texts = load_texts(str(text_file))
    encoded = [tokenizer(d).input_ids for d in texts.documents]
    blocks = sample_blocks(texts, tokenizer, samples=6, seqlen=40, seed=0, mode="document")
    for row in blocks.tokens.tolist():
        assert any(any(ids[s:s + 40] == row for s in range(len(ids) - 39)) for ids in encoded)


CONVERSATIONS = [
    [{"role": "user", "content": "What is your favourite condiment?"},
     {"role": "assistant", "content": "Well, I'm quite partial to a good squeeze of fresh lemon juice."}],
    [{"role": "user", "content": "Name  two\ncolours."}, {"role": "assistant", "content": "Red and blue."},
     {"role": "user", "content": "One more?"}, {"role": "assistant", "content": " Green."}],
]


def _mistral_common(conversation):
    from mistral_common.protocol.instruct.validator import ValidationMode
    tokenizer = MistralTokenizer.v1()
    tokenizer._chat_completion_request_validator._mode = ValidationMode.finetuning  # a finished conversation
    roles = {"user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[roles[m["role"]](content=m["content"]) for m in conversation])
    return tokenizer.encode_chat_completion(request).tokens


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_documents_render_like_mistral_common_v1(tokenizer, conversation):
    assert encode_document(tokenizer, conversation) == _mistral_common(conversation)


def test_local_formats(tmp_path, tokenizer):
    rows = [{"text": p, "id": i} for i, p in enumerate(TEXT.split("\n\n"))]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text(TEXT)
    expected = [r["text"] for r in rows]
    for name in ("a.jsonl", "b.json", "c.parquet", "d.txt"):
        texts = load_texts(str(tmp_path / name))
        assert texts.documents == expected, name
        assert len(texts.provenance["sha256"]) == 64
    folder = load_texts(str(tmp_path))
    assert folder.documents == expected * 4 and folder.provenance["files"] == 4
    chat = tmp_path / "chat" / "chat.jsonl"
    chat.parent.mkdir()
    chat.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS))
    assert load_texts(str(chat)).documents == CONVERSATIONS
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"instruction": "Hi", "response": "Hello!"}))
    assert load_texts(str(pairs), text_field="instruction:response").documents == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]


def test_hub_code_path_on_local_files(tmp_path, tokenizer):
    """`hf:` goes through datasets.load_dataset, the path Hub names take; a local folder exercises it offline."""
    rows = [{"text": p} for p in TEXT.split("\n\n")]
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "train.parquet")
    texts = load_texts(f"hf:{tmp_path / 'ds'}", split="train")
    assert texts.documents == [r["text"] for r in rows] and texts.provenance["kind"] == "hub"


def test_offline_hub_name_says_how_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(MixqError) as error:
        load_texts("pileval")
    message = str(error.value)
    assert "cannot load 'pileval' from the Hugging Face Hub" in message and "local .txt/.jsonl/.parquet" in message
    assert "\n" not in message


def test_prepare_and_inspect_cli(cli, tmp_path, model, text_file):
    out = tmp_path / "calib.safetensors"
    result = cli("calibration", "prepare", model, "--calib", text_file, "--samples", 4, "--seqlen", 48,
                 "--seed", 5, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    blocks = Blocks.load(out)
    assert blocks.tokens.shape == (4, 48) and blocks.provenance["seed"] == 5
    shown = json.loads(cli("calibration", "inspect", out, "--json").stdout)
    assert shown["shape"] == [4, 48] and shown["source"] == str(text_file)
    again = prepare(model, str(out), samples=4)
    assert torch.equal(again.tokens, blocks.tokens) and again.provenance["prepared_file"] == str(out)
    assert cli("calibration", "prepare", model, "--calib", text_file, "-o", out).exit_code == 1  # exists


def test_builtin_kjv(tokenizer):
    texts = load_texts("kjv")
    assert len(texts.documents) == 1189 and texts.documents[0].startswith("In the beginning God created")
    blocks = sample_blocks(texts, tokenizer, samples=4, seqlen=128)
    assert blocks.tokens.shape == (4, 128) and blocks.provenance["source"] == "kjv"


# ---- bad input ---------------------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(MixqError, match="empty text file"):
        load_texts(str(tmp_path / "empty.txt"))


def test_missing_field(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "text"}))
    with pytest.raises(MixqError, match="no field 'content'"):
        load_texts(str(tmp_path / "x.jsonl"), text_field="content")
    with pytest.raises(MixqError, match="choose one with --field"):
        load_texts(str(tmp_path / "x.jsonl"))


def test_fewer_tokens_than_requested(tokenizer, text_file):
    texts = load_texts(str(text_file))
    with pytest.raises(MixqError, match="fewer than the 1000 requested"):
        sample_blocks(texts, tokenizer, samples=1000, seqlen=64)
    blocks = sample_blocks(texts, tokenizer, samples=1000, seqlen=64, allow_fewer=True)
    assert 0 < blocks.tokens.shape[0] < 1000
    assert blocks.provenance["shortfall"] == 1000 - blocks.tokens.shape[0]
    with pytest.raises(MixqError, match="no document has 4096 tokens"):
        sample_blocks(texts, tokenizer, samples=2, seqlen=4096, mode="document", allow_fewer=True)


def test_unknown_source():
    with pytest.raises(MixqError, match="no such file, folder, built-in text"):
        load_texts("definitely-not-here.jsonl")


def test_a_text_file_is_evaluated_as_it_is(tmp_path, tokenizer):
    """The tokens scored are the file's text, byte for byte (blank-line runs, CRLF, trailing spaces kept), as
    llama.cpp's perplexity tool reads it; the provenance hash is the file's."""
    from mixq.calibration.blocks import evaluation_ids
    text = "First paragraph.\n\n\n  Indented second,\r\nwith CRLF.\n\nThird  \n"
    path = tmp_path / "eval.txt"
    path.write_bytes(text.encode())
    ids, provenance = evaluation_ids(tokenizer, str(path))
    assert ids == tokenizer(text).input_ids
    assert provenance["text_sha256"] == provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

"""The HF tokenizer files mixq builds from tokenizer.model, against SentencePiece and mistral-common."""

import pytest
import sentencepiece as spm
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixq.convert import convert_checkpoint
from mixq.convert.tokenizer import Vocab
from tests.fixtures import mistral_tokenizer_path
from tests.models import tiny_torrent

STRINGS = ["Hello world", "  two  spaces", "über 123456 🙂", "\n\tline", " leading space",
           "[INST] What is your favourite condiment? [/INST]", "a  b   c    d", "x\u00a0y  \t z",
           "tab\there, CRLF\r\n end."]
CONVERSATIONS = [
    [("user", "What is your favourite condiment?"),
     ("assistant", "Well, I'm quite partial to a good squeeze of fresh lemon juice."),
     ("user", "Do you have mayonnaise recipes?")],
    [("system", "You are a terse assistant."), ("user", "a"), ("assistant", "b"), ("user", "c")],
    [("system", "SYSTEM"), ("user", "  Two  spaces\nand 12345 über 🙂")],
    [("user", "Hi"), ("assistant", " leading space"), ("user", "Bye")],
]
ROLES = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    tmp = tmp_path_factory.mktemp("tok")
    tiny_torrent(tmp / "src", layers=1)
    convert_checkpoint(tmp / "src", tmp / "hf", "hf")
    return AutoTokenizer.from_pretrained(tmp / "hf")


def test_encodes_like_sentencepiece(hf_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_path()))
    for text in STRINGS:
        assert hf_tokenizer(text).input_ids == [1] + sp.encode(text), text
        assert hf_tokenizer.decode(hf_tokenizer(text).input_ids, skip_special_tokens=True) == sp.decode(
            sp.encode(text)), text


def test_reference_ids(hf_tokenizer):
    assert hf_tokenizer("Hello world").input_ids == [1, 22557, 1526]
    assert hf_tokenizer("  two  spaces", add_special_tokens=False).input_ids == [259, 989, 28705, 10599]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_equals_mistral_common_v1(hf_tokenizer, conversation):
    reference = MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[ROLES[r](content=c) for r, c in conversation])).tokens
    ids = hf_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in conversation],
                                           tokenize=True, return_dict=True)["input_ids"]
    assert ids == reference


def test_merges_rank_by_piece_score():
    """Every normal piece longer than one character can be built, and '▁▁' (score -1e9) is merged last."""
    vocab = Vocab.from_sp_model(mistral_tokenizer_path().read_bytes(), "v1")
    merges = vocab.tokenizer_json()["model"]["merges"]
    score = dict(zip(vocab.tokens, vocab.scores))
    scores = [score[left + right] for left, right in merges]
    assert scores == sorted(scores, reverse=True)
    tail = merges[scores.index(-1e9):]
    assert ["▁", "▁"] in tail and all(set(left + right) == {"▁"} for left, right in tail)


def test_sp_model_rebuilt_from_pieces_encodes_the_same():
    original = mistral_tokenizer_path().read_bytes()
    vocab = Vocab.from_sp_model(original, "v1")
    vocab.sp_model = None  # as when read from GGUF metadata
    rebuilt = spm.SentencePieceProcessor(model_proto=vocab.to_sp_model())
    sp = spm.SentencePieceProcessor(model_proto=original)
    for text in STRINGS:
        assert rebuilt.encode(text) == sp.encode(text), text

"""tiktoken stands in for a byte-level BPE tokenizer only with the tokenizer's own ids: texts of every script,
code and whitespace, added tokens' texts, tokens the vocabulary lacks; otherwise the tokenizer does the work."""

import copy
import json
import logging

import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmforge.data import fast_bpe
from lmforge.data.fast_bpe import PROBE, FastBPE, Unsupported

TEXTS = [
    PROBE,
    "The quick brown fox jumps over the lazy dog. " * 20,
    "import numpy as np\n\nclass A:\n    def __init__(self):\n        self.x = [1, 22, 333, 4444]  # comment\n",
    "  leading and trailing whitespace \t\n\n\n   ",
    "数字 1234567890 和 emoji 🙂🙃, العربية, Ελληνικά, кириллица; e\u0301 (combining) \u00e9 (precomposed)",
    "https://example.com/a_b-c?d=e&f=g#h <tag attr=\"v\">text</tag> {'json': [true, null, 1.5e-3]}",
    "",
]


def tokenizer_ids(tokenizer, texts):
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["smol_tokenizer", "llama3_tokenizer"])
def test_tiktoken_gives_the_tokenizers_ids(name, request):
    """SmolLM2 (GPT-2 regex, BPE without ignore_merges) and Llama 3 (a Split regex, ignore_merges)."""
    tokenizer = request.getfixturevalue(name)
    fast = fast_bpe.fast_bpe(tokenizer, TEXTS)
    assert fast is not None
    assert fast.encode(TEXTS) == tokenizer_ids(tokenizer, TEXTS)


@pytest.mark.parametrize("name", ["smol_tokenizer", "llama3_tokenizer"])
def test_a_text_with_an_added_tokens_text_goes_through_the_tokenizer(name, request):
    tokenizer = request.getfixturevalue(name)
    fast = FastBPE.build(tokenizer)
    special = tokenizer.eos_token
    texts = ["plain text", f"a reply{special} and more", f"{special}"]
    theirs = tokenizer_ids(tokenizer, texts)
    assert tokenizer.eos_token_id in theirs[1]  # the tokenizer matches the special token's text itself
    assert fast.encode(texts) == theirs
    assert fast._with_added(texts) == {1, 2}


def test_a_token_the_vocabulary_lacks_sends_its_text_to_the_tokenizer(smol_tokenizer):
    fast = FastBPE.build(smol_tokenizer)
    missing = fast.encoding.encode_ordinary(" the")
    assert len(missing) == 1
    fast.ids = fast.ids.copy()
    fast.ids[missing[0]] = -1  # as if the vocabulary had no " the"
    texts = ["in the end", "nothing here"]
    assert fast.encode(texts) == tokenizer_ids(smol_tokenizer, texts)


def with_backend(tokenizer, change):
    """A copy of `tokenizer` whose Rust tokenizer is changed by `change(backend)`."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    change(backend)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tokenizer.eos_token)


@pytest.mark.parametrize("change, why", [
    (lambda b: setattr(b, "normalizer", normalizers.Lowercase()), "it normalizes text \\(Lowercase\\)"),
    (lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)])),
     "is not a byte-level regex split"),
    (lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
     "is not a byte-level regex split"),
])
def test_a_tokenizer_tiktoken_cannot_reproduce_keeps_its_own_bpe(smol_tokenizer, change, why, caplog):
    other = with_backend(smol_tokenizer, change)
    with pytest.raises(Unsupported, match=why):
        FastBPE.build(other)
    with caplog.at_level(logging.INFO):
        assert fast_bpe.fast_bpe(other, TEXTS) is None
    assert "tokenizing with the tokenizer itself" in caplog.text


def test_digits_split_off_first_as_smollm2s_tokenizer_json_does(smol_tokenizer):
    """The hub's SmolLM2 tokenizer isolates each digit before the GPT-2 regex: whitespace before a digit ends
    its stretch as the end of the text would."""
    other = with_backend(smol_tokenizer, lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])))
    texts = [*TEXTS, "a  1 b\n 2\t\t3   x", "3.14 1e-5 2026-12-02 12ab34 '5 x'99", "\u2460\u2461 \u0663\u0664 \u216b",
             "  42  ", "\n\n7\n\n"]
    fast = FastBPE.build(other)
    assert fast.encoding._pat_str == fast_bpe.GPT2_DIGITS_REGEX
    assert fast.encode(texts) == tokenizer_ids(other, texts)
    assert tokenizer_ids(other, texts[-5:]) != tokenizer_ids(smol_tokenizer, texts[-5:])  # digits do split


@pytest.mark.parametrize("form", ["NFC", "NFKC"])
def test_a_unicode_normalizer_is_applied_first(llama3_tokenizer, form):
    """Qwen2's tokenizer is Llama 3's shape with an NFC normalizer: composed and decomposed accents, ligatures,
    full-width and circled characters, and an added token's text that only normalization forms."""
    other = with_backend(llama3_tokenizer, lambda b: setattr(b, "normalizer", getattr(normalizers, form)()))
    texts = [*TEXTS, "cafe\u0301 vs caf\u00e9, \ufb01nance \u2460\u2461 \uff28\uff45\uff4c\uff4c\uff4f \u212b",
             "A\u030a ring, \u1e9b\u0323 long s", "full-width \uff1c|begin_of_text|\uff1e markers"]
    fast = FastBPE.build(other)
    assert fast.normal_form == form
    assert fast.encode(texts) == tokenizer_ids(other, texts)
    assert tokenizer_ids(other, texts[-3:-1]) != tokenizer_ids(llama3_tokenizer, texts[-3:-1])  # it does normalize


def test_a_bpe_that_splits_its_own_token_is_refused(smol_tokenizer):
    """Without ignore_merges a whole-token piece is merged, not looked up: a token whose merge is gone from
    the merges list would come out of tiktoken whole but out of the tokenizer in pieces."""
    spec = json.loads(smol_tokenizer.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    gone = next(i for i, m in enumerate(merges) if (m if isinstance(m, str) else " ".join(m)) == "Ġ t")
    edited = copy.deepcopy(spec)
    edited["model"]["merges"] = merges[:gone] + merges[gone + 1:]
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(edited)))
    with pytest.raises(Unsupported, match="splits its own token"):
        FastBPE.build(other)


def test_a_difference_on_the_sample_keeps_the_tokenizer(smol_tokenizer, monkeypatch, caplog):
    real = FastBPE.encode
    monkeypatch.setattr(FastBPE, "encode", lambda self, texts: [ids[::-1] for ids in real(self, texts)])
    with caplog.at_level(logging.WARNING):
        assert fast_bpe.fast_bpe(smol_tokenizer, ["a sample text"]) is None
    assert "gives other ids than the tokenizer" in caplog.text


def test_lmforge_fast_bpe_0_turns_it_off(smol_tokenizer, monkeypatch):
    monkeypatch.setenv("LMFORGE_FAST_BPE", "0")
    assert fast_bpe.fast_bpe(smol_tokenizer, TEXTS) is None

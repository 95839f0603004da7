"""Preference pairs: the accepted row shapes, their checks, and the token ids of prompt and answers
(the prompt masked, each answer trained up to and including its end token), cut at cutoff_len."""

import datasets
import pytest

from lmforge.data.catalogue import DatasetSpec
from lmforge.data.formats import RowError
from lmforge.data.pairwise import (
    answer_text,
    answer_tokens,
    encode_pairs_batch,
    fit_cutoff,
    prompt_messages,
    to_pairs,
    validate_pair,
)
from lmforge.data.processors import Status
from lmforge.data.templates import get_template
from lmforge.errors import LmforgeError

QUESTION = [{"role": "user", "content": "What is 2+2?"}]
# chatml's literal text for QUESTION with the system prompt "Be brief.", up to the generation prompt
CHATML_PROMPT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                 "<|im_start|>assistant\n")


def spec(formatting=None, **kwargs):
    return DatasetSpec(name="pairs", files=[], file_type="json", formatting=formatting, **kwargs)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pair_rows(rows, s=None):
    return to_pairs(datasets.Dataset.from_list(rows), s or spec()).remove_columns("_invalid").to_list()


def encode(tokenizer, chosen, rejected, cutoff_len=1024, template="chatml", system="Be brief.", messages=QUESTION):
    batch = {"_system": [system], "_messages": [messages], "_chosen": [chosen], "_rejected": [rejected]}
    out = encode_pairs_batch(batch, tokenizer, get_template(template, tokenizer), cutoff_len)
    return {k: v[0] for k, v in out.items()}


@pytest.mark.parametrize("value, expected", [
    ("plain", "plain"),
    ({"role": "assistant", "content": "dict"}, "dict"),
    ({"from": "gpt", "value": "sharegpt"}, "sharegpt"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "last"}], "last"),
    (None, ""),
])
def test_answer_text_accepts_strings_messages_and_lists(value, expected):
    assert answer_text(value, "chosen") == expected


@pytest.mark.parametrize("value, message", [([], "'chosen' is an empty list"),
                                            ({"text": "x"}, "'chosen' message has no 'content' key")])
def test_answer_text_rejects(value, message):
    with pytest.raises(RowError, match=message):
        answer_text(value, "chosen")


def test_prompt_messages_from_a_string_or_messages():
    assert prompt_messages("Hi") == [{"role": "user", "content": "Hi"}]
    assert prompt_messages([{"role": "user", "content": "Hi", "extra": 1}]) == [{"role": "user", "content": "Hi"}]
    with pytest.raises(RowError, match="'prompt' must be a string or a list of {role, content} messages"):
        prompt_messages([{"content": "no role"}])


def test_prompt_chosen_rejected_rows_as_strings_or_messages():
    expected = {"_system": "", "_messages": QUESTION, "_chosen": "4", "_rejected": "5"}
    assert pair_rows([{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}]) == [expected]
    messages = {"prompt": [{"role": "system", "content": "Be brief."}, *QUESTION],
                "chosen": [*QUESTION, {"role": "assistant", "content": "4"}],
                "rejected": [*QUESTION, {"role": "assistant", "content": "5"}]}
    assert pair_rows([messages]) == [{**expected, "_system": "Be brief."}]


def test_alpaca_pairs_keep_the_prompt_side():
    rows = [{"instruction": "Add.", "input": "2 and 2", "chosen": "4", "rejected": "5"}]
    assert pair_rows(rows, spec("alpaca")) == [
        {"_system": "", "_messages": [{"role": "user", "content": "Add.\n2 and 2"}], "_chosen": "4", "_rejected": "5"}]


def test_sharegpt_pairs_take_answers_as_messages():
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"}],
             "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}]
    assert pair_rows(rows, spec("sharegpt")) == [
        {"_system": "Be brief.", "_messages": QUESTION, "_chosen": "4", "_rejected": "5"}]


@pytest.mark.parametrize("messages, chosen, rejected, message", [
    ([], "a", "b", "empty prompt"),
    ([{"role": "user", "content": "  "}], "a", "b", "empty prompt"),
    ([{"role": "assistant", "content": "x"}, *QUESTION], "a", "b", "prompt turn 1 is 'assistant' but 'user'"),
    ([*QUESTION, {"role": "assistant", "content": "4"}], "a", "b", "the prompt must end with a user turn"),
    (QUESTION, " ", "b", "empty chosen response"),
    (QUESTION, "a", "", "empty rejected response"),
    (QUESTION, "same ", " same", "chosen and rejected are identical"),
])
def test_validate_pair_rejects(messages, chosen, rejected, message):
    with pytest.raises(RowError, match=message):
        validate_pair(messages, chosen, rejected)


def test_invalid_pairs_name_the_row_or_are_skipped():
    rows = datasets.Dataset.from_list([{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                       {"prompt": "Q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(LmforgeError, match="dataset 'pairs' row 2: chosen and rejected are identical"):
        to_pairs(rows, spec())
    assert to_pairs(rows, spec(), skip_invalid=True)["_invalid"] == [
        "", "dataset 'pairs' row 2: chosen and rejected are identical"]


def test_answer_tokens_mask_the_history_and_stop_after_the_end_token(smol_tokenizer):
    """The earlier assistant turn belongs to the prompt; the trained span is the reply with its own suffix
    (<|im_end|> and the newline), as LLaMA-Factory's chosen/rejected ids are."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, *QUESTION]
    prompt = ids(smol_tokenizer, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                 "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    answer = ids(smol_tokenizer, "4<|im_end|>\n")
    got, start, end = answer_tokens(get_template("chatml", smol_tokenizer), smol_tokenizer, "Be brief.", messages, "4")
    assert got == prompt + answer
    assert (start, end) == (len(prompt), len(prompt) + len(answer))


def test_pair_ids_are_the_prompt_then_each_answer_with_its_end_token(smol_tokenizer):
    """Answers that start alike ("It is") keep their shared words: the prompt ends where training starts."""
    out = encode(smol_tokenizer, "It is 4.", "It is 5.")
    assert out["prompt_ids"] == ids(smol_tokenizer, CHATML_PROMPT)
    assert out["chosen_ids"] == ids(smol_tokenizer, "It is 4.<|im_end|>\n") == [1589, 314, 216, 36, 30, 2, 198]
    assert out["rejected_ids"] == ids(smol_tokenizer, "It is 5.<|im_end|>\n") == [1589, 314, 216, 37, 30, 2, 198]
    assert (out["_status"], out["_loss_tokens"]) == (Status.KEPT, 14)


def test_pair_ids_with_a_template_that_strips_and_has_no_suffix(llama3_tokenizer):
    out = encode(llama3_tokenizer, " Four. ", "Five.", template="llama3")
    prompt = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert out["prompt_ids"] == ids(llama3_tokenizer, prompt)
    assert out["chosen_ids"] == ids(llama3_tokenizer, "Four.<|eot_id|>")
    assert out["rejected_ids"] == ids(llama3_tokenizer, "Five.<|eot_id|>")


def test_fit_cutoff():
    prompt, answers = [1, 2, 3], [[4, 5, 6], [7]]
    assert fit_cutoff(prompt, answers, 6) == ([1, 2, 3], [[4, 5, 6], [7]], Status.KEPT)
    assert fit_cutoff(prompt, answers, 5) == ([1, 2, 3], [[4, 5], [7]], Status.TRUNCATED)
    assert fit_cutoff(prompt, answers, 3) == ([], [[], []], Status.DROPPED)


def test_cutoff_cuts_both_answers_to_the_room_the_prompt_leaves(smol_tokenizer):
    prompt = ids(smol_tokenizer, CHATML_PROMPT)
    out = encode(smol_tokenizer, "It is 4.", "Five, of course.", cutoff_len=len(prompt) + 3)
    assert out["prompt_ids"] == prompt
    assert out["chosen_ids"] == ids(smol_tokenizer, "It is 4.<|im_end|>")[:3] == [1589, 314, 216]
    assert out["rejected_ids"] == ids(smol_tokenizer, "Five, of course.<|im_end|>")[:3]
    assert (out["_status"], out["_loss_tokens"]) == (Status.TRUNCATED, 6)


def test_a_prompt_that_fills_cutoff_len_drops_the_pair(smol_tokenizer):
    out = encode(smol_tokenizer, "4", "5", cutoff_len=len(ids(smol_tokenizer, CHATML_PROMPT)))
    assert (out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]) == ([], [], [])
    assert (out["_status"], out["_loss_tokens"]) == (Status.DROPPED, 0)

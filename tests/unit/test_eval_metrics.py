"""The pieces of `lmforge eval`: text metrics (jieba for Chinese), reply spans, eval_task parsing, benchmark
files in their published layouts, LLaMA-Factory's multiple-choice prompt, answer-letter tokens, left padding."""

import pytest

from lmforge.config.args import EvalArguments
from lmforge.errors import LmforgeError
from lmforge.eval.benchmarks import Question, parse_task, read_csv
from lmforge.eval.choice import build_messages, letter_token_ids, summarize
from lmforge.eval.generation import cut_at_stop_words, left_pad, split_last_reply
from lmforge.eval.metrics import WordTokenizer, bleu4, exact_match, rouge, score_generations
from lmforge.eval.runner import format_table


def test_exact_match_ignores_outer_whitespace_only():
    assert exact_match([" Paris\n", "paris", "Rome"], ["Paris", "Paris", "Paris"]) == pytest.approx(100 / 3)


def test_bleu_is_100_for_identical_text_and_0_without_shared_words():
    text = ["the quick brown fox jumps over the lazy dog"]
    assert bleu4(text, text) == pytest.approx(100.0)
    assert bleu4(["completely different words here now"], text) == 0.0


def test_rouge_f_measures_match_hand_counts():
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge-1"] == pytest.approx(100 * 2 * 1.0 * 0.5 / 1.5)  # P 3/3, R 3/6
    assert scores["rouge-2"] == pytest.approx(100 * 2 * 1.0 * 0.4 / 1.4)  # P 2/2, R 2/5
    assert scores["rouge-l"] == pytest.approx(scores["rouge-1"])


def test_chinese_is_cut_into_words_by_jieba():
    assert WordTokenizer().tokenize("我喜欢猫") == ["我", "喜欢", "猫"]
    # rouge-score's own tokenizer drops every Chinese character (all scores 0); with jieba 2 of 3 words match
    assert rouge(["我喜欢猫"], ["我喜欢狗"])["rouge-1"] == pytest.approx(100 * 2 / 3)
    assert bleu4(["我喜欢猫。"], ["我喜欢猫。"]) == pytest.approx(100.0)  # sacrebleu's zh tokenizer


def test_score_generations_reports_every_metric():
    assert set(score_generations(["a b"], ["a b"])) == {"exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l"}


def test_the_reference_is_the_last_trained_reply():
    # prompt, reply 1, prompt 2, reply 2 (-100 = no loss)
    labels = [-100, -100, 5, 6, -100, -100, 9, 10, 11, -100]
    assert split_last_reply(list(range(10)), labels) == (6, 9)
    assert split_last_reply([1, 2], [-100, -100]) is None


def test_stop_words_of_several_tokens_end_the_reply():
    assert cut_at_stop_words("Paris</s>junk", ("</s>",)) == "Paris"
    assert cut_at_stop_words(" Paris ", ("</s>",)) == "Paris"


def test_left_padding_puts_every_prompt_end_in_the_last_column():
    batch = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("given, kinds, harness", [
    (["perplexity", "lm_eval:arc_easy", "hellaswag"], ["perplexity", "lm_eval"], ["arc_easy", "hellaswag"]),
    (["lm_eval:a,b", "generation"], ["lm_eval", "generation"], ["a", "b"]),
    (["choice", "choice"], ["choice"], []),
])
def test_eval_task_parses_kinds_and_harness_tasks(given, kinds, harness):
    args = EvalArguments(eval_task=given, output_dir="out")
    assert (args.eval_task, args.lm_eval_tasks) == (kinds, harness)


@pytest.mark.parametrize("given, message", [
    (["perplexty"], "did you mean 'perplexity'"), ([], "eval needs eval_task"), (["lm_eval:"], "needs task names"),
])
def test_bad_eval_task_is_named(given, message):
    with pytest.raises(LmforgeError, match=message):
        EvalArguments(eval_task=given, output_dir="out")


@pytest.mark.parametrize("task, expected", [
    ("mmlu_test", ("mmlu", "test")), ("ceval_validation", ("ceval", "validation")), ("ceval_val", ("ceval", "validation")),
    ("cmmlu", ("cmmlu", "test")), ("mmlu_demo_test", ("mmlu_demo", "test")), ("mmlu_dev", ("mmlu", "dev")),
])
def test_task_names_follow_llama_factory(task, expected):
    assert parse_task(task) == expected


@pytest.mark.parametrize("text", [
    "id,question,A,B,C,D,answer,explanation\n0,Q?,a,b,c,d,C,because\n",  # C-Eval
    ",Question,A,B,C,D,Answer\n0,Q?,a,b,c,d,C\n",  # CMMLU
    "Q?,a,b,c,d,C\n",  # MMLU: no header
])
def test_csv_layouts_of_mmlu_ceval_and_cmmlu(tmp_path, text):
    path = tmp_path / "s.csv"
    path.write_text(text)
    assert read_csv(path) == [Question("Q?", ("a", "b", "c", "d"), 2)]


def test_csv_errors_name_the_file_the_line_and_the_column(tmp_path):
    path = tmp_path / "law_val.csv"
    path.write_text("question,A,B,C,D\nQ?,a,b,c,d\n")
    with pytest.raises(LmforgeError, match=r"law_val.csv: missing column 'answer'"):
        read_csv(path)
    path.write_text("question,A,answer\nQ?,a,A\n")
    with pytest.raises(LmforgeError, match=r"missing column 'B'"):
        read_csv(path)
    path.write_text("question,A,B,answer\nQ?,a,b,A\nQ2?,a,b,Z\n")
    with pytest.raises(LmforgeError, match=r"law_val.csv:3: answer 'Z' is not one of A, B"):
        read_csv(path)


def test_choice_prompt_is_llama_factory_s_eval_template():
    shot = Question("1+1?", ("2", "3"), 0)
    question = Question("2+2?", ("3", "4"), 1)
    messages = build_messages(question, [shot], "arithmetic", "en")
    assert messages == [
        {"role": "user", "content": "The following are multiple choice questions (with answers) about arithmetic."
                                    "\n\n1+1?\nA. 2\nB. 3\nAnswer:"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "2+2?\nA. 3\nB. 4\nAnswer:"},
    ]
    assert build_messages(question, [], "数学", "zh")[0]["content"].endswith("\n答案：")


def test_answer_letters_are_read_as_the_model_would_write_them(smol_tokenizer):
    after_text = letter_token_ids(smol_tokenizer, "...\nAnswer:", 4)
    after_newline = letter_token_ids(smol_tokenizer, "<|im_start|>assistant\n", 4)
    assert [smol_tokenizer.decode([i]) for i in after_text] == [" A", " B", " C", " D"]
    assert [smol_tokenizer.decode([i]) for i in after_newline] == ["A", "B", "C", "D"]


def test_category_accuracy_is_a_mean_over_questions():
    from lmforge.eval.benchmarks import Subject

    subjects = [Subject("a", "a", "STEM", {}), Subject("b", "b", "STEM", {}), Subject("c", "c", "Other", {})]
    records = ([{"subject": "a", "answer": "A", "prediction": "A"}] * 3 + [{"subject": "b", "answer": "A",
               "prediction": "B"}] + [{"subject": "c", "answer": "C", "prediction": "C"}])
    summary = summarize(records, subjects)
    assert summary["categories"] == {"Other": 100.0, "STEM": 75.0} and summary["accuracy"] == 80.0
    assert summary["subjects"]["b"] == {"accuracy": 0.0, "questions": 1, "category": "STEM"}


def test_llama_factory_s_eval_names_are_read(tmp_path):
    from lmforge.eval.runner import parse_eval_config

    config = tmp_path / "eval.yaml"
    config.write_text("task: mmlu_test\ntask_dir: evaluation\nlang: zh\nn_shot: 5\nsave_dir: saves/x\nbatch_size: 4\n"
                      "eval_task: choice\n")
    _, _, args = parse_eval_config([str(config)])
    assert (args.output_dir, args.task, args.lang, args.batch_size) == ("saves/x", "mmlu_test", "zh", 4)


def test_summary_table_aligns_columns():
    table = format_table([("choice", "accuracy", "80.0000"), ("perplexity", "eval_loss", "2.1000")])
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "value"] and len({len(line) for line in lines}) == 1

"""`lmforge eval` end to end on tiny models: perplexity equal to train's eval_loss, generation scored against
references with left-padded batches, multiple-choice benchmarks in both published layouts (accuracy from
chance to >= 0.9 once a model is taught the answers), lm-eval on a local task, and bad input."""

import json
from pathlib import Path

import pytest
from eval_helpers import (
    teach_choices,
    teach_replies,
    write_csv_benchmark,
    write_parquet_benchmark,
)

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATA = str(ROOT / "data")


def evaluate(*args: str) -> dict:
    """Run `lmforge eval` and return its eval_results.json."""
    argv = ["eval", *args]
    assert main(argv) == 0
    out = Path(argv[argv.index("--output_dir") + 1])
    return json.loads((out / "eval_results.json").read_text())


@pytest.mark.parametrize("stage, dataset, extra", [
    ("sft", "alpaca_demo", ["--template", "chatml"]),
    ("pt", "finance_corpus", ["--cutoff_len", "64"]),
])
def test_perplexity_equals_the_eval_loss_train_reports(tmp_path, tiny_llama_dir, stage, dataset, extra):
    """6 held-out rows in eval batches of 4 (a full and a partial batch), as the Trainer weighs them."""
    data = ["--stage", stage, "--dataset", dataset, "--dataset_dir", DATA, "--val_size", "6", *extra]
    run = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama_dir), *data, "--max_steps", "2", "--lora_rank", "4",
                 "--learning_rate", "5e-2", "--per_device_eval_batch_size", "4", "--output_dir", str(run),
                 "--save_strategy", "no"]) == 0
    trained = json.loads((run / "all_results.json").read_text())
    results = evaluate("--adapter_name_or_path", str(run), *data, "--eval_task", "perplexity", "--batch_size", "4",
                       "--output_dir", str(tmp_path / "eval"))["perplexity"]
    assert results["rows"] == 6
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-4)
    assert results["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-3)
    if stage == "pt":  # every block carries cutoff_len - 1 loss tokens: both definitions agree
        assert results["token_loss"] == pytest.approx(results["eval_loss"], abs=1e-6)
        assert results["loss_tokens"] == 6 * 63


REPLIES = [("What is the capital of France?", "Paris"), ("Name a colour of the sky.", "Blue"),
           ("Say hi in one word, in a slightly longer prompt than the others please.", "Hello"), ("2+2?", "Four")]


@pytest.fixture(scope="module")
def replies_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("replies") / "replies.json"
    path.write_text(json.dumps([{"instruction": q, "output": a} for q, a in REPLIES]))
    return path


def test_generation_scores_a_taught_model_and_batching_changes_nothing(tmp_path, tiny_llama_dir, replies_file):
    from lmforge.config import DataArguments, ModelArguments
    from lmforge.data.pipeline import build_datasets
    from lmforge.model.loader import load_tokenizer

    data = ["--dataset", str(replies_file), "--template", "chatml", "--eval_task", "generation",
            "--max_new_tokens", "8"]
    before = evaluate("--model_name_or_path", str(tiny_llama_dir), *data, "--output_dir", str(tmp_path / "before"))
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    rows = build_datasets(DataArguments(dataset=str(replies_file), template="chatml"), "sft", 0, tokenizer).train
    taught = teach_replies(tiny_llama_dir, rows, tmp_path / "taught", steps=80)
    scores = {}
    for batch in (1, 4):  # batch 4 left-pads prompts of different lengths
        out = tmp_path / f"after{batch}"
        scores[batch] = evaluate("--model_name_or_path", str(taught), *data, "--batch_size", str(batch),
                                 "--output_dir", str(out))["generation"]
        lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
        assert [(r["reference"], r["prediction"]) for r in lines] == [(a, a) for _, a in REPLIES]
        assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in lines)
    assert before["generation"]["exact_match"] == 0.0 and before["generation"]["rouge-l"] < 50
    for batch in (1, 4):
        assert scores[batch]["exact_match"] == 100.0 and scores[batch]["rouge-l"] == 100.0
        assert scores[batch]["rows"] == len(REPLIES)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {"csv": write_csv_benchmark(root / "evaluation"), "parquet": write_parquet_benchmark(root / "parquet")}


def choice(model: Path, task_dir: Path, out: Path, *extra: str) -> dict:
    return evaluate("--model_name_or_path", str(model), "--eval_task", "choice", "--task_dir", str(task_dir),
                    "--task", "tiny_test", "--n_shot", "1", "--batch_size", "4", "--output_dir", str(out),
                    *extra)["choice"]


def test_choice_accuracy_rises_from_chance_once_the_answers_are_taught(tmp_path, tiny_llama_dir, benchmarks):
    before = {layout: choice(tiny_llama_dir, root, tmp_path / f"before-{layout}") for layout, root in benchmarks.items()}
    taught = teach_choices(tiny_llama_dir, benchmarks["csv"] / "tiny", tmp_path / "taught", n_shot=1, steps=60)
    after = {layout: choice(taught, root, tmp_path / f"after-{layout}") for layout, root in benchmarks.items()}
    for layout in benchmarks:
        assert before[layout]["accuracy"] <= 50.0, before  # 12 questions, answers spread over A-D
        assert after[layout]["accuracy"] >= 90.0, after
        assert after[layout]["questions"] == 12
        assert set(after[layout]["subjects"]) == {"tiny_facts", "tiny_math"}
    # the CSV layout's mapping.json names the categories; the parquet layout has none (MMLU's or Other)
    assert set(after["csv"]["categories"]) == {"Other", "STEM"}
    assert set(after["parquet"]["categories"]) == {"Other"}
    out = tmp_path / "after-csv"
    assert (out / "choice_categories.png").stat().st_size > 0 and (out / "choice_subjects.png").is_file()
    assert len((out / "choice_predictions.jsonl").read_text().splitlines()) == 12


def test_choice_subjects_and_max_samples_select_questions(tmp_path, tiny_llama_dir, benchmarks):
    result = choice(tiny_llama_dir, benchmarks["csv"], tmp_path / "out", "--subjects", "tiny_math",
                    "--max_samples", "2", "--n_shot", "0")
    assert result["questions"] == 2 and list(result["subjects"]) == ["tiny_math"]


LOCAL_TASK = """task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_a_local_task_on_the_loaded_model(tmp_path, tiny_llama_dir):
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny.jsonl"
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_local.yaml").write_text(LOCAL_TASK.format(data=data))
    results = evaluate("--model_name_or_path", str(tiny_llama_dir), "--eval_task", "lm_eval:tiny_local",
                       "--lm_eval_include_path", str(tasks), "--max_samples", "4", "--output_dir", str(tmp_path / "o"))
    metrics = results["lm_eval"]["tiny_local"]
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["acc"] * 4 == round(metrics["acc"] * 4)  # 4 questions


def bad(capsys, *args: str) -> str:
    """Run a bad eval: exit code 2, no traceback, and the error on one line (returned)."""
    assert main(["eval", *args]) == 2
    stderr = capsys.readouterr().err  # progress bars of the work done before the error may precede it
    err = stderr.strip().splitlines()[-1]
    assert err.startswith("lmforge: error: ") and "Traceback" not in stderr, stderr
    return err


def test_bad_benchmarks_fail_in_one_line_naming_what_to_change(tmp_path, tiny_llama_dir, benchmarks, capsys):
    base = ["--model_name_or_path", str(tiny_llama_dir), "--eval_task", "choice", "--n_shot", "0",
            "--output_dir", str(tmp_path / "out")]
    assert "task_dir" in bad(capsys, *base, "--task_dir", str(tmp_path / "nowhere"), "--task", "tiny_test")
    err = bad(capsys, *base, "--task_dir", str(benchmarks["csv"]), "--task", "mmlu_test")
    assert "no folder" in err and "tiny" in err
    err = bad(capsys, *base, "--task_dir", str(benchmarks["csv"]), "--task", "tiny_test", "--subjects", "tiny_art")
    assert "unknown subject(s) tiny_art" in err and "tiny_facts, tiny_math" in err
    broken = tmp_path / "broken" / "ceval" / "val"
    broken.mkdir(parents=True)
    (broken / "law_val.csv").write_text("id,question,A,B,C,D\n0,Which?,a,b,c,d\n")
    err = bad(capsys, *base, "--task_dir", str(tmp_path / "broken"), "--task", "ceval_validation")
    assert f"{broken / 'law_val.csv'}: missing column 'answer'" in err
    (broken / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,Which?,a,b,c,d,E\n")
    assert "law_val.csv:2: answer 'E'" in bad(capsys, *base, "--task_dir", str(tmp_path / "broken"), "--task",
                                               "ceval_validation")
    err = bad(capsys, *base[:-3], "--n_shot", "1", "--task_dir", str(tmp_path / "broken"), "--task", "ceval_val",
              "--output_dir", str(tmp_path / "out"))
    assert "no dev split" in err and "n_shot: 0" in err
    assert not (tmp_path / "out").exists()  # nothing written before the benchmark is known to be readable


def test_generation_without_references_and_bad_options_fail_in_one_line(tmp_path, tiny_llama_dir, capsys):
    rows = tmp_path / "no_reply.json"
    rows.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye", "output": ""}]))
    base = ["--model_name_or_path", str(tiny_llama_dir), "--output_dir", str(tmp_path / "out")]
    err = bad(capsys, *base, "--dataset", str(rows), "--eval_task", "generation")
    assert err.startswith("lmforge: error: generation needs a reference reply in every row") and "no_reply.json" in err
    no_column = tmp_path / "prompts.json"
    no_column.write_text(json.dumps([{"instruction": "Hi"}]))
    err = bad(capsys, *base, "--dataset", str(no_column), "--eval_task", "generation")
    assert "reference reply" in err and "'output'" in err
    assert "did you mean 'perplexity'" in bad(capsys, *base, "--eval_task", "perplexty")
    assert "eval needs output_dir" in bad(capsys, "--eval_task", "perplexity")
    assert "n_shot must be 0 to 5" in bad(capsys, *base, "--eval_task", "choice", "--n_shot", "6")


def test_earlier_results_are_never_overwritten_silently(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text("mine")
    args = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--dataset_dir", DATA,
            "--max_samples", "2", "--eval_task", "perplexity", "--output_dir", str(out)]
    assert "overwrite_output_dir: true" in bad(capsys, *args)
    assert (out / "eval_results.json").read_text() == "mine"
    assert main(["eval", *args, "--overwrite_output_dir", "true"]) == 0
    assert json.loads((out / "eval_results.json").read_text())["perplexity"]["rows"] == 2


def test_the_eval_example_runs_on_a_tiny_model(tmp_path, tiny_llama_dir, monkeypatch):
    """examples/eval.yaml: perplexity, generation and choice on the repo's demo data and bundled benchmark."""
    monkeypatch.chdir(ROOT)
    results = evaluate("examples/eval.yaml", "--model_name_or_path", str(tiny_llama_dir), "--max_samples", "2",
                       "--max_new_tokens", "4", "--output_dir", str(tmp_path / "out"))
    assert set(results) >= {"perplexity", "generation", "choice"}
    assert results["choice"]["questions"] > 0 and results["generation"]["rows"] == 2

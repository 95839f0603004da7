"""Hand-made benchmark files for the eval tests: one question set written in MMLU's published layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# (subject, question, choices, answer letter): the right answers cover every letter
QUESTIONS = [
    ("tiny_facts", "Which colour is the sky on a clear day?", ("green", "blue", "red", "black"), "B"),
    ("tiny_facts", "How many legs does a spider have?", ("eight", "six", "four", "ten"), "A"),
    ("tiny_facts", "What do bees make?", ("milk", "silk", "honey", "wool"), "C"),
    ("tiny_facts", "Which planet do we live on?", ("Mars", "Venus", "Jupiter", "Earth"), "D"),
    ("tiny_facts", "What freezes into ice?", ("sand", "water", "salt", "glass"), "B"),
    ("tiny_facts", "Which animal barks?", ("cat", "cow", "dog", "fish"), "C"),
    ("tiny_math", "What is 2 + 2?", ("4", "5", "3", "22"), "A"),
    ("tiny_math", "What is 10 - 7?", ("7", "2", "17", "3"), "D"),
    ("tiny_math", "What is 3 x 3?", ("6", "9", "33", "12"), "B"),
    ("tiny_math", "What is half of 8?", ("16", "2", "4", "6"), "C"),
    ("tiny_math", "What is 5 + 6?", ("11", "56", "1", "30"), "A"),
    ("tiny_math", "What is 9 - 9?", ("18", "9", "1", "0"), "D"),
]
DEV = {
    "tiny_facts": [("What is the opposite of hot?", ("cold", "warm", "red", "fast"), "A")],
    "tiny_math": [("What is 1 + 1?", ("11", "2", "0", "3"), "B")],
}
MAPPING = {"tiny_facts": {"name": "tiny facts", "category": "Other"},
           "tiny_math": {"name": "tiny math", "category": "STEM"}}


def write_csv_benchmark(task_dir: Path, name: str = "tiny") -> Path:
    """LLaMA-Factory's evaluation/<task> layout: data/{dev,test}/<subject>_<split>.csv (no header, as MMLU's
    files) and mapping.json. Returns task_dir."""
    root = task_dir / name
    for split, rows in (("test", [(s, q, c, a) for s, q, c, a in QUESTIONS]),
                        ("dev", [(s, q, c, a) for s, items in DEV.items() for q, c, a in items])):
        folder = root / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        for subject in MAPPING:
            with (folder / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([q, *c, a] for s, q, c, a in rows if s == subject)
    (root / "mapping.json").write_text(json.dumps(MAPPING))
    return task_dir


def write_parquet_benchmark(task_dir: Path, name: str = "tiny") -> Path:
    """cais/mmlu's layout: <subject>/{test,dev}-00000-of-00001.parquet with question, choices, answer (index).
    No mapping.json: names come from the folder names. Returns task_dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for subject in MAPPING:
        folder = task_dir / name / subject
        folder.mkdir(parents=True, exist_ok=True)
        splits = {"test": [(q, c, a) for s, q, c, a in QUESTIONS if s == subject], "dev": DEV[subject]}
        for split, rows in splits.items():
            table = pa.table({"question": [q for q, _, _ in rows], "subject": [subject] * len(rows),
                              "choices": [list(c) for _, c, _ in rows], "answer": ["ABCD".index(a) for *_, a in rows]})
            pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    return task_dir


def write_choice_training_rows(benchmark: Path, out: Path, n_shot: int) -> Path:
    """The benchmark's test prompts with their right answers as sft rows (openai messages), to teach a tiny model."""
    from lmforge.eval.benchmarks import list_subjects, read_questions
    from lmforge.eval.choice import build_messages

    with out.open("w", encoding="utf-8") as f:
        for subject in list_subjects(benchmark, "test", None, n_shot):
            shots = read_questions(subject.files["dev"])[:n_shot]
            for q in read_questions(subject.files["test"]):
                messages = build_messages(q, shots, subject.name, "en")
                messages.append({"role": "assistant", "content": "ABCD"[q.answer]})
                f.write(json.dumps({"messages": messages}) + "\n")
    return out


def teach_choices(model_dir: Path, benchmark: Path, out: Path, n_shot: int, steps: int = 30, lr: float = 1e-2) -> Path:
    """Train a model directly on the answer letters of the benchmark's test prompts (the logit that choice
    scoring reads), full batch with AdamW, and save it to `out`."""
    import torch
    import torch.nn.functional as F

    from lmforge.config import ModelArguments
    from lmforge.data.templates import get_template
    from lmforge.eval.benchmarks import list_subjects, read_questions
    from lmforge.eval.choice import ChoiceScorer, letter_token_ids
    from lmforge.model.adapters import load_merged

    tokenizer, model = load_merged(ModelArguments(model_name_or_path=str(model_dir)))
    scorer = ChoiceScorer(model, tokenizer, get_template("auto", tokenizer))
    prompts, targets = [], []
    for subject in list_subjects(benchmark, "test", None, n_shot):
        shots = read_questions(subject.files["dev"])[:n_shot]
        for q in read_questions(subject.files["test"]):
            prompts.append(scorer.prompt(q, shots, subject.name))
            targets.append(letter_token_ids(tokenizer, prompts[-1], len(q.choices))[q.answer])
    batch, targets = scorer.inputs(prompts), torch.tensor(targets)
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        logits = model(**batch, logits_to_keep=1).logits[:, -1]  # (B, V)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def teach_replies(model_dir: Path, rows: object, out: Path, steps: int = 40, lr: float = 1e-2) -> Path:
    """Train a model directly on tokenized sft rows (input_ids, labels from the training pipeline) until it
    can repeat their replies, and save it to `out`."""
    import torch

    from lmforge.config import ModelArguments
    from lmforge.eval.perplexity import padded_batches
    from lmforge.model.adapters import load_merged

    tokenizer, model = load_merged(ModelArguments(model_name_or_path=str(model_dir)))
    batch = next(padded_batches(rows, len(rows), tokenizer.pad_token_id))
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

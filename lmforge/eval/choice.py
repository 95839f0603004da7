"""Multiple choice: few-shot prompts in LLaMA-Factory's eval format, scored by the answer letters' logits.

Each question becomes a conversation: the first n_shot questions of the subject's dev split with their
answers as earlier turns, then the question itself, rendered by the chat `template` with its generation
prompt. The prediction is the letter (A, B, ...) whose token has the largest logit at the last position,
as LLaMA-Factory's evaluator and lm-eval-harness's MMLU score it; the letter is read as the model would
write it next (" A" after text such as "Answer:", "A" after a newline or an assistant header).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.eval.benchmarks import LETTERS, Question, Subject, read_questions
from lmforge.eval.generation import left_pad
from lmforge.eval.progress import progress_bar

# LLaMA-Factory's eval templates (src/llamafactory/eval/template.py): system line, choice line, answer cue
PROMPTS = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "\n{letter}. {text}",
           "\nAnswer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n{letter}. {text}", "\n答案："),
}


def format_question(question: Question, lang: str) -> str:
    """The question, its lettered choices and the answer cue."""
    _, choice, cue = PROMPTS[lang]
    lines = [choice.format(letter=LETTERS[i], text=text) for i, text in enumerate(question.choices)]
    return question.question + "".join(lines) + cue


def build_messages(question: Question, shots: list[Question], subject_name: str, lang: str) -> list[dict[str, str]]:
    """Shots as answered user/assistant turns, then the question; the subject line opens the first turn."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": format_question(shot, lang)},
                     {"role": "assistant", "content": LETTERS[shot.answer]}]
    messages.append({"role": "user", "content": format_question(question, lang)})
    messages[0] = {"role": "user", "content": PROMPTS[lang][0].format(subject=subject_name) + messages[0]["content"]}
    return messages


def letter_token_ids(tokenizer: Any, prompt: str, n_choices: int) -> list[int]:
    """The token id of each answer letter as it would follow this prompt (" A" after text, "A" after space)."""
    space = "" if not prompt or prompt[-1].isspace() else " "
    ids = [tokenizer(space + letter, add_special_tokens=False)["input_ids"][-1] for letter in LETTERS[:n_choices]]
    if len(set(ids)) != len(ids):
        raise LmforgeError("the tokenizer does not give each answer letter its own token; choice scoring needs it")
    return ids


@dataclass
class ChoiceScorer:
    """Scores prompts by the logits of the answer letters at their last position."""

    model: Any
    tokenizer: Any
    template: Any
    lang: str = "en"

    def prompt(self, question: Question, shots: list[Question], subject_name: str) -> str:
        """The rendered prompt text, ending with the template's generation prompt."""
        return self.template.render_prompt("", build_messages(question, shots, subject_name, self.lang))

    def inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded (B, T) input_ids, attention_mask and position_ids counted from each prompt's start."""
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = left_pad(encoded, pad)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    @torch.inference_mode()
    def last_logits(self, prompts: list[str]) -> torch.Tensor:
        """(B, V) logits at each prompt's last token."""
        kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        return self.model(**self.inputs(prompts), **kwargs).logits[:, -1].float()  # (B, V)

    def predict(self, questions: list[Question], shots: list[Question], subject_name: str) -> list[int]:
        """The index of the chosen answer for each question (one batch)."""
        prompts = [self.prompt(q, shots, subject_name) for q in questions]
        logits = self.last_logits(prompts)
        picks = []
        for row, prompt, question in zip(logits, prompts, questions):
            letters = letter_token_ids(self.tokenizer, prompt, len(question.choices))
            picks.append(int(row[letters].argmax()))
        return picks


def evaluate_subject(scorer: ChoiceScorer, subject: Subject, split: str, n_shot: int, batch_size: int,
                     limit: int | None, bar: Any) -> list[dict[str, Any]]:
    """One record per question: subject, index, answer and prediction (indices into its choices)."""
    questions = read_questions(subject.files[split])[:limit]
    shots = read_questions(subject.files["dev"])[:n_shot] if n_shot else []
    if len(shots) < n_shot:
        raise LmforgeError(f"{subject.files['dev']}: {len(shots)} dev question(s), fewer than n_shot {n_shot}: "
                           f"set n_shot: {len(shots)}")
    records = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        for i, (q, pick) in enumerate(zip(batch, scorer.predict(batch, shots, subject.name)), start=start):
            records.append({"subject": subject.key, "index": i, "answer": LETTERS[q.answer],
                            "prediction": LETTERS[pick]})
        bar.update(len(batch))
    return records


def accuracy(records: list[dict[str, Any]]) -> float:
    """Share of records whose prediction is the answer, x100."""
    return round(100.0 * sum(r["answer"] == r["prediction"] for r in records) / max(len(records), 1), 4)


def summarize(records: list[dict[str, Any]], subjects: list[Subject]) -> dict[str, Any]:
    """Accuracy overall, per category and per subject (each a mean over questions)."""
    by_subject = {s.key: [r for r in records if r["subject"] == s.key] for s in subjects}
    categories: dict[str, list[dict[str, Any]]] = {}
    for s in subjects:
        categories.setdefault(s.category, []).extend(by_subject[s.key])
    return {"accuracy": accuracy(records), "questions": len(records),
            "categories": {c: accuracy(rs) for c, rs in sorted(categories.items())},
            "subjects": {s.key: {"accuracy": accuracy(by_subject[s.key]), "questions": len(by_subject[s.key]),
                                 "category": s.category} for s in subjects}}


def plot_accuracy(summary: dict[str, Any], output_dir: Path, title: str) -> list[Path]:
    """choice_categories.png (a bar per category and the overall mean) and choice_subjects.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = {"choice_categories.png": {**summary["categories"], "Average": summary["accuracy"]},
              "choice_subjects.png": {k: v["accuracy"] for k, v in summary["subjects"].items()}}
    written = []
    for name, values in charts.items():
        fig, ax = plt.subplots(figsize=(7, 1.5 + 0.35 * len(values)))
        ax.barh(list(values), list(values.values()), color="#1f77b4")
        ax.set_xlim(0, 100)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy (%)")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        written.append(output_dir / name)
    return written


def evaluate_choice(scorer: ChoiceScorer, subjects: list[Subject], split: str, n_shot: int, batch_size: int,
                    limit: int | None, output_dir: Path, title: str) -> dict[str, Any]:
    """Every subject scored; writes choice_predictions.jsonl and the charts; returns the summary."""
    total = sum(len(read_questions(s.files[split])[:limit]) for s in subjects)
    records: list[dict[str, Any]] = []
    with progress_bar(total, "choice") as bar:
        for subject in subjects:
            records += evaluate_subject(scorer, subject, split, n_shot, batch_size, limit, bar)
    with (output_dir / "choice_predictions.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    summary = summarize(records, subjects)
    plot_accuracy(summary, output_dir, title)
    return summary

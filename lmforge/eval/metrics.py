"""Text similarity of generated replies to their references: exact match, BLEU-4, ROUGE-1/2/L.

BLEU-4 is sacrebleu's corpus BLEU (tokenizer `13a`, or `zh` when the references hold Chinese, which
splits Chinese into characters as LLaMA-Factory's character-level BLEU does). ROUGE is rouge-score's
F-measure averaged over rows; text holding Chinese is cut into words with jieba first (as
LLaMA-Factory does), other text uses rouge-score's own tokenizer. All scores are in [0, 100].
"""

from __future__ import annotations

import re
from typing import Any

from lmforge.errors import LmforgeError

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
EXTRA_HINT = "pip install 'lmforge[eval]'"


def has_cjk(text: str) -> bool:
    """Whether the text holds Chinese characters (then words come from jieba)."""
    return bool(CJK.search(text))


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LmforgeError(f"generation scoring needs {module.split('.')[0]}: {EXTRA_HINT}") from None


class WordTokenizer:
    """rouge-score's tokenizer interface: jieba words for Chinese text, rouge-score's own otherwise."""

    def __init__(self) -> None:
        self.default = _require("rouge_score.tokenizers").DefaultTokenizer(use_stemmer=False)

    def tokenize(self, text: str) -> list[str]:
        if not has_cjk(text):
            return self.default.tokenize(text)
        jieba = _require("jieba")
        return [w.lower() for w in jieba.lcut(text) if w.strip() and not re.fullmatch(r"\W+", w)]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of rows whose prediction equals the reference after stripping outer whitespace, x100."""
    if not references:
        return 0.0
    return 100.0 * sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def bleu4(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU-4 with its default settings (the score papers report)."""
    sacrebleu = _require("sacrebleu")
    tokenize = "zh" if any(has_cjk(r) for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure over rows, x100."""
    scorer = _require("rouge_score.rouge_scorer").RougeScorer(list(ROUGE_KEYS), tokenizer=WordTokenizer())
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    n = max(len(references), 1)
    return {key.replace("rouge", "rouge-").lower(): 100.0 * total / n for key, total in totals.items()}


def score_generations(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every text metric of the generation task, rounded to 4 decimals."""
    scores = {"exact_match": exact_match(predictions, references), "bleu-4": bleu4(predictions, references),
              **rouge(predictions, references)}
    return {k: round(v, 4) for k, v in scores.items()}

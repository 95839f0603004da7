"""Multiple-choice benchmarks read from local files, in the layouts they are published in.

- LLaMA-Factory's `evaluation/<task>` CSV layout (MMLU, C-Eval, CMMLU):
  `<task>/[data/]<split>/<subject>[_<split>].csv` with a header naming question, A, B, C, D, answer (C-Eval
  and CMMLU; other columns are ignored) or no header (MMLU: question, A..D, answer), and an optional
  `<task>/mapping.json` of subject -> {name, category}. Split folders: test, val or validation, dev or train.
- The `cais/mmlu` parquet layout: one folder per subject holding `<split>-*.parquet` (test, validation, dev)
  with columns question, choices (a list) and answer (the index of the right choice).

Without mapping.json, MMLU's own subjects get MMLU's categories (lmforge/data/mmlu_categories.json); other
subjects are in category "Other".
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmforge.errors import LmforgeError

SPLITS = {"test": ("test",), "validation": ("validation", "val"), "dev": ("dev", "train")}
SPLIT_ALIASES = {"val": "validation", "train": "dev"}
LETTERS = "ABCDEFGHIJ"
AGGREGATE_FOLDERS = ("all", "auxiliary_train")  # cais/mmlu's folders that repeat or extend the subjects
CATEGORIES_PATH = Path(__file__).resolve().parents[1] / "data" / "mmlu_categories.json"


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the right answer is choices[answer]."""

    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Subject:
    """One subject of a benchmark: its readable name, category and the files of each split."""

    key: str
    name: str
    category: str
    files: dict[str, Path]


def parse_task(task: str) -> tuple[str, str]:
    """`mmlu_test` -> ("mmlu", "test"); a name without a split suffix means its test split."""
    name, _, suffix = task.rpartition("_")
    suffix = SPLIT_ALIASES.get(suffix, suffix)
    if name and suffix in SPLITS:
        return name, suffix
    return task, "test"


def find_benchmark(task_dir: str, task: str | None) -> tuple[Path, str]:
    """(benchmark folder, split) from task_dir and task, or a one-line error saying what to change."""
    root = Path(task_dir)
    if not root.is_dir():
        raise LmforgeError(f"task_dir {root} is not a folder: point task_dir at the folder holding the benchmark")
    name, split = parse_task(task) if task else ("", "test")
    folder = root / name if name else root
    if not folder.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise LmforgeError(f"task '{task}': no folder {folder}; task_dir {root} holds: {', '.join(known) or 'nothing'}")
    return folder, split


def _split_file(folder: Path, subject: str, split: str) -> Path | None:
    """The file of one subject's split in either layout, or None."""
    for base in (folder, folder / "data"):
        for dirname in SPLITS[split]:
            for name in (f"{subject}_{dirname}.csv", f"{subject}.csv"):
                if (base / dirname / name).is_file():
                    return base / dirname / name
    found = sorted((folder / subject).glob(f"{SPLITS[split][0]}-*.parquet"))
    return found[0] if found else None


def _subject_keys(folder: Path, split: str) -> list[str]:
    """Every subject that has a file for the split, in either layout."""
    keys = set()
    for base in (folder, folder / "data"):
        for dirname in SPLITS[split]:
            for path in (base / dirname).glob("*.csv"):
                keys.add(path.stem.removesuffix(f"_{dirname}"))
    keys |= {p.name for p in folder.iterdir() if p.is_dir() and p.name not in AGGREGATE_FOLDERS
             and any(p.glob(f"{SPLITS[split][0]}-*.parquet"))}
    return sorted(keys)


@lru_cache(maxsize=1)
def mmlu_categories() -> dict[str, str]:
    """MMLU's 57 subjects and their categories (STEM, Humanities, Social Sciences, Other)."""
    return json.loads(CATEGORIES_PATH.read_text(encoding="utf-8"))


def read_mapping(folder: Path) -> dict[str, dict[str, str]]:
    """mapping.json (subject -> {name, category}) when the benchmark has one, else {}."""
    path = folder / "mapping.json"
    if not path.is_file():
        return {}
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LmforgeError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise LmforgeError(f"{path}: expected {{subject: {{name, category}}}}")
    return mapping


def list_subjects(folder: Path, split: str, wanted: list[str] | None, n_shot: int) -> list[Subject]:
    """The subjects to evaluate with their split files (and dev files when n_shot > 0)."""
    available = _subject_keys(folder, split)
    if not available:
        raise LmforgeError(f"{folder}: no {split} files found: expected {split}/<subject>_{split}.csv (CSV layout) "
                           f"or <subject>/{split}-*.parquet (parquet layout)")
    unknown = [s for s in wanted or [] if s not in available]
    if unknown:
        raise LmforgeError(f"unknown subject(s) {', '.join(unknown)} in {folder} ({split} split); available: "
                           f"{', '.join(available)}")
    mapping = read_mapping(folder)
    subjects = []
    for key in wanted or available:
        files = {split: _split_file(folder, key, split)}
        if n_shot:
            files["dev"] = _split_file(folder, key, "dev")
            if files["dev"] is None:
                raise LmforgeError(f"{folder}: subject {key} has no dev split to take {n_shot} shot(s) from: "
                                   "add its dev file or set n_shot: 0")
        entry = mapping.get(key, {})
        subjects.append(Subject(key, entry.get("name", key.replace("_", " ")),
                                entry.get("category", mmlu_categories().get(key, "Other")), files))
    return subjects


def _answer_index(value: object, n_choices: int, where: str) -> int:
    """A letter (A, B, ...) or an index as the position of the right choice."""
    text = str(value).strip()
    if text.isdigit() and int(text) < n_choices:
        return int(text)
    if len(text) == 1 and text.upper() in LETTERS[:n_choices]:
        return LETTERS.index(text.upper())
    raise LmforgeError(f"{where}: answer {text!r} is not one of {', '.join(LETTERS[:n_choices])} "
                       f"(or 0-{n_choices - 1})")


def _header_columns(header: list[str], path: Path) -> tuple[int, list[int], int]:
    """(question column, choice columns, answer column) of a CSV header, or an error naming the missing one."""
    lower = [h.strip().lower() for h in header]
    for needed in ("question", "answer"):
        if needed not in lower:
            raise LmforgeError(f"{path}: missing column '{needed}' (the header has {', '.join(header)})")
    choices = []
    for letter in LETTERS:
        if letter.lower() not in lower:
            break
        choices.append(lower.index(letter.lower()))
    if len(choices) < 2:
        raise LmforgeError(f"{path}: missing column '{LETTERS[len(choices)]}' (choice columns A, B, ... expected; "
                           f"the header has {', '.join(header)})")
    return lower.index("question"), choices, lower.index("answer")


def read_csv(path: Path) -> list[Question]:
    """Questions of one CSV file: with a header (C-Eval, CMMLU) or without (MMLU: question, A..D, answer)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise LmforgeError(f"{path}: the file is empty")
    lower = {cell.strip().lower() for cell in rows[0]}
    if "question" in lower or "answer" in lower:
        q, choices, a = _header_columns(rows[0], path)
        body, first_line = rows[1:], 2
    else:
        if len(rows[0]) < 4:
            raise LmforgeError(f"{path}: line 1 has {len(rows[0])} columns; a file without header needs question, "
                               "A, B, ..., answer")
        q, choices, a = 0, list(range(1, len(rows[0]) - 1)), len(rows[0]) - 1
        body, first_line = rows, 1
    out = []
    for line, row in enumerate(body, start=first_line):
        if len(row) <= max(q, a, *choices):
            raise LmforgeError(f"{path}:{line}: {len(row)} columns, expected at least {max(q, a, *choices) + 1}")
        out.append(Question(row[q], tuple(row[c] for c in choices), _answer_index(row[a], len(choices),
                                                                                   f"{path}:{line}")))
    return out


def read_parquet(path: Path) -> list[Question]:
    """Questions of one cais/mmlu parquet file (question, choices, answer index)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for needed in ("question", "choices", "answer"):
        if needed not in table.column_names:
            raise LmforgeError(f"{path}: missing column '{needed}' (the file has {', '.join(table.column_names)})")
    out = []
    for i, row in enumerate(table.select(["question", "choices", "answer"]).to_pylist()):
        choices = tuple(str(c) for c in row["choices"] or ())
        if len(choices) < 2:
            raise LmforgeError(f"{path}: row {i}: 'choices' needs at least two entries")
        out.append(Question(str(row["question"]), choices, _answer_index(row["answer"], len(choices),
                                                                         f"{path}: row {i}")))
    return out


def read_questions(path: Path) -> list[Question]:
    """The questions of one split file of either layout."""
    questions = read_parquet(path) if path.suffix == ".parquet" else read_csv(path)
    if not questions:
        raise LmforgeError(f"{path}: no questions")
    return questions

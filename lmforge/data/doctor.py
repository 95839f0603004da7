"""`lmforge data check`: what the data really is, with the same loading and rendering code as training."""

from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import DataArguments
from lmforge.data.pipeline import LoadReport, load_conversations
from lmforge.data.processors import IGNORE_INDEX, MaskPolicy, Status, encode_sft_batch
from lmforge.data.templates import Renderer, template_for, template_mismatch
from lmforge.errors import LmforgeError
from lmforge.stages import STAGES

GREEN, MAGENTA, RESET = "\033[1;32m", "\033[1;35m", "\033[0m"


@dataclass
class DataReport:
    """What `lmforge doctor` found in a dataset: row counts, invalid rows, duplicates, lengths, truncation."""
    rows: dict[str, int] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)
    duplicates: int = 0
    lengths: dict[str, float] = field(default_factory=dict)
    truncated: int = 0
    dropped: int = 0
    loss_share: float = 0.0
    template_warning: str | None = None
    examples: list[str] = field(default_factory=list)
    histogram: str | None = None

    def lines(self) -> list[str]:
        out = [f"rows per dataset: {self.rows}", f"rows kept: {sum(self.rows.values()) - len(self.invalid)}",
               f"rows invalid: {len(self.invalid)}", *[f"  {r}" for r in self.invalid[:20]],
               f"duplicates: {self.duplicates}",
               "tokens per example: " + ", ".join(f"{k} {v:g}" for k, v in self.lengths.items()),
               f"cutoff_len truncates {self.truncated} and drops {self.dropped} examples",
               f"share of tokens that carry loss: {self.loss_share:.1%}"]
        if self.template_warning:
            out.append(f"WARNING: {self.template_warning}")
        if self.histogram:
            out.append(f"length histogram: {self.histogram}")
        return out


def trained_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """The example's text cut where the loss starts or stops: (trained, text) pieces in order."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in runs]


def highlight(tokenizer: Any, ids: list[int], labels: list[int], color: bool,
              thought_words: tuple[str, str] | None = None) -> str:
    """The example's text with every trained token marked: green in a terminal, [[...]] otherwise. With a
    reasoning template the thoughts are marked apart: magenta, or {{think: ...}} (inside [[ ]] when trained)."""
    parts = []
    for trained, text in trained_runs(tokenizer, ids, labels):
        for is_thought, piece in _thought_pieces(text, thought_words):
            if is_thought:
                piece = f"{MAGENTA}{piece}{RESET}" if color else "{{think: " + piece + "}}"
            parts.append((f"{GREEN}{piece}{RESET}" if color and not is_thought else f"[[{piece}]]" if not color
                          else piece) if trained else piece)
    return "".join(parts)


def _thought_pieces(text: str, words: tuple[str, str] | None) -> list[tuple[bool, str]]:
    """The text cut into (is thought, piece): a thought runs from the first to the second thought word."""
    if not words:
        return [(False, text)]
    first, last = words[0].strip(), words[1].strip()
    pattern = re.compile(f"({re.escape(first)}.*?{re.escape(last)})", re.DOTALL)
    return [(bool(i % 2), piece) for i, piece in enumerate(pattern.split(text)) if piece]


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if not len(lengths):
        return {}
    return {"min": int(lengths.min()), "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}


def save_histogram(lengths: np.ndarray, cutoff: int, path: Path) -> Path:
    """Plot the token-length histogram with the cutoff_len line, to show how much truncation cuts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths.tolist())))), color="#1f77b4")
    ax.axvline(cutoff, color="#d62728", linestyle="--", label=f"cutoff_len {cutoff}")
    ax.set_xlabel("tokens per example (rendered, before cutoff)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _encode(ds: Any, tokenizer: Any, template: Renderer, policy: MaskPolicy) -> dict[str, list[Any]]:
    batch = {"_system": ds["_system"], "_messages": ds["_messages"]}
    if "_tools" in ds.column_names:
        batch["_tools"] = ds["_tools"]
    return encode_sft_batch(batch, tokenizer, template, policy)


def check_sft(args: DataArguments, tokenizer: Any, original_template: str | None, seed: int, show: int,
              report_dir: Path, color: bool) -> DataReport:
    """Check an SFT dataset: invalid and duplicate rows, token lengths, truncation and the share of loss tokens."""
    checked = copy.copy(args)
    checked.skip_invalid_examples = True  # report every invalid row instead of stopping at the first
    load = LoadReport()
    ds = load_conversations(args.dataset, checked, "sft", seed, args.preprocessing_num_workers, load)
    report = DataReport(rows=load.rows, invalid=load.invalid)
    keys = [json.dumps([s, m], sort_keys=True) for s, m in zip(ds["_system"], ds["_messages"])]
    report.duplicates = len(keys) - len(set(keys))
    template = template_for(args, tokenizer)
    report.template_warning = _template_warning(template, tokenizer, original_template, ds)
    policy = MaskPolicy(args.cutoff_len, args.train_on_prompt, args.mask_history)
    full = _encode(ds, tokenizer, template, MaskPolicy(None, args.train_on_prompt, args.mask_history))
    cut = _encode(ds, tokenizer, template, policy)
    lengths = np.array([len(x) for x in full["input_ids"]])
    report.lengths = _length_stats(lengths)
    report.truncated = sum(1 for s in cut["_status"] if s == Status.TRUNCATED)
    report.dropped = sum(1 for s in cut["_status"] if s == Status.DROPPED)
    tokens = sum(len(x) for x in cut["input_ids"])
    report.loss_share = sum(cut["_loss_tokens"]) / tokens if tokens else 0.0
    if len(lengths):
        report.histogram = str(save_histogram(lengths, args.cutoff_len, report_dir / "length_histogram.png"))
    kept = [i for i, s in enumerate(cut["_status"]) if s != Status.DROPPED][:show]
    spec = getattr(template, "spec", None)
    thoughts = spec.thought_words if spec is not None and spec.reasoning else None
    report.examples = [highlight(tokenizer, cut["input_ids"][i], cut["labels"][i], color, thoughts) for i in kept]
    return report


def _template_warning(template: Renderer, tokenizer: Any, original: str | None, ds: Any) -> str | None:
    sample = [(s, m) for s, m in zip(ds["_system"][:20], ds["_messages"][:20])]
    mismatch = template_mismatch(template, tokenizer, original, sample)
    if mismatch:
        return f"template {template.name} renders differently from the tokenizer's own chat template {mismatch}"
    return None


def check_pt(args: DataArguments, tokenizer: Any, seed: int, report_dir: Path) -> DataReport:
    """Check a pre-training dataset: invalid and duplicate rows and token lengths."""
    load = LoadReport()
    ds = load_conversations(args.dataset, args, "pt", seed, args.preprocessing_num_workers, load)
    texts = [t for t in ds["_text"]]
    report = DataReport(rows=load.rows, invalid=load.invalid)
    report.duplicates = len(texts) - len(set(texts))
    special = int(tokenizer.bos_token_id is not None) + int(tokenizer.eos_token_id is not None)
    lengths = np.array([len(x) + special for x in tokenizer([t for t in texts if t], add_special_tokens=False)["input_ids"]])
    report.lengths = _length_stats(lengths)
    report.truncated = int((lengths > args.cutoff_len).sum()) if args.packing else 0
    report.loss_share = 1.0
    if len(lengths):
        report.histogram = str(save_histogram(lengths, args.cutoff_len, report_dir / "length_histogram.png"))
    return report


def run_data_check(config: Any, doctor: Any, tokenizer: Any, original_template: str | None) -> DataReport:
    """Print the report and write report.json (and the histogram) to the report folder."""
    out = Path(doctor.report_dir or (Path(config.training.output_dir) / "data_check"
                                     if "output_dir" in config.explicit else "data_check"))
    color = sys.stdout.isatty()
    if not config.finetuning.spec.doctor:
        covered = " and ".join(s.name for s in STAGES.values() if s.doctor)
        raise LmforgeError(f"data check covers stage {covered}; for {config.finetuning.stage} data run `lmforge "
                           "preprocess` with the same config: it validates every row (file:line errors) and reports "
                           "rows, drops by cutoff_len and tokens")
    if config.finetuning.spec.template:
        report = check_sft(config.data, tokenizer, original_template, config.training.seed, doctor.show_examples,
                           out, color)
    else:
        report = check_pt(config.data, tokenizer, config.training.seed, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({k: v for k, v in report.__dict__.items() if k != "examples"},
                                                indent=2, ensure_ascii=False))
    print("\n".join(report.lines()))
    for i, example in enumerate(report.examples, start=1):
        marker = "green" if color else "[[...]]"
        print(f"\n--- example {i} (trained tokens in {marker}) ---\n{example}")
    print(f"\nreport: {out / 'report.json'}")
    return report

"""The `lmforge eval` recipe: load the model once, run each eval_task, write eval_results.json, print a summary.

Model loading (base, adapters, .gguf, alias) and chat templates are chat's; the rows of perplexity and
generation come from the training data pipeline, so `dataset`, `eval_dataset`, `val_size`, `template` and
`cutoff_len` mean what they mean in `lmforge train`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmforge import __version__
from lmforge.atomic import write_text_atomically
from lmforge.config.args import DataArguments, EvalArguments, ModelArguments
from lmforge.errors import LmforgeError
from lmforge.eval.benchmarks import Subject

logger = logging.getLogger(__name__)
RESULTS = "eval_results.json"
WRITTEN = (RESULTS, "generated_predictions.jsonl", "choice_predictions.jsonl", "choice_categories.png",
           "choice_subjects.png")


def parse_eval_config(argv: list[str]) -> tuple[ModelArguments, DataArguments, EvalArguments]:
    """The option groups of `lmforge eval` from YAML and command line (LLaMA-Factory's save_dir = output_dir)."""
    from lmforge.config.parser import EVAL_GROUPS, build_groups, merge_sources

    _, raw = merge_sources(argv)
    if "save_dir" in raw:
        raw.setdefault("output_dir", raw.pop("save_dir"))
    model_args, data_args, eval_args = build_groups(raw, EVAL_GROUPS)
    return model_args, data_args, eval_args


@dataclass(frozen=True)
class Benchmark:
    """A multiple-choice benchmark found on disk: its folder, the split evaluated and the subjects."""

    folder: Path
    split: str
    subjects: list[Subject]


@dataclass
class EvalRun:
    """What every eval task reads: the loaded model and tokenizer, the options and the output folder."""

    model: Any
    tokenizer: Any
    data: DataArguments
    args: EvalArguments
    output_dir: Path
    benchmark: Benchmark | None = None
    _rows: dict[str, Any] = field(default_factory=dict)

    def rows(self, stage: str) -> Any:
        """The tokenized eval rows: eval_dataset, else the val_size split of dataset, else all of dataset."""
        if stage not in self._rows:
            from lmforge.data.pipeline import build_datasets

            data = self.data
            if data.packing or data.streaming:
                raise LmforgeError("eval reads whole unpacked rows: set packing: false and streaming: false")
            if data.eval_dataset:
                data = dataclasses.replace(data, dataset=data.eval_dataset, eval_dataset=None, val_size=0.0)
            prepared = build_datasets(data, stage, self.args.seed, self.tokenizer)
            self._rows[stage] = prepared.eval if prepared.eval is not None else prepared.train
        return self._rows[stage]


def check_output_dir(args: EvalArguments) -> Path:
    """The output folder, created; refuses to replace an earlier eval's files unless overwrite_output_dir."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"output_dir {out} is a file: choose a folder")
    existing = [name for name in WRITTEN if (out / name).exists()]
    if existing and not args.overwrite_output_dir:
        raise LmforgeError(f"output_dir {out} already holds {existing[0]}: choose another output_dir or set "
                           "overwrite_output_dir: true")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_perplexity(run: EvalRun) -> dict[str, Any]:
    """The loss on the rows' trained tokens (see lmforge.eval.perplexity for the two definitions)."""
    from lmforge.eval.perplexity import evaluate_perplexity

    a = run.args
    return evaluate_perplexity(run.model, run.rows(a.stage), a.batch_size, run.tokenizer.pad_token_id,
                               grouped=a.batch_order == "group_by_length", seed=a.seed)


def run_generation(run: EvalRun) -> dict[str, Any]:
    """Replies to every row's prompt, scored against its reference; writes generated_predictions.jsonl."""
    from lmforge.data.templates import stop_token_ids, template_for
    from lmforge.eval.generation import Generator, evaluate_generation, generation_rows

    if run.args.stage != "sft" or run.data.train_on_prompt:
        raise LmforgeError("generation needs conversations with their replies as references: set stage: sft "
                           "and train_on_prompt: false")
    try:
        rows = generation_rows(run.rows("sft"), run.tokenizer)
    except LmforgeError as err:
        raise LmforgeError(f"generation needs a reference reply in every row: {err}") from None
    template = template_for(run.data, run.tokenizer)
    a = run.args
    generator = Generator(run.model, run.tokenizer, stop_token_ids(run.tokenizer, template),
                          tuple(template.stop_words), a.max_new_tokens, a.temperature, a.top_p, a.repetition_penalty)
    return evaluate_generation(generator, rows, a.batch_size, run.output_dir)


def find_choice_benchmark(args: EvalArguments) -> Benchmark:
    """The benchmark of task_dir / task with every file read once, so a bad file fails before the model loads."""
    from lmforge.eval.benchmarks import find_benchmark, list_subjects, read_questions

    folder, split = find_benchmark(args.task_dir, args.task)
    subjects = list_subjects(folder, split, args.subjects, args.n_shot)
    for subject in subjects:
        for path in subject.files.values():
            read_questions(path)
    return Benchmark(folder, split, subjects)


def run_choice(run: EvalRun) -> dict[str, Any]:
    """A multiple-choice benchmark from task_dir, per subject, per category and overall."""
    from lmforge.data.templates import template_for
    from lmforge.eval.choice import ChoiceScorer, evaluate_choice

    a, bench = run.args, run.benchmark
    scorer = ChoiceScorer(run.model, run.tokenizer, template_for(run.data, run.tokenizer), a.lang)
    title = f"{bench.folder.name} {bench.split}, {a.n_shot}-shot"
    summary = evaluate_choice(scorer, bench.subjects, bench.split, a.n_shot, a.batch_size, run.data.max_samples,
                              run.output_dir, title)
    return {"benchmark": str(bench.folder), "split": bench.split, "n_shot": a.n_shot, **summary}


def run_lm_eval(run: EvalRun) -> dict[str, Any]:
    """lm-evaluation-harness tasks on the loaded model."""
    from lmforge.eval.harness import run_harness

    a = run.args
    return run_harness(run.model, run.tokenizer, a.lm_eval_tasks, a.lm_eval_include_path, a.batch_size,
                       run.data.max_samples, a.seed)


TASKS: dict[str, Callable[[EvalRun], dict[str, Any]]] = {
    "perplexity": run_perplexity, "generation": run_generation, "choice": run_choice, "lm_eval": run_lm_eval,
}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the results whole (a reader never sees half a file)."""
    write_text_atomically(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(task, metric, value) lines of the summary table: the headline figures of each task."""
    rows = []
    for task, result in results.items():
        if task == "lm_eval":
            rows += [(f"lm_eval:{name}", k, f"{v:.4f}") for name, metrics in result.items()
                     for k, v in metrics.items() if not k.endswith("_stderr")]
            continue
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((task, key, f"{value:.4f}" if isinstance(value, float) else str(value)))
        rows += [(task, f"accuracy[{c}]", f"{v:.2f}") for c, v in result.get("categories", {}).items()]
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """A plain text table with aligned columns."""
    header = ("task", "metric", "value")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    body = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in [header, *rows]]
    return "\n".join([body[0], line, *body[1:]])


def run_eval(model_args: ModelArguments, data_args: DataArguments, args: EvalArguments) -> dict[str, Any]:
    """Load the model, run every eval_task in order, write eval_results.json; returns what it wrote."""
    from lmforge.serve.chat import load_for_inference

    benchmark = find_choice_benchmark(args) if "choice" in args.eval_task else None
    output_dir = check_output_dir(args)
    tokenizer, model = load_for_inference(model_args)
    run = EvalRun(model, tokenizer, data_args, args, output_dir, benchmark)
    results = {}
    for kind in args.eval_task:
        logger.info("eval: %s", kind)
        results[kind] = TASKS[kind](run)
    payload = {"model_name_or_path": model_args.model_name_or_path, "adapter_name_or_path":
               model_args.adapter_name_or_path, "lmforge_version": __version__, **results}
    write_json(output_dir / RESULTS, payload)
    print(format_table(summary_rows(results)))
    print(f"results in {output_dir / RESULTS}")
    return payload

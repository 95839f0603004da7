"""What a finished run leaves beside the weights: loss plots, all_results.json, a model card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.model.loader import resolve_model_path
from lmforge.train.callbacks import read_log


def _smooth(values: list[float]) -> list[float]:
    """Exponential moving average whose weight grows with the number of points (about 0.18 for 8
    points, 0.9 for 1,000), so a short run's curve does not lag behind its data."""
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


DEFAULT_PLOTS = (("loss", "training_loss.png"), ("eval_loss", "eval_loss.png"))


def plot_losses(output_dir: str | Path, plots: tuple[tuple[str, str], ...] = DEFAULT_PLOTS) -> list[Path]:
    """One PNG per (log key, file name) of `plots` that trainer_log.jsonl holds (the stage's plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    written = []
    for key, name in plots:
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4 if len(points) > 5 else 1.0, label="original")
        if len(points) > 5:
            ax.plot(steps, _smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {Path(output_dir).name}")
        ax.legend()
        fig.tight_layout()
        path = Path(output_dir) / name  # keys with "/" (TRL's metric names) keep their plain file name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def build_results(train_metrics: dict[str, Any], eval_metrics: dict[str, Any] | None, extra: dict[str, Any],
                  perplexity: bool = True) -> dict[str, Any]:
    """Train and eval metrics plus `extra`; perplexity from eval_loss when that is a next-token loss."""
    results = {k: v for k, v in train_metrics.items()}
    if eval_metrics:
        results.update(eval_metrics)
        if perplexity and "eval_loss" in eval_metrics:
            results["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 700.0))
    results.update(extra)
    return results


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write the run's results to all_results.json in output_dir."""
    path = Path(output_dir) / "all_results.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def write_model_card(output_dir: str | Path, *, base_model: str, stage: str, method: str, datasets: str,
                     hyperparameters: dict[str, Any], results: dict[str, Any], is_adapter: bool) -> Path:
    """README.md with YAML front matter the Hub understands, then the run's facts. The load snippet names
    local directories: an alias or .gguf base as the de-quantized directory lmforge loaded it from."""
    library = "peft" if is_adapter else "transformers"
    here = Path(output_dir).resolve()
    loader = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
              f"base = AutoModelForCausalLM.from_pretrained('{_local_base(base_model)}')\n"
              f"model = PeftModel.from_pretrained(base, '{here}')") if is_adapter else (
              "from transformers import AutoModelForCausalLM\n"
              f"model = AutoModelForCausalLM.from_pretrained('{here}')")
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyperparameters.items())
    result_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(results.items()))
    text = f"""---
library_name: {library}
base_model: {base_model}
tags: [lmforge, {stage}, {method}]
---
# {Path(output_dir).name}

Trained with lmforge {__version__}: stage `{stage}`, fine-tuning `{method}`, from `{base_model}` on `{datasets}`.

## Hyperparameters
| option | value |
|---|---|
{rows}

## Results
| metric | value |
|---|---|
{result_rows}

## Use
The paths below are local to this machine.
```python
{loader}
```
or `lmforge chat --model_name_or_path {base_model if is_adapter else here}{f' --adapter_name_or_path {here}' if is_adapter else ''}`.
"""
    path = Path(output_dir) / "README.md"
    path.write_text(text)
    return path


def _local_base(name: str) -> str:
    """The absolute local directory the base model loads from (aliases and .gguf files de-quantized), or
    the name as given when it resolves to none (a model built from model_config alone)."""
    try:
        return str(Path(resolve_model_path(name)).resolve())
    except LmforgeError:
        return name


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)

"""lm-evaluation-harness tasks run on the already-loaded model (its HFLM class wraps the model object).

Nothing is downloaded by lmforge: a task whose data is local (`dataset_path: json` with `data_files`, or a
dataset in the Hugging Face cache) runs offline; `lm_eval_include_path` adds a folder of task YAML files.
"""

from __future__ import annotations

import logging
from typing import Any

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)
EXTRA = "pip install 'lmforge[eval]'"


def _import_harness() -> tuple[Any, Any, Any]:
    """(simple_evaluate, HFLM, TaskManager), or a one-line error naming the extra to install."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmforgeError(f"eval_task lm_eval:... needs lm-evaluation-harness: {EXTRA}") from None
    return simple_evaluate, HFLM, TaskManager


def task_manager(task_manager_cls: Any, tasks: list[str], include_path: str | None) -> Any:
    """A TaskManager that knows every task: the include_path alone when it holds them all (no scan of
    lm-eval's thousands of built-in YAMLs), else include_path plus the built-in tasks."""
    if include_path:
        local = task_manager_cls(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = task_manager_cls(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = "" if include_path else "; for your own task YAMLs set lm_eval_include_path"
        raise LmforgeError(f"lm_eval: unknown task(s) {', '.join(unknown)}{hint}")
    return manager


def flatten_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (its `metric,filter` keys; stderr kept as metric_stderr)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        kept = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "alias":
                kept[metric if filt in ("", "none") else f"{metric},{filt}"] = round(float(value), 6)
        out[task] = kept
    return out


def run_harness(model: Any, tokenizer: Any, tasks: list[str], include_path: str | None, batch_size: int,
                limit: int | None, seed: int) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on the loaded model; returns {task: {metric: value}}."""
    simple_evaluate, hflm, task_manager_cls = _import_harness()
    manager = task_manager(task_manager_cls, tasks, include_path)
    lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    if results is None:  # lm-eval returns None on processes other than rank 0
        return {}
    return flatten_results(results)

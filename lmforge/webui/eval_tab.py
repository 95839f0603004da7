"""The Eval tab: `lmforge eval` run from the page (perplexity, generation scores, a multiple-choice benchmark),
with its output while it runs and output_dir/eval_results.json when it is done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from lmforge.config.parser import EVAL_GROUPS
from lmforge.webui.export_tab import poll
from lmforge.webui.forms import DEFAULT_MODEL, dataset_choices, filled, model_choices, option_help, template_choices
from lmforge.webui.jobs import Job

FIELDS = ("model_name_or_path", "adapter_name_or_path", "eval_task", "dataset_dir", "dataset", "template",
          "max_samples", "task_dir", "task", "output_dir")
TASKS = ("perplexity", "generation", "choice")  # lm_eval:TASK goes through the CLI (it needs its task names)
CHOICE_ONLY = ("task_dir", "task")


def eval_options(values: dict[str, Any]) -> dict[str, Any]:
    """The options of the form; the benchmark's folder and name only when `choice` is measured."""
    options = filled(values)
    if "choice" not in options.get("eval_task", []):
        for name in CHOICE_ONLY:
            options.pop(name, None)
    return options


def eval_results(output_dir: str | None) -> dict[str, Any]:
    """output_dir/eval_results.json, or nothing yet."""
    path = Path(output_dir or "") / "eval_results.json"
    if not output_dir or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def _help(name: str) -> str:
    return option_help(name, EVAL_GROUPS)


def build_eval_tab(job: Job) -> None:
    """Lay out the tab and wire its events (start_eval and eval_status are API endpoints too)."""
    with gr.Row():
        model = gr.Dropdown(model_choices(), value=DEFAULT_MODEL, allow_custom_value=True, label="model_name_or_path",
                            info=_help("model_name_or_path"), elem_id="eval_model")
        adapter = gr.Textbox(label="adapter_name_or_path", info=_help("adapter_name_or_path"), elem_id="eval_adapter")
        tasks = gr.CheckboxGroup(list(TASKS), value=["perplexity"], label="eval_task", info=_help("eval_task"))
    with gr.Row():
        dataset_dir = gr.Textbox("data", label="dataset_dir", info=_help("dataset_dir"))
        dataset = gr.Dropdown(dataset_choices("data"), multiselect=True, allow_custom_value=True, label="dataset",
                              info=_help("dataset"))
        template = gr.Dropdown(template_choices(), value="auto", allow_custom_value=True, label="template")
        max_samples = gr.Number(None, precision=0, label="max_samples", info=_help("max_samples"))
    with gr.Row():
        task_dir = gr.Textbox("data", label="task_dir", info=_help("task_dir"))
        task = gr.Textbox("mmlu_demo_test", label="task", info=_help("task"))
        output_dir = gr.Textbox("saves/webui-eval", label="output_dir", info=_help("output_dir"))
    start = gr.Button("Evaluate", variant="primary", elem_id="eval_start")
    status = gr.Textbox(label="status", interactive=False, elem_id="eval_status")
    with gr.Row():
        log = gr.Textbox(label="log (last lines)", lines=12, max_lines=12, interactive=False)
        results = gr.JSON(label="eval_results.json")
    timer = gr.Timer(1.0, active=False)
    inputs = [model, adapter, tasks, dataset_dir, dataset, template, max_samples, task_dir, task, output_dir]

    def start_eval(*values: Any) -> tuple[str, gr.Timer]:
        line = job.start(eval_options(dict(zip(FIELDS, values))))
        return line, gr.Timer(active=job.runner.running)

    def eval_status() -> tuple[str, str, gr.Timer, dict[str, Any]]:
        out = job.options.get("output_dir")
        return (*poll(job, f"finished: results in {out}/eval_results.json"), eval_results(out))

    dataset_dir.change(lambda d: gr.Dropdown(choices=dataset_choices(d)), dataset_dir, dataset,
                       api_visibility="private")
    start.click(start_eval, inputs, [status, timer], api_name="start_eval")
    timer.tick(eval_status, None, [status, log, timer, results], api_name="eval_status", show_progress="hidden")

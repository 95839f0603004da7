"""The Export tab: `lmforge export` run from the page, merging LoRA adapters into a Hugging Face folder or
writing one .gguf file (with an Ollama Modelfile), with its output shown as it runs."""

from __future__ import annotations

from typing import Any

import gradio as gr

from lmforge.config import ExportArguments
from lmforge.config.parser import EXPORT_GROUPS
from lmforge.webui.forms import DEFAULT_MODEL, filled, literal_choices, model_choices, option_help, template_choices
from lmforge.webui.jobs import Job

FIELDS = ("model_name_or_path", "adapter_name_or_path", "export_dir", "export_format", "export_dtype", "gguf_type",
          "template", "export_ollama")


def export_options(values: dict[str, Any]) -> dict[str, Any]:
    """The options of the form: export_dtype for hf folders, gguf_type and export_ollama for .gguf files."""
    options = filled(values)
    gguf = options.get("export_format") == "gguf"
    for name in ("gguf_type", "export_ollama") if not gguf else ("export_dtype",):
        options.pop(name, None)
    if not options.get("export_ollama"):
        options.pop("export_ollama", None)
    return options


def poll(job: Job, done: str) -> tuple[str, str, gr.Timer]:
    """Status line, log tail and whether to keep polling, for a job without a plot."""
    line = job.status_line(done)
    return line, job.runner.log.tail(12), gr.Timer(active=line.startswith(("running", "stopping")))


def _help(name: str) -> str:
    return option_help(name, EXPORT_GROUPS)


def build_export_tab(job: Job) -> None:
    """Lay out the tab and wire its events (start_export and export_status are API endpoints too)."""
    with gr.Row():
        model = gr.Dropdown(model_choices(), value=DEFAULT_MODEL, allow_custom_value=True, label="model_name_or_path",
                            info=_help("model_name_or_path"), elem_id="export_model")
        adapter = gr.Textbox(label="adapter_name_or_path", info=_help("adapter_name_or_path"),
                             elem_id="export_adapter")
        export_dir = gr.Textbox(label="export_dir", info=_help("export_dir"), elem_id="export_dir")
    with gr.Row():
        export_format = gr.Radio(literal_choices(ExportArguments, "export_format"), value="hf", label="export_format",
                                 info=_help("export_format"), elem_id="export_format")
        dtype = gr.Dropdown(literal_choices(ExportArguments, "export_dtype"), value="auto", label="export_dtype",
                            info=_help("export_dtype"))
        gguf_type = gr.Dropdown(["", *literal_choices(ExportArguments, "gguf_type")], value="", label="gguf_type",
                                info=_help("gguf_type"))
        template = gr.Dropdown(["", *template_choices()], value="", label="template", info=_help("template"))
        ollama = gr.Checkbox(False, label="export_ollama", info=_help("export_ollama"))
    start = gr.Button("Export", variant="primary", elem_id="export_start")
    status = gr.Textbox(label="status", interactive=False, elem_id="export_status")
    log = gr.Textbox(label="log (last lines)", lines=12, max_lines=12, interactive=False,
                     elem_id="export_log")
    timer = gr.Timer(1.0, active=False)
    inputs = [model, adapter, export_dir, export_format, dtype, gguf_type, template, ollama]

    def start_export(*values: Any) -> tuple[str, gr.Timer]:
        line = job.start(export_options(dict(zip(FIELDS, values))))
        return line, gr.Timer(active=job.runner.running)

    def export_status() -> tuple[str, str, gr.Timer]:
        return poll(job, f"finished: {job.runner.log.last_line() or job.options.get('export_dir')}")

    start.click(start_export, inputs, [status, timer], api_name="start_export")
    timer.tick(export_status, None, [status, log, timer], api_name="export_status", show_progress="hidden")

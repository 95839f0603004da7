"""The Train tab: the form, the data preview, the equivalent YAML and command, Start and Stop, and the run's
log and live loss curve (read from output_dir/trainer_log.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lmforge.config.args import FINETUNING_TYPES
from lmforge.webui.forms import (
    TRAIN_FIELDS,
    dataset_choices,
    form_defaults,
    form_options,
    model_choices,
    option_help,
    stage_choices,
    template_choices,
    to_command,
    to_yaml,
)
from lmforge.webui.jobs import Job, error_line
from lmforge.webui.preview import error_html, preview_examples, preview_html

INTEGER_FIELDS = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "lora_rank")
LOG_LINES = 15  # the log box shows the tail of the run's output, as many lines as it is tall


def loss_frame(output_dir: str | None) -> pd.DataFrame:
    """The training loss logged so far, one row per logging step. (One series only: gradio 6 stops drawing a
    LinePlot's lines when a `color` split is updated repeatedly; eval_loss has its own eval_loss.png.)"""
    from lmforge.train.callbacks import LOG_NAME

    points = []
    path = Path(output_dir or "") / LOG_NAME
    lines = path.read_text(encoding="utf-8").splitlines() if output_dir and path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written right now
            continue
        if "loss" in record:
            points.append((record["step"], record["loss"]))
    # typed even when empty: the chart keeps the axis types of its first value
    steps, losses = zip(*points) if points else ((), ())
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(losses, dtype="float64")})


def _values(args: tuple[Any, ...]) -> tuple[dict[str, Any], str]:
    """The handler's positional inputs (the form fields, then the extra options) as (fields, extra)."""
    return dict(zip(TRAIN_FIELDS, args[:-1])), args[-1]


def config_view(*args: Any) -> tuple[str, str]:
    """The YAML and the command line the form stands for (or why it cannot be written)."""
    try:
        options = form_options(*_values(args))
    except Exception as err:  # shown on the page
        return f"# {error_line(err)}", ""
    return to_yaml(options), to_command("train", options)


class TrainTab:
    """The tab's components and handlers, around one train Job."""

    def __init__(self, job: Job, prefill: dict[str, Any] | None = None):
        self.job = job
        self.values, self.extra_text = form_defaults(prefill)

    def _field(self, name: str, label: str | None = None, **kwargs: Any) -> gr.components.Component:
        value, info = self.values[name], option_help(name)
        if name in INTEGER_FIELDS:
            return gr.Number(value=value, label=label or name, info=info, precision=0, elem_id=name, **kwargs)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return gr.Number(value=value, label=label or name, info=info, elem_id=name, **kwargs)
        return gr.Textbox(value=value, label=label or name, info=info, elem_id=name, **kwargs)

    def _selectors(self) -> dict[str, gr.components.Component]:
        v = self.values
        with gr.Row():
            model = gr.Dropdown(model_choices(), value=v["model_name_or_path"], label="model_name_or_path",
                                info="an alias, or type a local model directory", allow_custom_value=True,
                                elem_id="model_name_or_path")
            stage = gr.Dropdown(stage_choices(), value=v["stage"], label="stage", elem_id="stage")
            method = gr.Radio(list(FINETUNING_TYPES), value=v["finetuning_type"], label="finetuning_type",
                              elem_id="finetuning_type")
        with gr.Row():
            dataset_dir = self._field("dataset_dir")
            dataset = gr.Dropdown(dataset_choices(v["dataset_dir"]), value=v["dataset"], multiselect=True,
                                  allow_custom_value=True, label="dataset", info=option_help("dataset"),
                                  elem_id="dataset")
            template = gr.Dropdown(template_choices(), value=v["template"], allow_custom_value=True,
                                   label="template", info=option_help("template"), elem_id="template")
        return {"model_name_or_path": model, "stage": stage, "finetuning_type": method, "dataset_dir": dataset_dir,
                "dataset": dataset, "template": template}

    def _hyperparameters(self) -> dict[str, gr.components.Component]:
        fields = {}
        with gr.Row():
            for name in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                         "gradient_accumulation_steps"):
                fields[name] = self._field(name)
        with gr.Row():
            for name in ("cutoff_len", "lora_rank", "logging_steps", "save_steps", "output_dir"):
                fields[name] = self._field(name)
        return fields

    def build(self) -> None:
        """Lay out the tab and wire its events (each also an API endpoint that gradio_client can call)."""
        fields = self._selectors() | self._hyperparameters()
        with gr.Accordion("Extra options (YAML, any option of `lmforge train --help`)", open=bool(self.extra_text)):
            extra = gr.Code(self.extra_text, language="yaml", label="extra options", elem_id="extra")
        self.inputs = [fields[name] for name in TRAIN_FIELDS] + [extra]
        with gr.Row():
            preview_btn = gr.Button("Preview data", elem_id="train_preview")
            start_btn = gr.Button("Start", variant="primary", elem_id="train_start")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="train_stop")
        self.status = gr.Textbox(label="status", interactive=False, elem_id="train_status")
        with gr.Accordion("Data preview", open=False):
            preview = gr.HTML(elem_id="train_preview_html")
        with gr.Accordion("Equivalent YAML and command", open=False):
            yaml_box = gr.Code(language="yaml", label="config.yaml", interactive=False, elem_id="train_yaml")
            command = gr.Textbox(label="command", interactive=False, elem_id="train_command")
        with gr.Row():
            log = gr.Textbox(label="log (last lines)", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False,
                             elem_id="train_log")
            plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="training loss", height=320,
                               elem_id="loss_plot")
        timer = gr.Timer(1.0, active=False)
        fields["dataset_dir"].change(lambda d: gr.Dropdown(choices=dataset_choices(d)), fields["dataset_dir"],
                                     fields["dataset"], api_visibility="private")
        gr.on([c.change for c in self.inputs], config_view, self.inputs, [yaml_box, command], api_name="train_config")
        preview_btn.click(self.preview, self.inputs, preview, api_name="preview")
        start_btn.click(self.start, self.inputs, [self.status, timer], api_name="start_train")
        stop_btn.click(self.stop, None, self.status, api_name="stop_train")
        timer.tick(self.poll, None, [self.status, log, plot, timer], api_name="train_status", show_progress="hidden")
        self.config_view = (config_view, self.inputs, [yaml_box, command])

    def preview(self, *args: Any) -> str:
        """A few rows as training renders them, trained tokens marked; the CLI's error when the config is refused."""
        try:
            config = self.job.validate([str(self.job.write(form_options(*_values(args))))])
            return preview_html(preview_examples(config))
        except Exception as err:  # shown on the page as one line
            return error_html(error_line(err))

    def start(self, *args: Any) -> tuple[str, gr.Timer]:
        """Check the options as `lmforge train` does and start it; the status line and the polling timer."""
        try:
            options = form_options(*_values(args))
        except Exception as err:  # shown on the page as one line
            return error_line(err), gr.Timer(active=False)
        line = self.job.start(options)
        return line, gr.Timer(active=self.job.runner.running)

    def stop(self) -> str:
        """SIGTERM to the run: it saves a checkpoint and the status then says how to resume."""
        return self.job.stop()

    def poll(self) -> tuple[str, str, pd.DataFrame, gr.Timer]:
        """Status, log tail and loss points; the timer stops once the run has ended."""
        output_dir = self.job.options.get("output_dir")
        line = self.job.status_line(f"finished: outputs in {output_dir}")
        running = self.job.runner.running or line.startswith(("running", "stopping"))
        return line, self.job.runner.log.tail(LOG_LINES), loss_frame(output_dir), gr.Timer(active=running)

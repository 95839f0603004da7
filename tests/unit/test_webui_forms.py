"""The webui's pieces without a server: the form's YAML and command line mean the same run, the log buffer
keeps the last lines with progress bars rewritten in place, and webui_host / webui_port read Gradio's env."""

import shlex

import pytest

from lmforge.config import parse_train_config
from lmforge.config.args import WebuiArguments
from lmforge.errors import LmforgeError
from lmforge.webui.forms import TRAIN_FIELDS, form_defaults, form_options, to_command, to_yaml
from lmforge.webui.runner import LogBuffer


def test_yaml_and_command_line_give_the_same_config(tmp_path):
    values, _ = form_defaults({"dataset": "alpaca_demo,sharegpt_demo", "max_steps": 3, "output_dir": "out"})
    options = form_options(values, "lora_target: q_proj,v_proj\npacking: true\n")
    assert "num_train_epochs" not in options and options["max_steps"] == 3  # max_steps > 0 replaces epochs
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(options))
    from_yaml = parse_train_config([str(path)])
    from_cli = parse_train_config(shlex.split(to_command("train", options))[2:])
    for group in ("model", "data", "finetuning"):
        assert vars(getattr(from_yaml, group)) == vars(getattr(from_cli, group))
    assert from_cli.data.dataset == ["alpaca_demo", "sharegpt_demo"] and from_cli.finetuning.lora_target == [
        "q_proj", "v_proj"]
    assert from_cli.training.max_steps == 3 and from_cli.data.packing


def test_form_leaves_out_what_the_method_does_not_read():
    values, _ = form_defaults({"finetuning_type": "full", "max_steps": -1})
    options = form_options(values)
    assert "lora_rank" not in options and "max_steps" not in options and "num_train_epochs" in options
    assert list(options) == [name for name in TRAIN_FIELDS if name in options]


def test_a_config_fills_the_form_and_the_rest_goes_to_extra_options():
    values, extra = form_defaults({"learning_rate": "1e-4", "lora_alpha": 16})
    assert values["learning_rate"] == 1e-4 and extra == "lora_alpha: 16\n"
    with pytest.raises(LmforgeError, match="option 'cutoff_len' expects int"):
        form_defaults({"cutoff_len": "long"})


def test_log_buffer_keeps_the_last_lines_and_rewrites_progress_bars():
    log = LogBuffer(max_lines=3)
    for piece in ["a\nb", "ar\n", " 10%\r 50%", "\r100%\n", "done\n"]:
        log.feed(piece)
    assert log.text() == "100%\ndone"
    assert log.tail(1) == "done" and log.last_line("bar") is None


def test_webui_host_and_port_default_to_loopback_and_read_gradio_env(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = WebuiArguments()
    assert (args.webui_host, args.webui_port, args.share) == ("127.0.0.1", 7860, False)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert (WebuiArguments().webui_host, WebuiArguments().webui_port) == ("0.0.0.0", 7999)
    assert WebuiArguments(webui_port=8001).webui_port == 8001  # the option wins over the environment
    monkeypatch.setenv("GRADIO_SERVER_PORT", "x")
    with pytest.raises(LmforgeError, match="GRADIO_SERVER_PORT must be a port number"):
        WebuiArguments()

"""`lmforge webui` through its own API (gradio_client) on a free loopback port: a 2-step training started from
the page finishes with its outputs and loss curve, Stop saves a checkpoint, refused options show the CLI's
one-line error, the data preview equals the data doctor's, chat equals ChatEngine.reply, export merges."""

import html
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from lmforge.cli import main
from lmforge.config import GenerationArguments, ModelArguments
from lmforge.data.doctor import check_sft
from lmforge.model.loader import load_tokenizer
from lmforge.serve.chat import ChatEngine, load_for_inference
from lmforge.train.callbacks import read_log
from lmforge.webui.app import Webui
from lmforge.webui.chat_tab import message_text
from lmforge.webui.forms import TRAIN_FIELDS, form_options, to_yaml

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "Tell me about bonds."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    ui = Webui(workdir=tmp_path_factory.mktemp("webui"))
    client = Client(ui.launch("127.0.0.1", free_port()), verbose=False)
    yield ui, client
    ui.close()


def train_form(model_dir: Path, output_dir: Path, extra: str = "", **changes) -> list:
    """The Train tab's inputs in order: the form fields, then the extra-options YAML."""
    values = {"model_name_or_path": str(model_dir), "stage": "sft", "finetuning_type": "lora",
              "dataset_dir": str(ROOT / "data"), "dataset": ["alpaca_demo"], "template": "chatml",
              "learning_rate": 5e-3, "num_train_epochs": 1, "max_steps": 2, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 1, "cutoff_len": 256, "lora_rank": 4, "output_dir": str(output_dir),
              "logging_steps": 1, "save_steps": 500} | changes
    return [values[name] for name in TRAIN_FIELDS] + [extra]


def wait_until_done(client: Client, endpoint: str, timeout: float = 300) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = client.predict(api_name=endpoint)
        if not result[0].startswith(("running", "stopping")):
            return result
        time.sleep(0.5)
    pytest.fail(f"{endpoint} still running after {timeout} s: {result[0]}\n{result[1]}")


def plot_points(plot: dict) -> list[tuple[int, float]]:
    """(step, loss) of the LinePlot's value."""
    value = plot.get("value", plot)
    columns = value["columns"]
    rows = [dict(zip(columns, row)) for row in value["data"]]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def trained_run(page, tiny_llama_dir, tmp_path_factory):
    """A 2-step LoRA SFT run started from the page's API; (status, log, plot, output_dir) once it ended."""
    _, client = page
    out = tmp_path_factory.mktemp("webui-run") / "lora"
    status, _ = client.predict(*train_form(tiny_llama_dir, out), api_name="/start_train")
    assert status.startswith("running: lmforge train "), status
    status, log, plot, _ = wait_until_done(client, "/train_status")
    return status, log, plot, out


def test_training_started_from_the_page_finishes_with_outputs_and_loss_points(trained_run):
    status, log, plot, out = trained_run
    assert status == f"finished: outputs in {out}", log
    assert (out / "adapter_model.safetensors").is_file()
    logged = [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r]
    assert [step for step, _ in logged] == [1, 2]
    points = plot_points(plot)  # the curve is the run's own trainer_log.jsonl
    assert [step for step, _ in points] == [1, 2]
    assert [loss for _, loss in points] == pytest.approx([loss for _, loss in logged], abs=1e-6)
    assert f"done: outputs in {out}" in log  # the tail of the run's own output


def test_stop_sends_sigterm_and_the_page_says_how_to_resume(page, tiny_llama_dir, tmp_path):
    ui, client = page
    out = tmp_path / "stopped"
    client.predict(*train_form(tiny_llama_dir, out, max_steps=5000), api_name="/start_train")
    deadline = time.monotonic() + 240
    while not read_log(out) and time.monotonic() < deadline:  # wait for the first optimizer steps
        time.sleep(0.5)
    assert client.predict(api_name="/stop_train").startswith("stopping: SIGTERM sent")
    status, log, _, _ = wait_until_done(client, "/train_status")
    assert re.fullmatch(rf"lmforge: stopped by SIGTERM after step \d+; a checkpoint was saved in {re.escape(str(out))}: "
                        r"run the same command again to resume \(resume_from_checkpoint: auto\)", status), log
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())


@pytest.mark.parametrize("extra, changes", [
    ("lora_rnak: 4\n", {}),  # unknown option: the CLI suggests the nearest one
    ("packing: true\n", {"stage": "dpo"}),  # a cross-field refusal of TrainConfig
    ("- not a mapping\n", {}),
])
def test_a_refused_option_shows_the_cli_one_line_error(page, tiny_llama_dir, tmp_path, capsys, extra, changes):
    ui, client = page
    form = train_form(tiny_llama_dir, tmp_path / "never", extra, **changes)
    status, _ = client.predict(*form, api_name="/start_train")
    assert not ui.jobs["train"].runner.running
    if extra.startswith("-"):
        assert status == "lmforge: error: extra options must be YAML `key: value` lines, got list"
        return
    config = tmp_path / "same.yaml"
    config.write_text(to_yaml(form_options(dict(zip(TRAIN_FIELDS, form[:-1])), extra)))
    assert main(["train", str(config)]) == 2
    cli_error = capsys.readouterr().err.strip()
    assert status == cli_error and "\n" not in status and "Traceback" not in status


def test_preview_shows_the_rows_as_the_data_doctor_marks_them(page, tiny_llama_dir, tmp_path):
    from lmforge.config.parser import DataArguments

    _, client = page
    preview = client.predict(*train_form(tiny_llama_dir, tmp_path / "out"), api_name="/preview")
    shown = re.findall(r"<pre[^>]*>(.*?)</pre>", preview, flags=re.S)
    as_doctor = [html.unescape(re.sub(r"<mark[^>]*>", "[[", s).replace("</mark>", "]]")) for s in shown]
    args = DataArguments(dataset=["alpaca_demo"], dataset_dir=str(ROOT / "data"), template="chatml", cutoff_len=256)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    report = check_sft(args, tokenizer, tokenizer.chat_template, 42, 3, tmp_path / "report", color=False)
    assert len(shown) == 3 and as_doctor == report.examples


@pytest.mark.parametrize("temperature, top_p", [(0.0, 0.9), (1.0, 1.0)])  # greedy, and sampled with seed 42
def test_chat_replies_as_the_chat_engine_does(page, tiny_llama_dir, temperature, top_p):
    _, client = page
    assert client.predict(str(tiny_llama_dir), "", "auto", api_name="/load_model").startswith("loaded ")
    history, box, status = client.predict("Tell me about bonds.", [], "", 12, temperature, top_p, 1.0,
                                          api_name="/chat")
    tokenizer, model = load_for_inference(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    gen = GenerationArguments(max_new_tokens=12, repetition_penalty=1.0, temperature=temperature, top_p=top_p)
    expected = ChatEngine(tokenizer, model, gen).reply(MESSAGES)
    assert [m["role"] for m in history] == ["user", "assistant"]
    # the chat box trims a reply's outer whitespace, as `lmforge chat --query` prints it (the tiny random
    # model's greedy reply is all newlines; its sampled one is words)
    assert message_text(history[-1]["content"]) == expected.strip()
    assert box == "" and status.startswith("answered with ")


def test_export_tab_merges_the_trained_adapter(page, trained_run, tmp_path):
    _, client = page
    merged = tmp_path / "merged"
    status, _ = client.predict("", str(trained_run[3]), str(merged), "hf", "auto", "", "", False,
                               api_name="/start_export")
    assert status.startswith("running: lmforge export "), status
    status, log, _ = wait_until_done(client, "/export_status")
    assert status.startswith(f"finished: exported to {merged}"), log
    assert (merged / "config.json").is_file()


def test_webui_refuses_a_port_in_use_in_one_line(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["webui", "--webui_port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"lmforge: error: port {port} on 127.0.0.1 is in use: stop what listens there or set --webui_port "
                   "(or GRADIO_SERVER_PORT)")


def test_webui_without_gradio_names_the_extra(monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("lmforge.webui.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["webui"]) == 2
    assert capsys.readouterr().err.strip() == "lmforge: error: lmforge webui needs gradio: pip install 'lmforge[serve]'"

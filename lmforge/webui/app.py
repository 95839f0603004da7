"""The page: Train, Chat, Export and Eval tabs in one Gradio Blocks app, and `lmforge webui`'s launch (loopback
by default, a taken port as a one-line error, running commands stopped when the page closes)."""

from __future__ import annotations

import logging
import socket
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from lmforge import __version__
from lmforge.config.args import WebuiArguments
from lmforge.errors import LmforgeError
from lmforge.webui.chat_tab import ChatSession, build_chat_tab
from lmforge.webui.eval_tab import build_eval_tab
from lmforge.webui.export_tab import build_export_tab
from lmforge.webui.jobs import Job, validate_eval, validate_export, validate_train
from lmforge.webui.train_tab import TrainTab

logger = logging.getLogger(__name__)


class Webui:
    """The page and what it runs: one train, export and eval job and one chat model at a time."""

    def __init__(self, prefill: dict[str, Any] | None = None, workdir: str | Path | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lmforge-webui-"))
        self.jobs = {"train": Job("train", validate_train, self.workdir),
                     "export": Job("export", validate_export, self.workdir),
                     "eval": Job("eval", validate_eval, self.workdir)}
        self.chat = ChatSession()
        self.train_tab = TrainTab(self.jobs["train"], prefill)
        self.blocks = self._build()
        self.url: str | None = None

    def _build(self) -> gr.Blocks:
        with gr.Blocks(title="lmforge", analytics_enabled=False) as blocks:
            gr.Markdown(f"## lmforge {__version__}: train, chat and export causal LMs")
            with gr.Tab("Train", elem_id="tab_train"):
                self.train_tab.build()
            with gr.Tab("Chat", elem_id="tab_chat"):
                build_chat_tab(self.chat)
            with gr.Tab("Export", elem_id="tab_export"):
                build_export_tab(self.jobs["export"])
            with gr.Tab("Eval", elem_id="tab_eval"):
                build_eval_tab(self.jobs["eval"])
            blocks.load(*self.train_tab.config_view, api_visibility="private")
        return blocks

    def launch(self, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> str:
        """Serve the page in a background thread; returns its URL."""
        check_port(host, port)
        try:
            _, self.url, _ = self.blocks.launch(server_name=host, server_port=port, share=share, quiet=True,
                                                prevent_thread_lock=True)
        except OSError as err:
            raise LmforgeError(f"cannot serve the page on {host}:{port}: {err}") from None
        return self.url

    def close(self) -> None:
        """Stop what the page started (SIGTERM: a training run saves a checkpoint) and the server."""
        for job in self.jobs.values():
            job.runner.shutdown()
        self.blocks.close()


def check_port(host: str, port: int) -> None:
    """Fail at once, in one line, when host:port cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if "in use" in str(err):
                raise LmforgeError(f"port {port} on {host} is in use: stop what listens there or set --webui_port "
                                   "(or GRADIO_SERVER_PORT)") from None
            raise LmforgeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def split_options(raw: dict[str, Any]) -> tuple[WebuiArguments, dict[str, Any]]:
    """`lmforge webui [CONFIG.yaml] [--key value]`: the page's own options, and train options that fill the
    Train tab (checked as `lmforge train` checks each option's name and type)."""
    from lmforge.config.parser import GROUPS, WEBUI_GROUPS, all_option_names, build_groups

    own = all_option_names(WEBUI_GROUPS)
    (args,) = build_groups({k: v for k, v in raw.items() if k in own}, WEBUI_GROUPS)
    prefill = {k: v for k, v in raw.items() if k not in own}
    build_groups(prefill, GROUPS)
    return args, prefill


def run_webui(raw: dict[str, Any], config_path: str | None = None) -> None:
    """Serve the page until interrupted; a config's train options fill the Train tab."""
    from lmforge.serve.api_guard import is_loopback

    args, prefill = split_options(raw)
    if not is_loopback(args.webui_host):
        logger.warning("webui_host %s is not a loopback address: anyone who can reach it can train and run "
                       "commands on this machine", args.webui_host)
    if args.share:
        logger.warning("share: the page gets a public gradio.live link; anyone with it can use this machine")
    app = Webui(prefill)
    try:
        url = app.launch(args.webui_host, args.webui_port, args.share)
        print(f"lmforge webui{f' ({config_path})' if config_path else ''} at {url} (Ctrl+C to stop)", flush=True)
        app.blocks.block_thread()
    finally:
        app.close()

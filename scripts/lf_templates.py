"""Regenerate lmforge/data/templates.yaml from LLaMA-Factory's template registry.

Run with the Python of a venv that has LLaMA-Factory installed (bench's venv-llamafactory):
    $BENCH_CACHE/venv-llamafactory/bin/python scripts/lf_templates.py lmforge/data/templates.yaml

LLaMA-Factory's registry is read as data (slot strings, flags); lmforge's own keys of an existing
entry (description, family, strip_content, official, notes) are kept, so hand-written facts survive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

LMFORGE_KEYS = ("description", "family", "strip_content", "official", "notes")
KINDS = {"Template": "base", "Llama2Template": "llama2", "ReasoningTemplate": "reasoning",
         "Glm47ReasoningTemplate": "glm47_reasoning"}


def slot_text(slots) -> str:
    """LLaMA-Factory's slot list as one string: sets become {{bos_token}}/{{eos_token}}, dicts their token."""
    out = []
    for slot in slots:
        if isinstance(slot, str):
            out.append(slot)
        elif isinstance(slot, set):  # LLaMA-Factory writes a set only when it names bos_token or eos_token
            out.append("{{bos_token}}" if "bos_token" in slot else "{{eos_token}}" if "eos_token" in slot else "")
        elif isinstance(slot, dict):
            out.append(slot["token"])
        else:
            raise TypeError(slot)
    return "".join(out)


def entry(name: str, template) -> dict:
    """One registry template as a catalogue entry (defaults left out)."""
    e = {}
    e["kind"] = KINDS[type(template).__name__]
    prefix = slot_text(template.format_prefix.slots)
    if prefix:
        e["prefix"] = prefix
    e["system"] = slot_text(template.format_system.slots)
    e["user"] = slot_text(template.format_user.slots)
    e["assistant"] = slot_text(template.format_assistant.slots)
    function = slot_text(template.format_function.slots)
    if function != e["assistant"]:
        e["function"] = function
    observation = slot_text(template.format_observation.slots)
    if observation != e["user"]:
        e["observation"] = observation
    tool_format = getattr(template.format_tools, "tool_format", None)
    if tool_format is None:  # a plain string slot that takes the tools' JSON as it is
        e["tools"] = slot_text(template.format_tools.slots)
        tool_format = template.format_function.tool_format
    if template.format_function.tool_format != tool_format:
        e["function_format"] = template.format_function.tool_format
    e["tool_format"] = tool_format
    if template.default_system:
        e["default_system"] = template.default_system
    if template.stop_words:
        e["stop_words"] = list(template.stop_words)
    if tuple(template.thought_words) != ("<think>\n", "\n</think>\n\n"):
        e["thought_words"] = list(template.thought_words)
    if tuple(template.tool_call_words) != ("<tool_call>", "</tool_call>"):
        e["tool_call_words"] = list(template.tool_call_words)
    for flag in ("efficient_eos", "replace_eos", "replace_jinja_template"):
        if getattr(template, flag):
            e[flag] = True
    if template.enable_thinking is not True:
        e["enable_thinking"] = template.enable_thinking
    plugin = type(template.mm_plugin).__name__
    if plugin != "BasePlugin":
        e["multimodal"] = plugin.replace("Plugin", "").lower()
    return e


def _quoted(dumper, value: str):
    """Strings with line breaks or edge spaces in double quotes, so `\\n` reads as in the source."""
    style = '"' if ("\n" in value or value != value.strip() or "{{" in value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def main(out: str) -> None:
    """Write the catalogue to `out`, keeping lmforge's own keys and hand-maintained entries."""
    from llamafactory.data.template import TEMPLATES

    path = Path(out)
    old = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}
    header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")] if path.exists() else []
    result = {}
    for name, template in TEMPLATES.items():
        if (old.get(name) or {}).get("source") == "lmforge":  # maintained by hand (checked against the official)
            result[name] = old[name]
            continue
        kept = {k: v for k, v in (old.get(name) or {}).items() if k in LMFORGE_KEYS}
        result[name] = {**kept, **entry(name, template)}
    for name, value in old.items():  # lmforge's own entries that LLaMA-Factory lacks
        if name not in result:
            result[name] = value
    yaml.add_representer(str, _quoted, Dumper=yaml.SafeDumper)
    text = yaml.safe_dump(result, allow_unicode=True, sort_keys=False, width=120, default_flow_style=False)
    path.write_text("\n".join(header) + "\n\n" + text, encoding="utf-8")
    print(f"{len(result)} templates written to {path}")


if __name__ == "__main__":
    main(sys.argv[1])

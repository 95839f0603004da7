"""The README's commands stay true: every `lmforge ...` line names a real command, existing files,
and (for train-like commands) options that parse into a valid configuration."""

import re
import shlex
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS
from lmforge.config import parse_train_config

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S) + re.findall(r"`(lmforge [^`]+)`", text)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line)  # FORCE_TORCHRUN=1 ... lmforge
            if line.startswith("lmforge "):
                lines.append(line)
    return sorted(set(lines))


COMMAND_LINES = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMAND_LINES) >= 15


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_readme_command_is_valid(line, tmp_path, monkeypatch):
    argv = shlex.split(line)[1:]
    name = argv[0]
    assert name in COMMANDS, line
    for arg in argv[1:]:
        if arg.endswith(".yaml"):
            assert (ROOT / arg).is_file(), arg
    if name in ("train", "preprocess", "demo", "data") and "--help" not in argv:
        monkeypatch.chdir(ROOT)
        rest = argv[2:] if name == "data" else argv[1:]
        config = parse_train_config(rest)
        assert config.training.output_dir

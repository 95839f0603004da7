"""A command the page runs: its options checked exactly as the CLI checks them, written to a YAML file, and
run by a CommandRunner; refusals come back as the CLI's one-line error."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import LmforgeError
from lmforge.webui.forms import to_yaml
from lmforge.webui.runner import CommandRunner, RunState, RunStatus


def error_line(err: BaseException) -> str:
    """What the CLI prints for a refused command; anything else, as one line (the page never shows a traceback)."""
    if isinstance(err, LmforgeError):
        return f"lmforge: error: {err}"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"error: {type(err).__name__}: {first}"


def validate_export(argv: list[str]) -> Any:
    """`lmforge export`'s own parsing of its options."""
    from lmforge.config.parser import EXPORT_GROUPS, build_groups, merge_sources

    return build_groups(merge_sources(argv)[1], EXPORT_GROUPS)


def validate_train(argv: list[str]) -> Any:
    """`lmforge train`'s own parsing and checking of its options."""
    from lmforge.config.parser import parse_train_config

    return parse_train_config(argv)


def validate_eval(argv: list[str]) -> Any:
    """`lmforge eval`'s own parsing of its options."""
    from lmforge.eval.runner import parse_eval_config

    return parse_eval_config(argv)


class Job:
    """One lmforge command (train, export, eval) run from the page, one at a time."""

    def __init__(self, command: str, validate: Callable[[list[str]], Any], workdir: Path):
        self.command, self.validate, self.workdir = command, validate, workdir
        self.runner = CommandRunner()
        self.options: dict[str, Any] = {}
        self._numbers = itertools.count(1)

    def write(self, options: dict[str, Any]) -> Path:
        """The options as a fresh YAML file in the page's work folder."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.command}-{next(self._numbers)}.yaml"
        path.write_text(to_yaml(options), encoding="utf-8")
        return path

    def check(self, options: dict[str, Any]) -> Path:
        """Write the options and parse them as the CLI would; raises the CLI's LmforgeError."""
        path = self.write(options)
        self.validate([str(path)])
        return path

    def start(self, options: dict[str, Any]) -> str:
        """Check and start the command; the status line (the CLI's one-line error when it refuses)."""
        try:
            path = self.check(options)
            self.runner.start([self.command, str(path)])
        except Exception as err:  # shown on the page as one line, as the CLI would print it
            return error_line(err)
        self.options = options
        return f"running: lmforge {self.command} {path}"

    def stop(self) -> str:
        """Send SIGTERM to the running command."""
        if self.runner.stop():
            return f"stopping: SIGTERM sent to lmforge {self.command} (it finishes the step and saves a checkpoint)"
        return f"no {self.command} is running"

    def status(self) -> RunStatus:
        """The runner's status."""
        return self.runner.status()

    def status_line(self, done: str) -> str:
        """One line for the page: running, `done` when it finished, or how it stopped or failed."""
        status = self.status()
        if status.state in (RunState.RUNNING, RunState.STOPPING):
            return f"{status.state.value}: lmforge {self.command} (log below)"
        if status.state == RunState.FINISHED:
            return done
        return status.message

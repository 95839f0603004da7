"""Run one `lmforge COMMAND CONFIG.yaml` as a subprocess (so a crash never takes the page down) and keep the
tail of its output; Stop sends SIGTERM, on which `lmforge train` saves a checkpoint and says how to resume."""

from __future__ import annotations

import codecs
import enum
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from threading import Lock, Thread

from lmforge.errors import LmforgeError

STOPPED_CODE = 128 + signal.SIGTERM  # what the CLI exits with after a SIGTERM stop
_BREAKS = re.compile(r"(\r\n|\n|\r)")


class RunState(str, enum.Enum):
    """Where a run stands."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


class LogBuffer:
    """The last `max_lines` lines of a process's output; a carriage return (progress bars) rewrites the line."""

    def __init__(self, max_lines: int = 200):
        self.lines: deque[str] = deque([""], maxlen=max_lines)
        self._rewrite = False
        self._lock = Lock()

    def feed(self, text: str) -> None:
        """Add decoded output, which may end in the middle of a line."""
        with self._lock:
            for piece in _BREAKS.split(text):
                if piece in ("\n", "\r\n"):
                    self.lines.append("")
                    self._rewrite = False
                elif piece == "\r":
                    self._rewrite = True
                elif piece:
                    if self._rewrite:
                        self.lines[-1], self._rewrite = "", False
                    self.lines[-1] += piece

    def text(self) -> str:
        """The kept lines, joined."""
        with self._lock:
            return "\n".join(self.lines).rstrip("\n")

    def tail(self, count: int) -> str:
        """The last `count` lines (the empty line after a final newline not counted), joined."""
        with self._lock:
            lines = list(self.lines)
        if lines and not lines[-1]:
            lines.pop()
        return "\n".join(lines[-count:])

    def last_line(self, prefix: str = "") -> str | None:
        """The last non-empty line starting with `prefix`."""
        with self._lock:
            return next((line for line in reversed(self.lines) if line.strip() and line.startswith(prefix)), None)


@dataclass
class RunStatus:
    """A snapshot of a run: its state, exit code and the one line that says how it ended."""

    state: RunState
    returncode: int | None = None
    message: str = ""


class CommandRunner:
    """Runs one `python -m lmforge ARGS` at a time, reading its merged stdout and stderr in a thread."""

    def __init__(self, max_lines: int = 200):
        self.max_lines = max_lines
        self.log = LogBuffer(max_lines)
        self.process: subprocess.Popen | None = None
        self._reader: Thread | None = None
        self._stop_requested = False
        self._lock = Lock()

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.process is not None and self.process.poll() is None

    def start(self, args: list[str]) -> None:
        """Start `python -m lmforge ARGS`; refused while an earlier run is still going."""
        with self._lock:
            if self.running:
                raise LmforgeError("a run is already going: stop it first or wait for it to finish")
            self.log, self._stop_requested = LogBuffer(self.max_lines), False
            self.log.feed(f"$ lmforge {shlex.join(args)}\n")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.process = subprocess.Popen([sys.executable, "-m", "lmforge", *args], stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            self._reader = Thread(target=self._read, args=(self.process, self.log), daemon=True)
            self._reader.start()

    @staticmethod
    def _read(process: subprocess.Popen, log: LogBuffer) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = process.stdout.fileno()
        while chunk := os.read(fd, 4096):
            log.feed(decoder.decode(chunk))
        log.feed(decoder.decode(b"", final=True))
        process.stdout.close()

    def stop(self) -> bool:
        """Send SIGTERM (lmforge train finishes the step, saves a checkpoint and exits); False when idle."""
        if not self.running:
            return False
        self._stop_requested = True
        self.process.send_signal(signal.SIGTERM)
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop a running process and wait for it (killing it after `timeout` seconds): the page is closing."""
        if self.stop():
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def status(self) -> RunStatus:
        """Where the run stands; a run counts as ended once its output is read to the end."""
        if self.process is None:
            return RunStatus(RunState.IDLE)
        code = self.process.poll()
        if code is None or (self._reader is not None and self._reader.is_alive()):
            return RunStatus(RunState.STOPPING if self._stop_requested else RunState.RUNNING)
        if code == 0:
            return RunStatus(RunState.FINISHED, 0)
        if code == -signal.SIGTERM:  # stopped before training had begun: nothing to save
            return RunStatus(RunState.STOPPED, code, "stopped by SIGTERM before the first step; nothing was saved")
        if code == STOPPED_CODE:
            return RunStatus(RunState.STOPPED, code, self.log.last_line("lmforge: stopped") or "stopped by SIGTERM")
        ending = self.log.last_line("lmforge: ") or self.log.last_line() or ""
        return RunStatus(RunState.FAILED, code, f"{ending} (exit code {code})".strip())

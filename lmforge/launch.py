"""The process life cycle: logging and crash reports for every command, `lmforge train` re-launched
through torchrun on several processes or machines, and how a distributed rank ends."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.config import TrainConfig

ENV = {"nproc_per_node": "NPROC_PER_NODE", "nnodes": "NNODES", "node_rank": "NODE_RANK",
       "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}
DEFAULTS = {"nproc_per_node": 1, "nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": 29500}


def inside_launcher() -> bool:
    """Already one of several processes started by torchrun, accelerate or deepspeed."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def launch_settings(config: TrainConfig) -> dict[str, Any] | None:
    """torchrun settings when this command should fan out, else None."""
    if inside_launcher():
        return None
    settings = {}
    for key, env in ENV.items():
        value = getattr(config.launch, key)
        if value is None and env in os.environ:
            value = type(DEFAULTS[key])(os.environ[env])
        settings[key] = value if value is not None else DEFAULTS[key]
    forced = os.environ.get("FORCE_TORCHRUN", "").lower() in ("1", "true")
    if settings["nproc_per_node"] > 1 or settings["nnodes"] > 1 or forced:
        return settings
    return None


def relaunch(settings: dict[str, Any], argv: list[str]) -> int:
    """Run `torchrun ... -m lmforge train ARGV` in this process (torchrun's own entry point)."""
    from torch.distributed.run import main as torchrun

    args = [f"--{key}={value}" for key, value in settings.items()] + ["-m", "lmforge", "train", *argv]
    print(f"lmforge: launching torchrun {' '.join(args)}", file=sys.stderr, flush=True)
    try:
        torchrun(args)
    except SystemExit as done:
        return int(done.code or 0)
    except Exception as err:  # torchrun raises ChildFailedError naming the failed rank
        print(f"lmforge: error: a training process failed: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and notebooks swap it)."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging() -> None:
    """lmforge's INFO lines and everyone's warnings on stderr, known-harmless warnings filtered."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("lmforge").setLevel(logging.INFO)
    # bitsandbytes says on import that an optional speed-up package is missing; 4-bit works without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")
    # torchdata 0.11's StatefulDataLoader (streams read by loader workers) calls an API torch 2.13 deprecated
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_warning()
    else:  # read when transformers is imported: a command that never needs it does not pay ~1-2 s for it
        os.environ["TRANSFORMERS_VERBOSITY"] = "warning"




_LEFT_GROUP: list[bool] = []  # set when this process was one rank of a distributed run


def enable_faulthandler() -> None:
    """A native crash (abort, segfault) still prints every thread's Python stack."""
    try:
        faulthandler.enable()
    except (OSError, ValueError, AttributeError):  # stderr with no file descriptor (captured, replaced)
        pass


def left_process_group() -> bool:
    """Whether this process was a rank of a distributed run whose group `leave_process_group` destroyed."""
    return bool(_LEFT_GROUP)


def leave_process_group() -> None:
    """Tear the process group down while the interpreter is fully alive (see `exit_rank`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _LEFT_GROUP.append(True)


def exit_rank(code: int) -> None:
    """End a distributed rank without interpreter finalization.

    gloo's worker threads can still hold work objects with tensors after destroy_process_group (other
    references keep the group alive); freeing them while the interpreter is torn down aborts the process
    ("terminate called without an active exception", exit -6): a finished rank then fails the whole run,
    or its launcher's exit barrier times out (1 two-node run in 8 under CPU load). atexit handlers
    (logging, trackers) still run first, with output flushed.
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Start `lmforge train` on several processes or machines by re-launching it through torchrun."""

from __future__ import annotations

import os
import sys
from typing import Any

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

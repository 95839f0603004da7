"""Experiment trackers named in report_to: refused before a run starts when their package is missing.

transformers' own integrations do the logging; without this check a missing package surfaces as a
RuntimeError from inside Trainer.__init__, after the model and data have been loaded.
"""

from __future__ import annotations

import importlib.util

from lmforge.errors import LmforgeError

# tracker -> the packages that can serve it (transformers' TensorBoardCallback writes with torch's
# SummaryWriter, which needs tensorboard, or falls back to tensorboardX)
TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "swanlab": ("swanlab",),
}


def requested_trackers(report_to: str | list[str] | None) -> list[str]:
    """The tracker names in report_to; "none" and "all" name none ("all" means the installed ones)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [] if names in (["all"], ["none"]) else names


def check_trackers(report_to: str | list[str] | None) -> None:
    """Raise LmforgeError naming the lmforge extra for the first requested tracker that is not installed.

    Trackers lmforge has no extra for are left to transformers, which knows every integration it has.
    """
    for name in requested_trackers(report_to):
        packages = TRACKER_PACKAGES.get(name)
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise LmforgeError(f"report_to {name} needs the {packages[0]} package: pip install 'lmforge[{name}]'")

"""Checkpoints that are complete or absent: staged in a hidden folder, renamed into place whole,
verified by a manifest on resume, rotated without ever touching the one being resumed from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.cache import file_digest, file_digests
from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)
STAGING = ".staging"
MANIFEST = "lmforge_checkpoint.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Options that may change between a run and its resumption without making it another run.
RESUME_NEUTRAL = {"resume_from_checkpoint", "overwrite_output_dir", "output_dir", "max_steps", "num_train_epochs",
                  "save_steps", "save_total_limit", "logging_steps", "report_to", "preprocessing_num_workers",
                  "overwrite_cache", "plot_loss", "dataloader_num_workers", "nproc_per_node", "nnodes",
                  "node_rank", "master_addr", "master_port", "resume_on_changed_data"}


def config_fingerprint(explicit: dict[str, Any]) -> str:
    """A hash of the options that define the run (what resuming must not change)."""
    defining = {k: str(v) for k, v in explicit.items() if k not in RESUME_NEUTRAL}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def run_fingerprint(explicit: dict[str, Any], data_files: list[Path], deepspeed: Any,
                    world_size: int) -> dict[str, Any]:
    """What a run is besides its options: its data files' contents, its DeepSpeed JSON's content, the lmforge
    version and the number of processes (which sets the global batch). A resume compares each with the
    checkpoint's and names the ones that changed."""
    return {"config": config_fingerprint(explicit), "lmforge": __version__, "world_size": world_size,
            "data": file_digests(data_files),
            "deepspeed": file_digest(deepspeed) if isinstance(deepspeed, str) and Path(deepspeed).is_file() else None}


def write_manifest(folder: Path, fingerprint: dict[str, Any], step: int) -> None:
    """Record every file's size, the step and the run's fingerprint: what resuming verifies."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"step": step, "config": fingerprint.get("config"), "run": fingerprint, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is whole."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (not written by lmforge, or not finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "trainer_state.json is unreadable"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def newest_complete(output_dir: str | Path) -> Path | None:
    """The newest whole checkpoint; damaged newer ones are skipped with a warning naming them."""
    for folder in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def checkpoint_config(folder: Path) -> str | None:
    """The config fingerprint a checkpoint was written with, or None without a readable manifest."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return None


def run_changes(folder: Path, fingerprint: dict[str, Any]) -> list[str]:
    """How this run differs from the one that wrote the checkpoint, beyond its options (empty: not at all, or a
    checkpoint written before lmforge recorded it)."""
    try:
        then = json.loads((folder / MANIFEST).read_text()).get("run")
    except (OSError, json.JSONDecodeError):
        return []
    if not isinstance(then, dict) or "data" not in then:
        return []
    changes = []
    old, new = then.get("data", {}), fingerprint["data"]
    changes += [f"data file {f} changed" for f in sorted(set(old) & set(new)) if old[f] != new[f]]
    changes += [f"data file {f} is new" for f in sorted(set(new) - set(old))]
    changes += [f"data file {f} is no longer read" for f in sorted(set(old) - set(new))]
    if then.get("deepspeed") != fingerprint["deepspeed"]:
        changes.append("the deepspeed config's content changed")
    if then.get("world_size") != fingerprint["world_size"]:
        changes.append(f"it was written by {then.get('world_size')} process(es), this run has "
                       f"{fingerprint['world_size']} (the global batch would change)")
    if then.get("lmforge") != fingerprint["lmforge"]:
        changes.append(f"it was written by lmforge {then.get('lmforge')}, this is {fingerprint['lmforge']}")
    return changes


def check_run_changes(folder: Path, fingerprint: dict[str, Any], allow: bool) -> None:
    """Refuse to resume a checkpoint whose data, DeepSpeed config, lmforge version or process count changed,
    naming each change, unless `resume_on_changed_data` allows it (then a warning names them)."""
    changes = run_changes(folder, fingerprint)
    if not changes:
        return
    if allow:
        logger.warning("resuming from %s although %s (resume_on_changed_data)", folder, "; ".join(changes))
        return
    raise LmforgeError(f"cannot resume from {folder}: {'; '.join(changes)}. Restore them, choose another output_dir, "
                       "or set resume_on_changed_data: true to continue anyway")


def resolve_resume(output_dir: str, requested: str | None, fingerprint: dict[str, Any], overwrite: bool,
                   allow_changes: bool = False) -> str | None:
    """The checkpoint to resume from.

    `auto` (or unset, when output_dir holds checkpoints of the same config) means the newest whole
    checkpoint; a path is used as given. Checkpoints of another config are never resumed silently, nor
    ones whose data, DeepSpeed config, lmforge version or process count changed (unless `allow_changes`).
    """
    if requested and requested not in ("auto", "true", "True"):
        folder = Path(requested)
        problem = checkpoint_problem(folder) if folder.is_dir() else "not a folder"
        if problem and (folder / "trainer_state.json").is_file() and not (folder / MANIFEST).exists():
            return str(folder)  # a checkpoint written by plain transformers: trust it as HF does
        if problem:
            raise LmforgeError(f"resume_from_checkpoint {requested}: {problem}")
        check_run_changes(folder, fingerprint, allow_changes)
        return str(folder)
    if overwrite and not requested:
        return None
    newest = newest_complete(output_dir)
    if newest is None:
        if requested:
            logger.warning("resume_from_checkpoint auto: no whole checkpoint in %s, starting fresh", output_dir)
        return None
    if checkpoint_config(newest) != fingerprint["config"] and not requested:
        raise LmforgeError(
            f"{output_dir} holds checkpoints of a different configuration ({newest.name}): choose another "
            "output_dir, set overwrite_output_dir: true, or resume_from_checkpoint: auto to continue anyway"
        )
    check_run_changes(newest, fingerprint, allow_changes)
    return str(newest)


def unstaged_path(path: str | None, run_dir: Path) -> str | None:
    """A checkpoint path recorded while output_dir pointed at the staging folder, at its final place."""
    if path is None or Path(path).parent != run_dir / STAGING:
        return path
    return str(run_dir / Path(path).name)


def record_best(folder: Path, best: str | None) -> None:
    """Write the final best_model_checkpoint into a checkpoint's trainer_state.json (before its manifest)."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text())
    if state.get("best_model_checkpoint") != best:
        state["best_model_checkpoint"] = best
        state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def move_previous_run(output_dir: str | Path) -> Path | None:
    """Move an overwritten run's checkpoint-N folders into output_dir/previous-run-<UTC time>, never deleting them.

    Left in place, rotation (which keeps the highest steps) would delete the new run's checkpoints and
    `resume_from_checkpoint: auto` would later resume the old run. Only the launch's rank 0 moves them.
    """
    found = checkpoints(output_dir)
    if not found or os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = Path(output_dir) / f"previous-run-{stamp}"
    suffix = 1
    while target.exists():
        target, suffix = Path(output_dir) / f"previous-run-{stamp}-{suffix}", suffix + 1
    target.mkdir()
    for folder in found:
        folder.rename(target / folder.name)
    logger.warning("overwrite_output_dir: moved %d checkpoints of the previous run to %s", len(found), target)
    return target


def rotate(output_dir: str | Path, limit: int | None, protected: set[str]) -> None:
    """Keep the newest `limit` checkpoints, never deleting a protected one (the resume source)."""
    if not limit:
        return
    found = checkpoints(output_dir)
    for folder in found[: max(0, len(found) - limit)]:
        if str(folder.resolve()) in protected:
            continue
        shutil.rmtree(folder, ignore_errors=True)


def ensure_disk_space(folder: Path, needed: int) -> None:
    """Refuse to start a save that cannot finish: nothing is overwritten or deleted first."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise LmforgeError(f"not enough disk to save a checkpoint in {folder}: {free / 2**30:.2f} GiB free, about "
                           f"{needed / 2**30:.2f} GiB needed; free space or lower save_total_limit")


def folder_size(folder: Path) -> int:
    """Bytes in all files under folder: the estimate of the next checkpoint's size."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

"""`host_allocator`: train on the CPU with tcmalloc instead of glibc's malloc.

Activations change shape from batch to batch; glibc keeps the freed blocks in its heap and they fragment, so a
CPU training process's resident memory grows far past what is ever live. LoRA SFT of SmolLM2-135M, 4 x 1,024
tokens, 20 steps, one sitting (bench/RESULTS.md): glibc 9.67 GB at 175.7 tokens/s; tcmalloc 5.61 GB at 169.9;
jemalloc 5.54 GB but at 132.3 (it gives freed pages back after 10 s and faults them in again); the same losses
with each. So auto takes tcmalloc, and jemalloc only when asked. An allocator has to be in place before the
process's first malloc, so it is chosen from the raw options before anything heavy is imported, and
`lmforge train` started as a command re-executes itself once with the library in LD_PRELOAD, as Intel's CPU
training recipes launch theirs; torchrun's workers inherit it. Nothing is preloaded when the library is absent
(auto), when the user's LD_PRELOAD already names an allocator, with release_host_memory (a glibc setting), or when
the run uses a GPU (auto: host memory is not what limits it there).
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import Mapping

from lmforge.config.sources import raw_flag
from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)
MARKER = "LMFORGE_HOST_ALLOCATOR"  # set in the re-executed process: which allocator it was given
CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}
AUTO = "tcmalloc"  # the one that kept the speed (see above)
PACKAGES = {"jemalloc": "libjemalloc2 (Debian/Ubuntu) or jemalloc", "tcmalloc": "libtcmalloc-minimal4 or gperftools"}


def find_library(name: str) -> str | None:
    """The shared library of allocator `name`: in this Python's prefix (conda, venv) or where the loader looks."""
    for stem in LIBRARIES[name]:
        for folder in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
            for found in sorted(folder.glob(f"lib{stem}.so*")):
                return str(found)
        found = ctypes.util.find_library(stem)
        if found:
            return found
    return None


def _uses_gpu(raw: Mapping[str, object], environ: Mapping[str, str]) -> bool:
    """Whether the run will train on an accelerator, judged without importing torch."""
    if raw_flag(raw, "use_cpu") or environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists()


def _mapped(name: str) -> bool:
    """Whether allocator `name` is loaded in this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(f"lib{stem}.so" in maps for stem in LIBRARIES[name])


def _preloaded(environ: Mapping[str, str]) -> bool:
    return any(stem in environ.get("LD_PRELOAD", "") for stems in LIBRARIES.values() for stem in stems)


def choose(raw: Mapping[str, object], environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(allocator, library) to re-execute `lmforge train` with, or None to run with what this process has."""
    choice = str(raw.get("host_allocator", "auto")).lower()
    if choice not in CHOICES or choice == "system" or MARKER in environ or _preloaded(environ):
        return None  # an unknown value is named by the typed config; a preloaded process keeps what it has
    if choice == "auto" and (_uses_gpu(raw, environ) or raw_flag(raw, "release_host_memory")):
        return None
    name = AUTO if choice == "auto" else choice
    library = find_library(name)
    return (name, library) if library else None


def reexec_with_allocator(raw: Mapping[str, object], argv: list[str]) -> None:
    """Replace this process by `python -m lmforge ARGV` with the chosen allocator preloaded (never returns then)."""
    plan = choose(raw, os.environ)
    if plan is None or not sys.platform.startswith("linux"):
        return
    name, library = plan
    env = {**os.environ, MARKER: name, "LD_PRELOAD": " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))}
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no stderr line per tensor over 1 GB
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lmforge", *argv], env)


def report(choice: str, release_host_memory: bool) -> None:
    """Say which allocator this training process runs with; an explicit one that is missing stops the run."""
    given = os.environ.get(MARKER)
    if given in LIBRARIES:
        if _mapped(given):
            logger.info("host memory: %s (%s preloaded; host_allocator: system keeps glibc's malloc)", given,
                        os.environ.get("LD_PRELOAD", "").split()[0])
        else:
            logger.warning("host_allocator: %s was preloaded but is not loaded (the loader refused %s): training "
                           "runs with the C library's malloc", given, os.environ.get("LD_PRELOAD"))
        return
    if choice in LIBRARIES:
        if find_library(choice) is None:
            raise LmforgeError(f"host_allocator: {choice}, but its library is not installed (install "
                               f"{PACKAGES[choice]}), or set host_allocator: auto")
        if not _preloaded(os.environ):
            logger.warning("host_allocator: %s takes effect when `lmforge train` is started as a command, not when "
                           "lmforge.cli.main is called in a running Python process", choice)
    if release_host_memory and _preloaded(os.environ):
        logger.warning("release_host_memory sets glibc's malloc, and this process runs another allocator "
                       "(LD_PRELOAD): it has no effect")

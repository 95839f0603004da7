"""Host-memory settings of glibc's malloc for training on CPU.

One arena: glibc gives each thread that allocates its own heap arena (up to 8 per core), and memory
freed in one arena is not reused by another, so the intra-op threads of a training step each hold
their own high-water mark. One arena (M_ARENA_MAX 1, always on for CPU training) measured 9.7 GB ->
8.3 GB peak RSS at the same speed (LoRA SFT of SmolLM2-135M, 4 x 1024 tokens, bench/RESULTS.md).

Release at once (`release_host_memory: true`): glibc serves a large allocation with mmap and returns it to the OS on free, but after the first such
free it raises its mmap threshold to that size (up to 32 MB), so the next activations of a training
step come from the heap instead. Freed heap memory is kept by the process, and as batch shapes
change from step to step it fragments: peak resident memory grows far past what is ever live.
Fixing the threshold at 1 MB (which also turns off the adjustment) keeps every tensor of 1 MB or
more in its own mapping, released when the tensor is freed. Measured on LoRA SFT of SmolLM2-135M
(4 x 1024 tokens, bench/RESULTS.md): peak RSS 9.7 GB -> 5.6 GB, but each step took 1.6x as long:
every step's activations are page-faulted in afresh. Hence an option, not the default.

MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ set in the environment are the user's choice and left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers
THRESHOLD = 1 << 20

logger = logging.getLogger(__name__)


def _mallopt(param: int, value: int, env: str) -> bool:
    if not sys.platform.startswith("linux") or env in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1


def single_arena() -> bool:
    """Serve every thread's allocations from one arena; False where that is not glibc or the user chose."""
    return _mallopt(M_ARENA_MAX, 1, "MALLOC_ARENA_MAX")


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where that is not glibc or the user chose."""
    done = _mallopt(M_MMAP_THRESHOLD, threshold, "MALLOC_MMAP_THRESHOLD_")
    if done:
        logger.info("release_host_memory: tensors of %d MB or more go back to the OS when freed", threshold >> 20)
    return done

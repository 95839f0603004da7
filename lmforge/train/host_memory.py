"""`release_host_memory`: give freed tensors back to the OS at once when training on CPU (glibc).

glibc serves a large allocation with mmap and returns it to the OS on free, but after the first such
free it raises its mmap threshold to that size (up to 32 MB), so the next activations of a training
step come from the heap instead. Freed heap memory is kept by the process, and as batch shapes
change from step to step it fragments: peak resident memory grows far past what is ever live.
Fixing the threshold at 1 MB (which also turns off the adjustment) keeps every tensor of 1 MB or
more in its own mapping, released when the tensor is freed. Measured on LoRA SFT of SmolLM2-135M
(4 x 1024 tokens, bench/RESULTS.md): peak RSS 9.7 GB -> 5.6 GB, but each step took 1.6x as long:
every step's activations are page-faulted in afresh. Hence an option, not the default.

A MALLOC_MMAP_THRESHOLD_ set in the environment is the user's choice and is left alone.
(MALLOC_ARENA_MAX=1 in the environment gave 8.3 GB once; the same limit set by mallopt at start did
nothing, so lmforge does not set it.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20

logger = logging.getLogger(__name__)


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where that is not glibc or the user chose."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if done:
        logger.info("release_host_memory: tensors of %d MB or more go back to the OS when freed", threshold >> 20)
    return done

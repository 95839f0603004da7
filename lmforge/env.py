"""`lmforge env`: what a bug report needs to know about this machine."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers", "safetensors",
            "deepspeed", "bitsandbytes", "flash-attn", "liger-kernel", "gguf")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    import torch

    lines = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    try:
        import os

        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        lines.append(f"cpu: {os.cpu_count()} cores, {pages * size / 2**30:.1f} GiB memory, "
                     f"torch threads {torch.get_num_threads()}")
    except (ValueError, OSError):
        lines.append(f"cpu: torch threads {torch.get_num_threads()}")
    return lines


def environment_report() -> str:
    """Versions of lmforge, python, torch (and its CUDA), the key packages and the devices, for bug reports."""
    import torch

    from lmforge import __version__

    rows = [f"lmforge {__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    cuda = torch.version.cuda or "none (CPU build)"
    rows += [f"{name} {_version(name)}" + (f", CUDA {cuda}" if name == "torch" else "") for name in PACKAGES]
    rows += _devices()
    return "\n".join(rows)

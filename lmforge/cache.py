"""Where lmforge keeps what it can rebuild: tokenized datasets and de-quantized models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LMFORGE_CACHE, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))

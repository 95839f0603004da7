"""One progress bar style for every eval task: rows done, rows/s, time left."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator


@contextlib.contextmanager
def progress_bar(total: int, what: str) -> Iterator[Any]:
    """A tqdm bar counting rows (its rate reads rows/s) on stderr; closed on exit."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=what, unit="row", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()

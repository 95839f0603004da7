"""Where lmforge keeps what it can rebuild: tokenized datasets, de-quantized models, file digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lmforge.atomic import write_text_atomically

CHUNK = 1 << 20


def cache_root() -> Path:
    """$LMFORGE_CACHE, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def _stat_key(path: Path) -> str:
    # ctime cannot be set by a user: an edit whose mtime was restored (os.utime, `touch -r`, some sync tools)
    # still changes it, so a digest remembered under this key is never stale.
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: list[str | Path]) -> dict[str, str]:
    """A hash of each file's content (by resolved path), each version of a file read once.

    Corpora can be tens of GB in thousands of files, so the digests are remembered in the cache under each
    file's full stat (inode, size, mtime and ctime): a file whose stat is unchanged is not read again, and the
    memo is read once and written at most once per call.
    """
    memo_file = cache_root() / "file-digests.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    digests, changed = {}, False
    for path in (Path(p).resolve() for p in paths):
        key = _stat_key(path)
        entry = memo.get(str(path))
        if entry and entry[0] == key:
            digests[str(path)] = entry[1]
            continue
        digests[str(path)] = _hash_file(path)
        if _stat_key(path) == key:  # not changed while it was read
            memo[str(path)], changed = [key, digests[str(path)]], True
    if changed:
        _write_memo(memo_file, json.dumps(memo))
    return digests


def file_digest(path: str | Path) -> str:
    """A hash of one file's content (see `file_digests`)."""
    return next(iter(file_digests([path]).values()))


def _write_memo(path: Path, text: str) -> None:
    try:
        write_text_atomically(path, text)
    except OSError:
        pass  # a read-only cache only costs hashing again next time

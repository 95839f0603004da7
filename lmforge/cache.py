"""Where lmforge keeps what it can rebuild: tokenized datasets, de-quantized models, file digests."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

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


def file_digest(path: str | Path) -> str:
    """A hash of the file's content, read once per version of the file.

    Corpora can be tens of GB, so the digest is remembered in the cache under the file's full stat
    (inode, size, mtime and ctime); a file whose stat is unchanged is not read again.
    """
    path = Path(path).resolve()
    memo_file = cache_root() / "file-digests.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    key = _stat_key(path)
    entry = memo.get(str(path))
    if entry and entry[0] == key:
        return entry[1]
    digest = _hash_file(path)
    if _stat_key(path) == key:  # not changed while it was read
        memo[str(path)] = [key, digest]
        _write_atomically(memo_file, json.dumps(memo))
    return digest


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs hashing again next time

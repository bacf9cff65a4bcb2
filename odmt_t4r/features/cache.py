"""Content-addressed cache of encoded feature arrays: keys, lookup and atomic commit.

Layout: `<cache_dir>/<modality>/<key>/{<modality>.npy, <modality>_mask.npy, meta.json}`. An entry is
built in a temporary sibling folder and renamed into place whole, so a key that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from odmt_t4r.output_folder import atomic_write

FORMAT_VERSION = 1  # bump when the array layout or the extraction code changes what gets stored


def default_cache_dir() -> Path:
    return Path(os.environ.get("ODMT_CACHE_DIR") or Path.home() / ".cache" / "odmt-t4r" / "features")


def content_key(header: dict, records: Iterable[tuple[int, bytes]]) -> str:
    """sha256 of a JSON header and (item_idx, payload) records, each length-prefixed so no two inputs collide."""
    h = hashlib.sha256()
    head = json.dumps({"format": FORMAT_VERSION, **header}, sort_keys=True).encode()
    h.update(len(head).to_bytes(8, "little") + head)
    for idx, payload in records:
        h.update(int(idx).to_bytes(8, "little", signed=True) + len(payload).to_bytes(8, "little") + payload)
    return h.hexdigest()


def file_bytes_digest(path: str | os.PathLike) -> bytes:
    """The image FILE BYTES decide the key (not its path or mtime), so moving a dataset keeps its cache."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    except OSError as exc:  # missing/unreadable: still a distinct, stable key that changes once the file appears
        return f"<unreadable:{type(exc).__name__}>".encode()


class FeatureCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, modality: str, key: str) -> Path:
        return self.root / modality / key

    def lookup(self, modality: str, key: str) -> Path | None:
        path = self.entry(modality, key)
        return path if (path / "meta.json").is_file() else None

    def staging(self, modality: str) -> Path:
        """A private folder to build an entry in; pass it to `commit` when every file is written."""
        parent = self.root / modality
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))

    def commit(self, staged: Path, modality: str, key: str) -> Path:
        final = self.entry(modality, key)
        os.chmod(staged, 0o755)  # mkdtemp makes it owner-only; a shared cache must stay readable
        try:
            os.rename(staged, final)  # atomic on one filesystem: readers see all of the entry or none
        except OSError:
            if self.lookup(modality, key) is None:
                raise
            shutil.rmtree(staged, ignore_errors=True)  # a concurrent build committed the same key first
        return final


def link_or_copy(src: Path, dst: Path) -> None:
    """Place a cached file at dst atomically: hardlink (no extra disk) or copy across filesystems."""
    def place(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dst, place, fsync=False)  # a hardlink adds no data to flush

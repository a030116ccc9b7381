"""Site-local cache of DICOM headers and preprocessed images, keyed by file content.

Decoding DICOM (often JPEG 2000 or JPEG-LS) and resampling dominate loading, and a federated
run reloads a site's data every round. The cache lives inside the site folder
(``<site>/.fedmsk-cache/``), so nothing leaves the hospital, and is keyed by

- the file's content hash: a re-exported or edited file is decoded again, a renamed one is not;
- ``preprocessing_key(task)`` for images: a different size or spacing gets its own folder, so a
  config change never serves stale arrays (and switching back finds the old ones).

Outcomes that are errors (not DICOM, truncated, ...) are cached too: they are a pure function of
the content and config, and re-decoding a broken file every round only costs time.
MONAI's PersistentDataset keys its files by the item dict (a path), not by content, and cannot
keep a per-record failure, hence this small equivalent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared.dicom import DicomError

CACHE_DIRNAME = ".fedmsk-cache"
# bump when what intake concludes from a file's bytes changes (a reason, a detail, a frame choice):
# cached outcomes, errors included, of older code are then ignored
INTAKE_VERSION = 2


def content_key(path: Path) -> str:
    """Hash of the file's bytes (BLAKE2b, 128 bit), read in 1 MiB chunks: memory stays flat for a large cine."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def combined_key(parts: list[str]) -> str:
    """One key for an outcome made of several files (a CT series), independent of their order."""
    return hashlib.blake2b("\n".join(sorted(parts)).encode(), digest_size=16).hexdigest()


def _atomic_write(path: str | Path, write: Callable[[Any], None], binary: bool) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a cache entry."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class PreprocessCache:
    """Content-keyed store for header facts and preprocessed arrays; ``root=None`` disables it."""

    def __init__(self, root: Path | None, config: dict[str, Any]) -> None:
        config = {**config, "intake": INTAKE_VERSION}
        self.root = root
        self.config_hash = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=8).hexdigest()
        self._root_str = os.fspath(root) if root is not None else ""
        self.hits = 0
        self.misses = 0
        self.disabled_reason = ""
        if root is not None:
            cfg_file = root / self.config_hash / "config.json"
            try:
                if not cfg_file.exists():
                    _atomic_write(cfg_file, lambda fh: json.dump(config, fh, indent=1), binary=False)
            except OSError as exc:  # a read-only export: load without a cache rather than not at all
                self.root = None
                self.disabled_reason = f"no preprocessing cache: cannot write {root} ({exc.strerror or exc})"

    def _entry(self, kind: str, key: str, suffix: str) -> str:
        """An entry's path as a string: pathlib interns every part it parses (``sys.intern``), and the
        content-hash names of thousands of entries a round, read every round, resized CPython's
        interned-string table in each simulation worker (a one-time 15 MB step, bench_scale --trace)."""
        assert self.root is not None
        return os.path.join(self._root_str, kind, key[:2], key + suffix)

    def header(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Header facts of the file with content ``key``; DicomError (cached too) if unreadable."""
        return self._cached_json(f"headers-{INTAKE_VERSION}", key, compute)

    def _cached_json(self, kind: str, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.root is None:
            return compute()
        path = self._entry(kind, key, ".json")
        if os.path.exists(path):
            self.hits += 1
            with open(path) as fh:
                stored = json.load(fh)
        else:
            self.misses += 1
            try:
                stored = {"ok": compute()}
            except DicomError as exc:
                stored = {"error": [exc.reason, exc.detail]}
            self._store(path, lambda fh: json.dump(stored, fh), binary=False)
        if "error" in stored:
            raise DicomError(*stored["error"])
        return stored["ok"]

    def array(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """Preprocessed array for content ``key`` under this config; DicomError (cached) on failure."""
        if self.root is None:
            return compute()
        path = self._entry(self.config_hash, key, ".npy")
        err = self._entry(self.config_hash, key, ".err.json")
        if os.path.exists(path):
            self.hits += 1
            return np.load(path)
        if os.path.exists(err):
            self.hits += 1
            with open(err) as fh:
                raise DicomError(*json.load(fh))
        self.misses += 1
        try:
            arr = compute()
        except DicomError as exc:
            self._store(err, lambda fh: json.dump([exc.reason, exc.detail], fh), binary=False)
            raise
        self._store(path, lambda fh: np.save(fh, arr), binary=True)
        return arr

    def _store(self, path: str, write: Callable[[Any], None], binary: bool) -> None:
        """A full disk costs speed, not the load: the outcome is returned uncached."""
        try:
            _atomic_write(path, write, binary)
        except OSError as exc:
            self.disabled_reason = f"preprocessing cache not written: {exc.strerror or exc}"

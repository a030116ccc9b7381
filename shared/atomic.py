"""Atomic file writes shared by the server's run folder, the model cards and the site's caches.

Temp file in the same folder, fsync, ``os.replace``: a crash leaves the old file or the new one,
never half of either. Lives in ``shared`` because sites (caches, pretraining cards in simulation)
and the server both write this way, and ``shared`` imports nothing above it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())

"""The decoded site splits a ClientApp process keeps between messages, bounded in bytes.

In simulation one Ray worker plays many sites in turn (200 sites on 2 workers: 100 each), and in
deployment one process serves one site for many rounds. Reloading a site from its on-disk decode
cache (shared.cache) costs tens of milliseconds; keeping every site a worker has ever played costs
memory that grows with the federation. An entry-count bound (the former 64-site ``lru_cache``)
bounds neither: 64 small sites are a few MB, 64 CT sites are GBs. This cache keeps the most
recently used splits up to ``max_bytes`` (``federation.site_cache_mb``) and always keeps the one
just loaded, even when it alone is larger, so a deployed site never reloads its own data.

``functools.lru_cache`` and ``cachetools.LRUCache(getsizeof=...)`` count entries or refuse an
entry over the bound; neither keeps the newest one regardless, hence this small class.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import torch


def nbytes(value: Any) -> int:
    """Bytes of the tensors and arrays in ``value`` (datasets, dicts, lists of items), shared views counted each."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    data = getattr(value, "data", None)  # MONAI's Dataset keeps its items in .data
    return nbytes(data) if isinstance(data, (list, tuple, Mapping)) else 0


class ByteBoundedCache:
    """Least-recently-used cache whose entries together stay within ``max_bytes`` (but the newest)."""

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int] = nbytes) -> None:
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()  # Flower may run a node's messages on several threads of one process
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The cached value of ``key``, or ``load()`` kept as the newest entry (older ones evicted to fit)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]
        value = load()  # outside the lock: a slow load does not block another site's hit
        with self._lock:
            self.misses += 1
            self._entries[key] = (value, self.size_of(value))
            self._entries.move_to_end(key)
            self._evict()
        return value

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _evict(self) -> None:
        total = self.bytes
        while len(self._entries) > 1 and total > self.max_bytes:
            _, (_, size) = self._entries.popitem(last=False)
            total -= size

"""bench_scale --trace: memory attribution inside `fedmsk simulate`'s driver (not loaded otherwise).

bench_scale puts this folder first on PYTHONPATH with FEDMSK_BENCH_TRACE=<dir>. In the driver
process only (argv[0] is the `fedmsk` script; Ray's workers inherit the path and skip this), it
starts tracemalloc after round 1 and, once ``server.federation`` is imported, wraps
``Federation.evaluate_round`` so that after every round's validation it writes one JSON line to
<dir>/driver.jsonl: the process RSS, tracemalloc's traced total, the top allocation sites grown
since round 2 and since the previous round (file:line, KiB, blocks), Python's object counts by
type grown since round 2, and, with FEDMSK_BENCH_TRIM=1, the RSS after glibc's malloc_trim(0)
(what the allocator held but had freed).

In a Ray worker (argv names Ray's ``default_worker.py``) it wraps the ClientApp's ``__call__``
instead: tracemalloc from the worker's 150th message, a snapshot every 100 messages, and one JSON
line per snapshot in <dir>/worker-<pid>.jsonl with the traced total and the top allocation sites
grown since message 200 (full tracebacks, oldest frame first).
"""

from __future__ import annotations

import os
import sys

_DIR = os.environ.get("FEDMSK_BENCH_TRACE")
if _DIR and os.path.basename(sys.argv[0] if sys.argv else "") == "fedmsk":
    import ctypes
    import gc
    import json
    import threading
    import time
    import tracemalloc
    from collections import Counter

    # started after round 1 (not at import: tracing torch's import and Ray's start-up costs minutes);
    # the growth of interest is after round 2
    _FRAMES = int(os.environ.get("FEDMSK_BENCH_TRACE_FRAMES", "6"))
    _state: dict = {}
    _FILTERS = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]

    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _top(new, old, n=25):
        stats = new.compare_to(old, "traceback")
        out = []
        for s in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:n]:
            frames = [f"{os.path.relpath(f.filename, os.getcwd()) if not f.filename.startswith('/work') else f.filename}:{f.lineno}"
                      for f in s.traceback][:6]
            out.append({"kib": round(s.size_diff / 1024, 1), "blocks": s.count_diff, "where": frames})
        return out

    def _types() -> Counter:
        return Counter(type(o).__name__ for o in gc.get_objects())

    def _after_round(rnd: int) -> None:
        if rnd < 1:
            return
        if not tracemalloc.is_tracing():
            tracemalloc.start(_FRAMES)
            return
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces(_FILTERS)
        types = _types()
        row = {"round": rnd, "time": time.time(), "rss_mb": _rss() / 2**20,
               "traced_mb": tracemalloc.get_traced_memory()[0] / 2**20}
        if rnd >= 2 and "base" not in _state:
            _state["base"], _state["base_types"] = snap, types
        if "base" in _state and rnd > 2:
            row["since_round2"] = _top(snap, _state["base"])
            row["types_since_round2"] = {k: v for k, v in (types - _state["base_types"]).most_common(20)}
        if "prev" in _state:
            row["since_prev"] = _top(snap, _state["prev"], 10)
        _state["prev"] = snap
        if os.environ.get("FEDMSK_BENCH_TRIM") == "1":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            row["rss_after_trim_mb"] = _rss() / 2**20
        with open(os.path.join(_DIR, "driver.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def _patch() -> None:
        while "server.federation" not in sys.modules or not hasattr(sys.modules["server.federation"], "Federation"):
            time.sleep(0.5)
        fed = sys.modules["server.federation"].Federation
        orig = fed.evaluate_round

        def evaluate_round(self, rnd, arrays, split):
            out = orig(self, rnd, arrays, split)
            if split == "val":
                try:
                    _after_round(rnd)
                except Exception as exc:  # noqa: BLE001 - instrumentation never stops the run
                    print(f"memtrace: {exc!r}", file=sys.stderr)
            return out

        fed.evaluate_round = evaluate_round

    threading.Thread(target=_patch, daemon=True, name="memtrace").start()


if _DIR and any("default_worker.py" in arg for arg in sys.argv):
    import json
    import threading
    import time
    import tracemalloc

    _worker: dict = {"n": 0}

    def _worker_snapshot() -> None:
        n = _worker["n"]
        if n == 150:
            tracemalloc.start(8)
        elif n > 150 and n % 100 == 0:
            snap = tracemalloc.take_snapshot()
            if "base" not in _worker:
                _worker["base"] = snap
                return
            stats = sorted(snap.compare_to(_worker["base"], "traceback"), key=lambda s: s.size_diff, reverse=True)[:8]
            row = {"messages": n, "time": time.time(), "traced_mb": tracemalloc.get_traced_memory()[0] / 2**20,
                   "since_message_200": [{"kib": round(s.size_diff / 1024, 1), "blocks": s.count_diff,
                                          "where": [f"{f.filename}:{f.lineno}" for f in s.traceback]} for s in stats]}
            with open(os.path.join(_DIR, f"worker-{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def _patch_worker() -> None:
        while "client.secagg_app" not in sys.modules or not hasattr(sys.modules["client.secagg_app"], "RoutingClientApp"):
            time.sleep(0.5)
        cls = sys.modules["client.secagg_app"].RoutingClientApp
        orig = cls.__call__

        def call(self, message, context):
            out = orig(self, message, context)
            _worker["n"] += 1
            try:
                _worker_snapshot()
            except Exception as exc:  # noqa: BLE001 - instrumentation never stops the run
                print(f"memtrace: {exc!r}", file=sys.stderr)
            return out

        cls.__call__ = call

    threading.Thread(target=_patch_worker, daemon=True, name="memtrace-worker").start()

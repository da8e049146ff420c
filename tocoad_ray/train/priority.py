"""CPU priority of the threads that make training samples (G's anomalies, the views).

On a CPU node the sample maker and the training step share the cores. At equal priority the
scheduler preempts one of the step's threads whenever the sample maker runs, and the step's
parallel regions wait for that thread: a sample maker needing 0.4 CPU-s per stage-II step slowed
the step of a 2-core node by 0.6 s (2.23 → 2.84 s; 2.44 s at nice 15). At a lower priority it runs
in the step's idle moments instead, and when it falls behind the step waits for data, its threads
sleep, and the sample maker gets the cores. Linux sets nice values per thread, so only the sample
maker's own thread is lowered; elsewhere this is a no-op.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def lower_thread_priority(niceness: int) -> bool:
    """Add ``niceness`` to the calling thread's nice value (capped at 19). Returns whether it applied."""
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(niceness)))
    except OSError:
        return False
    return True


def call_at_lower_priority(fn: Callable[..., T], niceness: int, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` in a fresh thread whose priority is lowered by ``niceness``, so the
    calling thread (a Ray worker's, reused by later tasks) keeps its own; returns or raises as
    ``fn`` does."""
    if niceness <= 0:
        return fn(*args, **kwargs)
    out: dict[str, object] = {}

    def run() -> None:
        lower_thread_priority(niceness)
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    thread = threading.Thread(target=run, name="sample-maker", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]

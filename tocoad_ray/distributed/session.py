"""Joining or starting Ray, one way for every job: ``--address`` / RAY_ADDRESS joins a cluster,
otherwise a local instance sized for the run starts. By default the console shows the jobs' own
lines only: Ray's notices (token authentication, "started a local instance") and the raylet's
warnings ("N python worker processes have been started") are filtered; ``verbose`` shows them
and the workers' own logs."""
from __future__ import annotations

import io
import logging
import os
import re
import sys
from typing import TextIO

LOCAL_TRAIN_POLL_S = "0.25"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# lines the Ray driver prints for the raylet and the autoscaler: "(raylet) ...", "(autoscaler +3s) ..."
_RAY_SYSTEM_LINE = re.compile(r"^\((raylet|autoscaler)\b")


class RaySystemLineFilter(io.TextIOBase):
    """A text stream that drops Ray's raylet/autoscaler lines and passes everything else through."""

    def __init__(self, target: TextIO):
        self.target, self._pending = target, ""
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._pending += s
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line + "\n")
        return len(s)

    def _emit(self, text: str) -> None:
        if _RAY_SYSTEM_LINE.match(_ANSI.sub("", text).lstrip()):
            self.dropped += 1
        else:
            self.target.write(text)

    def flush(self) -> None:
        if self._pending and not _RAY_SYSTEM_LINE.match(_ANSI.sub("", self._pending).lstrip()):
            self.target.write(self._pending)
            self._pending = ""
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


def quiet_console(verbose: bool) -> None:
    """Filter Ray's system lines from this process's stdout (idempotent; nothing when verbose)."""
    if verbose or isinstance(sys.stdout, RaySystemLineFilter):
        return
    sys.stdout = RaySystemLineFilter(sys.stdout)


def connect(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False,
            verbose: bool = False, worker_logs: bool | None = None) -> str:
    """Join ``address`` / RAY_ADDRESS, or start a local Ray instance with ``num_cpus``; returns
    the address joined, "local", or "existing" when this process is already connected.
    ``worker_logs``: forward the workers' output to this console (default: only when verbose)."""
    import ray

    if ray.is_initialized():
        return "existing"
    quiet_console(verbose)
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose else logging.ERROR  # Ray's own logger: notices and warnings
    logs = verbose if worker_logs is None else worker_logs
    if address:
        ray.init(address=address, log_to_driver=logs, logging_level=level)
        return address
    # Ray Train's controller polls its workers every 2 s by default, which adds up to 2 s to each
    # start and end of every stage; on one machine a faster poll costs next to nothing
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_TRAIN_POLL_S)
    # Ray Train starts a PreemptionWatcher actor (a process importing Ray Data) per run to report
    # spot-node preemptions; one machine has none to report
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=logs, logging_level=level)
    return "local"

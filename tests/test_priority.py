"""Sample makers run at a lower CPU priority than the training step (``train/priority.py``), in
their own thread only: the caller's thread (a Ray worker's, reused later) keeps its priority."""
from __future__ import annotations

import os
import sys
import threading

import pytest

from tocoad_ray.config import ConfigError, load_config
from tocoad_ray.train.priority import call_at_lower_priority, lower_thread_priority
from tocoad_ray.train.schedule import prefetched

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux
def test_only_the_sample_thread_is_lowered():
    before = _nice()
    seen = call_at_lower_priority(lambda a, b=0: (_nice(), threading.get_native_id(), a + b), 5, 2, b=3)
    assert seen[0] == min(19, before + 5) and seen[1] != threading.get_native_id() and seen[2] == 5
    assert _nice() == before  # the calling thread keeps its priority
    assert call_at_lower_priority(lambda: _nice(), 0) == before  # 0: runs here, unchanged


def test_errors_reach_the_caller():
    def broken():
        raise ValueError("corrupt image row 7")

    with pytest.raises(ValueError, match="corrupt image row 7"):
        call_at_lower_priority(broken, 10)


@linux
def test_prefetch_thread_is_lowered_and_keeps_order():
    before = _nice()

    def items():
        for i in range(4):
            yield i, _nice()

    got = list(prefetched(items(), niceness=7))
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert all(n == min(19, before + 7) for _, n in got)
    assert _nice() == before


@linux
def test_lowering_is_capped_and_zero_is_a_no_op():
    def lower(n):
        return lower_thread_priority(n), _nice()

    assert call_at_lower_priority(lambda: lower(0), 0) == (False, _nice())
    assert call_at_lower_priority(lambda: lower(50), 1)[1] == 19


@pytest.mark.parametrize("bad", [-1, 20])
def test_niceness_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="sample_niceness"):
        load_config(None, {"compute.sample_niceness": bad})

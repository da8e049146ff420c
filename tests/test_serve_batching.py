"""The model deployments' dynamic batching (``serve.batching.Coalescer``), on a plain asyncio
loop: what arrives while a batch runs is the next batch, one multiplex id per batch, a failure
reaches exactly its batch's requests, and a request that finds the replica idle waits for company."""
from __future__ import annotations

import asyncio

import pytest

from serve.batching import Coalescer


class Recorder:
    def __init__(self, seconds: float = 0.05, fail_on: str | None = None):
        self.batches: list[tuple[str, list[int]]] = []
        self.seconds, self.fail_on = seconds, fail_on

    async def __call__(self, mid: str, items: list[int]) -> list[int]:
        self.batches.append((mid, list(items)))
        await asyncio.sleep(self.seconds)
        if mid == self.fail_on:
            raise RuntimeError(f"model {mid} failed")
        return [i * 10 for i in items]


def test_what_arrives_while_a_batch_runs_is_the_next_batch():
    async def main():
        rec = Recorder(seconds=0.2)
        c = Coalescer(rec, max_batch_size=16, wait_s=0.01)
        first = asyncio.create_task(c.submit("m", 0))
        await asyncio.sleep(0.05)  # the first batch ([0]) is running now
        rest = [asyncio.create_task(c.submit("m", i)) for i in range(1, 21)]
        out = await asyncio.gather(first, *rest)
        return rec.batches, out

    batches, out = asyncio.run(main())
    assert out == [i * 10 for i in range(21)]  # every request gets its own answer, in order
    assert [b for _, b in batches] == [[0], list(range(1, 17)), list(range(17, 21))]  # capped at 16


def test_one_model_per_batch_and_a_failure_stays_in_its_batch():
    async def main():
        rec = Recorder(seconds=0.05, fail_on="bad")
        c = Coalescer(rec, max_batch_size=8, wait_s=0.02)
        tasks = [asyncio.create_task(c.submit(mid, i)) for i, mid in enumerate(["a", "bad", "a", "b", "bad"])]
        return rec.batches, await asyncio.gather(*tasks, return_exceptions=True)

    batches, out = asyncio.run(main())
    assert sorted(batches) == [("a", [0, 2]), ("b", [3]), ("bad", [1, 4])]
    assert out[0] == 0 and out[2] == 20 and out[3] == 30
    assert all(isinstance(out[i], RuntimeError) and "bad failed" in str(out[i]) for i in (1, 4))


def test_an_idle_replica_waits_for_company_and_a_cancelled_request_is_dropped():
    async def main():
        rec = Recorder(seconds=0.01)
        c = Coalescer(rec, max_batch_size=8, wait_s=0.5)  # wide margin for a busy machine
        a = asyncio.create_task(c.submit("m", 1))
        gone = asyncio.create_task(c.submit("m", 2))
        await asyncio.sleep(0.02)
        gone.cancel()  # a client that left before its batch ran
        b = asyncio.create_task(c.submit("m", 3))  # within the idle wait: joins the first batch
        res = await asyncio.gather(a, b)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return rec.batches, res

    batches, res = asyncio.run(main())
    assert batches == [("m", [1, 3])] and res == [10, 30]


def test_the_idle_wait_ends_when_the_last_batchs_clients_are_back():
    """After a batch of 3, an idle replica starts as soon as 3 requests are back (not after the
    whole wait); a request alone after a batch of 1 does not wait at all."""
    async def main():
        rec = Recorder(seconds=0.01)
        c = Coalescer(rec, max_batch_size=8, wait_s=3.0)  # far longer than any step below
        loop = asyncio.get_running_loop()
        # the first batch waits the whole wait (no last batch to go by)
        assert await asyncio.gather(*(c.submit("m", i) for i in (1, 2, 3))) == [10, 20, 30]
        t = loop.time()
        two = [asyncio.create_task(c.submit("m", i)) for i in (4, 5)]
        await asyncio.sleep(0.05)
        third = asyncio.create_task(c.submit("m", 6))
        await asyncio.gather(*two, third)
        back = loop.time() - t
        t = loop.time()
        await c.submit("m", 7)  # alone after a batch of 3: waits the full wait (company was expected)
        alone_after_3 = loop.time() - t
        t = loop.time()
        await c.submit("m", 8)  # alone after a batch of 1: no wait
        alone_after_1 = loop.time() - t
        return rec.batches, back, alone_after_3, alone_after_1

    batches, back, alone_after_3, alone_after_1 = asyncio.run(main())
    assert [b for _, b in batches] == [[1, 2, 3], [4, 5, 6], [7], [8]]
    assert back < 1.5 and alone_after_3 > 2.9 and alone_after_1 < 1.5

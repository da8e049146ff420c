"""Dynamic batching for the model deployments (Backbone, EdgeScorer): plain asyncio, no torch."""
from __future__ import annotations

import asyncio
from typing import Any


class Coalescer:
    """Dynamic batching: a batch is every request that arrived while the previous one ran (up to
    ``max_batch_size``, one multiplex id per batch); only a request that finds the replica idle
    waits for company, at most ``wait_s``, and no longer than it takes as many requests as the
    last batch held to arrive (the clients just answered coming back; a lone client never waits).
    ``@serve.batch`` forms its next batch while the previous one still runs, so under load its
    batches stay as small as the wait lets them be."""

    def __init__(self, run, max_batch_size: int, wait_s: float):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.pending: list[tuple[str, Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._last = max_batch_size  # size of the last batch run (none yet: wait the whole wait)

    async def submit(self, mid: str, item: Any) -> Any:
        if self._worker is None or self._worker.done():  # on the replica's loop, at the first request
            self._arrived = asyncio.Event()
            self._worker = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((mid, item, fut))
        self._arrived.set()
        return await fut

    def _take(self) -> tuple[str, list[tuple[Any, asyncio.Future]]]:
        live = [p for p in self.pending if not p[2].done()]  # a cancelled request leaves the queue
        mid = live[0][0]
        batch = [p for p in live if p[0] == mid][:self.max_batch_size]
        chosen = {id(p) for p in batch}
        self.pending = [p for p in live if id(p) not in chosen]
        return mid, [(item, fut) for _, item, fut in batch]

    async def _company(self) -> None:
        want = min(self._last, self.max_batch_size)
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while sum(not p[2].done() for p in self.pending) < want:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return
            self._arrived.clear()

    async def _loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not any(not p[2].done() for p in self.pending):
                self.pending = []
                continue
            if self.wait_s > 0:  # idle: let others join
                await self._company()
            while self.pending:
                if not any(not p[2].done() for p in self.pending):
                    self.pending = []
                    break
                mid, batch = self._take()
                self._last = len(batch)
                try:
                    results = await self.run(mid, [item for item, _ in batch])
                    for (_, fut), r in zip(batch, results):
                        if not fut.done():
                            fut.set_result(r)
                except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)

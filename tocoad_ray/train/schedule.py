"""Deterministic training schedules: which images each step of an epoch takes and the RNG of every
step and row, pure functions of (seed, stage, epoch), so the single-process trainers and the Ray
pipelines draw the same batches and the same G / view-augmentation randomness."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from .priority import lower_thread_priority

T = TypeVar("T")

STAGE_IDS = {"stage1": 1, "stage2": 2}


def step_rng(seed: int, stage: int, epoch: int, step: int | None = None) -> np.random.Generator:
    """Independent RNG per (seed, stage, epoch[, step]): a fixed seed reproduces a run and a resumed
    run draws exactly the numbers the uninterrupted run would have drawn."""
    key = [int(seed), int(stage), int(epoch)] + ([] if step is None else [int(step)])
    return np.random.default_rng(key)


def steps_per_epoch(n_images: int, batch_size: int, max_steps: int | None) -> tuple[int, int]:
    """(batch size, steps): batch = min(batch_size, N); drop_last; capped by ``max_steps``."""
    if n_images < 2:
        raise ValueError(f"training needs at least 2 images, got {n_images}")
    b = max(2, min(batch_size, n_images))  # BN in D / C needs >= 2 samples
    steps = n_images // b
    if max_steps is not None:
        steps = min(steps, int(max_steps))
    return b, max(1, steps)


def row_rng(seed: int, stage: int, epoch: int, row: int) -> np.random.Generator:
    """The RNG of one training row (image index) in one epoch. Every random draw for a sample (G's
    anomaly, the M view augmentations) comes from it, so a sample depends only on (seed, stage,
    epoch, row): not on the batch it lands in, the worker that makes it, or what ran before."""
    return np.random.default_rng([int(seed), int(stage), int(epoch), _ROW_KEY, int(row)])


_ROW_KEY = 0x524F57  # "ROW": keeps row keys apart from step_rng's (seed, stage, epoch, step) keys


def epoch_rows(n_images: int, batch_size: int, max_steps: int | None, seed: int, stage: int, epoch: int) -> np.ndarray:
    """[steps, batch] image indices of one epoch: a seeded permutation, drop_last, capped steps.
    Step s trains on row ``out[s]``; with W data-parallel workers, worker r takes the r-th of W
    equal slices of it (per-worker batch = global batch / W), so the global batch is the same."""
    b, steps = steps_per_epoch(n_images, batch_size, max_steps)
    order = step_rng(seed, stage, epoch).permutation(n_images)
    return order[: steps * b].reshape(steps, b)


def iter_batches(images: Sequence[np.ndarray], batch_size: int, max_steps: int | None, seed: int, stage: int, epoch: int,
                 make: Callable[[list[np.ndarray], list[np.random.Generator]], dict]) -> Iterator[dict]:
    """Yield the batches of one epoch: ``make(images, rngs)`` with one ``row_rng`` per image.
    Pure function of (seed, stage, epoch): the Ray pipeline builds the same batches."""
    for rows in epoch_rows(len(images), batch_size, max_steps, seed, stage, epoch):
        yield make([images[i] for i in rows], [row_rng(seed, stage, epoch, i) for i in rows])


def prefetched(items: Iterable[T], depth: int = 1, niceness: int = 0) -> Iterator[T]:
    """``items`` made ``depth`` ahead in a background thread, so the next batch's images (G,
    the views) are prepared while the current step runs; same items, same order. An exception in
    the producer is raised here, at the item it stopped at. ``niceness``: that thread's priority
    is lowered by it (``priority.lower_thread_priority``)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        lower_thread_priority(niceness)
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((False, e))

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early (an error in the step): let the producer end


def per_image(rng: np.random.Generator | Sequence[np.random.Generator], n: int) -> list[np.random.Generator]:
    """One RNG per image: a list passes through; a single generator is shared (drawn in order)."""
    if isinstance(rng, np.random.Generator):
        return [rng] * n
    rngs = list(rng)
    if len(rngs) != n:
        raise ValueError(f"need one RNG per image: {n} images, {len(rngs)} RNGs")
    return rngs

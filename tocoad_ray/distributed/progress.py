"""Live progress of a multi-category run: a small named actor that training workers and
category drivers write to and the job's main process reads (stage, epoch, loss, ETA)."""
from __future__ import annotations

import time
from typing import Any


class ProgressBoard:
    """Ray actor (``ray.remote(num_cpus=0)``): the latest state per category."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, category: str, fields: dict[str, Any]) -> None:
        now = time.time()
        s = self.state.get(category, {})
        if fields.get("stage", s.get("stage")) != s.get("stage"):
            s = {}  # a new stage: its own clock
        if fields.get("epoch") and "epoch0" not in s:
            s["epoch0"] = fields["epoch"] - 1  # > 0 when the stage resumed from a checkpoint
            s["t0"] = now - float(fields.get("epoch_seconds") or 0.0)
        s.update(fields, updated=now)
        if s.get("epoch") and s.get("epochs") and "epoch0" in s:
            per_epoch = (now - s["t0"]) / max(1, s["epoch"] - s["epoch0"])
            s["eta_s"] = per_epoch * (s["epochs"] - s["epoch"])
        self.state[category] = s

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.state


def start_board(name: str):
    """The board lives on the job driver's node: it must outlive any worker node, and a board on
    a lost node would take the run's progress with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(ProgressBoard).options(name=name, lifetime="non_detached",
                                                         scheduling_strategy=here).remote()


def report_progress(board_name: str | None, category: str, **fields: Any) -> None:
    """Best effort: progress must never fail a training run."""
    if not board_name:
        return
    try:
        import ray

        ray.get_actor(board_name).update.remote(category, fields)
    except Exception:  # noqa: BLE001 - the board is optional (e.g. a driver run without the job)
        pass


def format_line(category: str, s: dict[str, Any]) -> str:
    """``mono: stage2 epoch 3/10 loss 0.1234 ETA 1m05s``"""
    parts = [f"{category}: {s.get('stage', 'waiting')}"]
    if s.get("epoch") is not None and s.get("epochs"):
        parts.append(f"epoch {s['epoch']}/{s['epochs']}")
    if isinstance(s.get("loss"), (int, float)):
        parts.append(f"loss {s['loss']:.4f}")
    if s.get("eta_s") is not None and s.get("epoch") != s.get("epochs"):
        eta = int(s["eta_s"])
        parts.append(f"ETA {eta // 60}m{eta % 60:02d}s")
    if s.get("message"):
        parts.append(f"({s['message']})")
    return " ".join(parts)

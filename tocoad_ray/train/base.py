"""Common trainer skeleton: epoch loop, scheduler stepping, state_dict / load_state_dict."""
from __future__ import annotations

import math
import time
from typing import Any, Iterable

from .checkpoint import restore_counter
from .seeding import rng_state, set_rng_state


class StageTrainer:
    """Subclasses set ``self.optimizer``, ``self.scheduler``, ``self.cfg``, ``self.scfg`` (stage
    section), ``self.device``, ``self.epoch`` (= finished epochs) and implement ``train_step``,
    ``model_state_dict`` / ``load_model_state_dict`` and ``_schedule_target``."""

    stage: int = 0
    name: str = "stage"

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        """One optimisation step → its metrics (detached scalar tensors or floats)."""
        raise NotImplementedError

    def epoch_end_metrics(self, sums: dict[str, float], steps: int) -> dict[str, Any]:
        return {}

    def train_epoch(self, batches: Iterable[dict[str, Any]], epoch: int) -> dict[str, Any]:
        """Run one epoch over ``batches`` (any iterable of batch dicts), then step the per-epoch LR
        scheduler. ``epoch`` is 0-based; afterwards ``self.epoch == epoch + 1``."""
        if epoch != self.epoch:
            raise ValueError(f"{self.name}: expected epoch {self.epoch}, got {epoch} (resume with load_state_dict)")
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        sums: dict[str, Any] = {}
        steps = 0
        waited = 0.0  # seconds spent waiting for the next batch: > 0 means the data side is the bottleneck
        it = iter(batches)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            waited += time.perf_counter() - t
            if batch is None:
                break
            # metrics stay device tensors until the epoch ends: no host synchronisation per step
            for k, v in self.train_step(batch).items():
                sums[k] = sums[k] + v if k in sums else v
            steps += 1
        if steps == 0:
            raise ValueError(f"{self.name}: epoch {epoch} had no batches")
        means = {k: float(v) / steps for k, v in sums.items()}
        if not math.isfinite(means.get("loss", 0.0)):
            # raised before the epoch is counted or checkpointed: the last saved epoch stays intact
            raise FloatingPointError(f"{self.name}: non-finite loss in epoch {epoch + 1} (mean {means['loss']}); "
                                     "lower the learning rate or check the inputs")
        self.scheduler.step()
        self.epoch = epoch + 1
        return {"stage": self.name, "epoch": self.epoch, "steps": steps, "lr": lr,
                "losses": {k: v for k, v in means.items() if k.startswith("loss")},
                "seconds": time.perf_counter() - t0, "data_wait_s": waited, **self.epoch_end_metrics(means, steps)}

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"model": flat tensor dict, "optimizer", "scheduler", "epoch", "rng"}."""
        return {"model": self.model_state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": int(self.epoch), "rng": rng_state(self.cfg.seed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``. If the configured number of epochs changed (training
        extended), the schedule is re-targeted to the new length and the LR set to its closed form."""
        self.load_model_state_dict({k: v.to(self.device) for k, v in state["model"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(restore_counter(dict(state["scheduler"])))
        self.epoch = int(state["epoch"])
        if self._retarget_schedule():
            for g, lr in zip(self.optimizer.param_groups, self.scheduler._get_closed_form_lr()):
                g["lr"] = lr
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if "rng" in state:
            set_rng_state(state["rng"])

    def _retarget_schedule(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def milestones(epochs: int) -> list[int]:
    """DNP LR decay points: 80 % and 90 % of the epochs (§4.1.3)."""
    return [max(1, int(round(0.8 * epochs))), max(1, int(round(0.9 * epochs)))]


def isfinite(x: float) -> bool:
    return math.isfinite(x)

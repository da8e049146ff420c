"""ASHA with separate rungs per category.

Categories are a grid dimension of ``tocoad tune``, and their scores live on different scales
(a bottle is easier than a metal plate), so one set of rungs would stop every trial of a hard
category. Each category gets its own brackets: a trial is only compared with trials of the same
category at the same number of reports.
"""
from __future__ import annotations

from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler


class PerCategoryASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` whose brackets are chosen by ``trial.config[key]``."""

    def __init__(self, key: str = "category", **asha: Any):
        super().__init__(**asha)
        self._group_key = key
        self._asha_kwargs = dict(asha)
        self._group_brackets: dict[Any, list] = {}

    def on_trial_add(self, tune_controller, trial) -> None:
        group = trial.config.get(self._group_key)
        if group not in self._group_brackets:  # fresh rungs, same settings
            self._group_brackets[group] = AsyncHyperBandScheduler(**self._asha_kwargs)._brackets
        self._brackets = self._group_brackets[group]
        super().on_trial_add(tune_controller, trial)  # records the trial's bracket: later results use it

    def rung_sizes(self) -> dict[Any, list[int]]:
        """Recorded results per rung, per category (for tests and debugging)."""
        return {g: [len(r[1]) for b in brackets for r in b._rungs] for g, brackets in self._group_brackets.items()}

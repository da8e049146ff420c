"""torch RNG state for checkpoints (CPU and CUDA) and module initialisation under a derived seed."""
from __future__ import annotations

from typing import Any, Callable

import torch


def rng_state(seed: int) -> dict[str, Any]:
    state: dict[str, Any] = {"seed": int(seed), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seeded_init(seed: int, salt: int, build: Callable[[], Any]) -> Any:
    """Build modules under a derived seed without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) * 1009 + salt)
        return build()

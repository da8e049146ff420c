"""ReConPatch training loop with resumable, checksummed checkpoints.

``train_reconpatch(cfg, patches, workdir)`` trains ``tocoad_ray.models.reconpatch.ReConPatch`` (g, h) on
patch features with the relaxed contrastive loss against EMA pseudo-labels and returns the
``PatchAdapter`` (g) that the memory bank uses.

Determinism: the model is initialised under ``cfg.seed`` (forked RNG, the global RNG is untouched);
epoch e uses the permutation drawn from a generator seeded by (seed, e), and step s takes its
slice s of that permutation, so the batch sequence depends only on (seed, epoch, step) and a resumed
run continues it exactly. On CPU the same seed reproduces bitwise.

Files under ``workdir``:
* ``train_log.jsonl``: one JSON line per epoch {epoch, loss, mean_w, seconds, steps, lr}
* ``reconpatch/epoch_XXXX.model.safetensors`` / ``.ema.safetensors`` / ``.optim.pt``: per-epoch
  checkpoint (the optimizer state holds only tensors and primitives, loaded with
  ``torch.load(weights_only=True)``), each written to a temporary file and ``os.replace``d;
* ``reconpatch/latest.json``: {epoch, files: {name: sha256}, dims, seed}, written last (atomically),
  so a crash mid-checkpoint leaves the previous checkpoint valid. The two most recent epochs are kept;
* ``reconpatch/adapter.safetensors``: the final g (``PatchAdapter.load``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..artifact import atomic_save_tensors
from ..config import Config
from ..fileio import atomic_write, sha256_file
from ..models.backbone import resolve_device
from ..models.reconpatch import (
    PatchAdapter,
    ReConPatch,
    pseudo_labels,
    relaxed_contrastive_loss,
)
from .checkpoint import CheckpointError

logger = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-2  # AdamW default; ReConPatchConfig has no field for it
KEEP_CHECKPOINTS = 2


# --- checkpoint helpers (own layout, separate from the ToCoAD stage checkpoints; same error type) ---

def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(ckdir: Path, epoch: int, model: ReConPatch, ema: ReConPatch, opt: torch.optim.Optimizer,
                    seed: int) -> None:
    """Write epoch ``epoch``'s model / EMA / optimizer files, then ``latest.json`` (last), then prune."""
    ckdir.mkdir(parents=True, exist_ok=True)
    stem = f"epoch_{epoch:04d}"
    names = {"model": f"{stem}.model.safetensors", "ema": f"{stem}.ema.safetensors", "optim": f"{stem}.optim.pt"}
    atomic_save_tensors(ckdir / names["model"], model.state_dict())
    atomic_save_tensors(ckdir / names["ema"], ema.state_dict())
    opt_sd = _to_cpu(opt.state_dict())
    atomic_write(ckdir / names["optim"], lambda p: torch.save(opt_sd, p))
    meta = {
        "epoch": epoch, "seed": seed,
        "dims": {"in_dim": model.in_dim, "out_dim": model.out_dim, "proj_dim": model.proj_dim},
        "files": {k: {"name": v, "sha256": sha256_file(ckdir / v)} for k, v in names.items()},
    }
    atomic_write(ckdir / "latest.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    for old in sorted(ckdir.glob("epoch_*.model.safetensors"))[:-KEEP_CHECKPOINTS]:
        prefix = old.name.split(".")[0]
        for f in ckdir.glob(prefix + ".*"):
            f.unlink()


def load_checkpoint(ckdir: Path, model: ReConPatch, ema: ReConPatch, opt: torch.optim.Optimizer, seed: int,
                    device: torch.device) -> int:
    """Restore the checkpoint named by ``latest.json`` (checksums verified); returns its epoch, 0 if none."""
    from safetensors.torch import load_file

    meta_path = ckdir / "latest.json"
    if not meta_path.is_file():
        return 0
    try:
        meta = json.loads(meta_path.read_text())
        epoch, files = int(meta["epoch"]), meta["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt {meta_path}: {e}") from e
    dims = {"in_dim": model.in_dim, "out_dim": model.out_dim, "proj_dim": model.proj_dim}
    if meta.get("dims") != dims or meta.get("seed") != seed:
        raise CheckpointError(f"checkpoint in {ckdir} is from a different run (dims {meta.get('dims')}, seed "
                              f"{meta.get('seed')}; now {dims}, seed {seed}); use another workdir or resume=False")
    for key, info in files.items():
        path = ckdir / info["name"]
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is missing or fails its sha256 check")
    model.load_state_dict(load_file(str(ckdir / files["model"]["name"]), device=str(device)))
    ema.load_state_dict(load_file(str(ckdir / files["ema"]["name"]), device=str(device)))
    opt.load_state_dict(torch.load(ckdir / files["optim"]["name"], map_location=device, weights_only=True))
    return epoch


# --- batches ---------------------------------------------------------------------------------------

def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(("reconpatch:" + ":".join(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_plan(n: int, batch_size: int, max_patches: int, seed: int, epoch: int) -> tuple[torch.Tensor, int, int]:
    """(permutation of the patches used in ``epoch``, batch size, steps). Depends only on (seed, epoch)."""
    used = min(n, max_patches)
    bs = min(batch_size, used)
    steps = max(1, used // bs)
    g = torch.Generator().manual_seed(_seed_for(seed, epoch))
    perm = torch.randperm(n, generator=g)[: steps * bs]
    return perm, bs, steps


# --- training --------------------------------------------------------------------------------------

def train_reconpatch(cfg: Config, patches: torch.Tensor, workdir: str | Path, device: str | torch.device = "auto",
                     resume: bool = False, progress: bool = True, log: Callable[[str], None] | None = None
                     ) -> PatchAdapter:
    """Train ReConPatch's g and h on ``patches`` [N, d] (float32; may stay on CPU) and return g as a
    ``PatchAdapter`` (eval mode, on CPU; also saved to ``workdir/reconpatch/adapter.safetensors``).

    Each of ``cfg.reconpatch.epochs`` epochs takes ``min(N, max_patches) // batch_size`` steps over
    disjoint batches of a (seed, epoch)-seeded permutation. Per step: w = pseudo_labels(EMA(φ)),
    loss = relaxed_contrastive_loss(model(φ), w, margin), AdamW step, EMA update. ``resume=True``
    continues from ``workdir/reconpatch/latest.json`` (a finished run returns at once).
    """
    log = log or logger.info
    rc = cfg.reconpatch
    if patches.dim() != 2 or patches.shape[0] < 2:
        raise ValueError(f"patches must be [N >= 2, d], got {tuple(patches.shape)}")
    if rc.batch_size < 2:
        raise ValueError(f"reconpatch.batch_size must be >= 2, got {rc.batch_size}")
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    workdir = Path(workdir)
    ckdir = workdir / "reconpatch"
    ckdir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    n, d = patches.shape

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ReConPatch(d, rc.out_dim, rc.proj_dim)
    model.to(dev).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=WEIGHT_DECAY)

    start = 0
    log_path = workdir / "train_log.jsonl"
    if resume:
        start = load_checkpoint(ckdir, model, ema, opt, cfg.seed, dev)
        if start:
            say(f"reconpatch: resuming after epoch {start}/{rc.epochs}")
    else:
        for f in list(ckdir.glob("epoch_*")) + [ckdir / "latest.json", log_path]:
            if f.exists():
                f.unlink()

    _, bs, steps = epoch_plan(n, rc.batch_size, rc.max_patches, cfg.seed, 1)
    from tqdm.auto import tqdm

    bar = tqdm(total=rc.epochs * steps, initial=min(start, rc.epochs) * steps, disable=not progress,
               desc="reconpatch", unit="step", dynamic_ncols=True)
    try:
        for epoch in range(start + 1, rc.epochs + 1):
            t0 = time.perf_counter()
            perm, bs, steps = epoch_plan(n, rc.batch_size, rc.max_patches, cfg.seed, epoch)
            loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
            w_sum = torch.zeros((), device=dev, dtype=torch.float64)
            for step in range(steps):
                idx = perm[step * bs:(step + 1) * bs].to(patches.device)
                x = patches.index_select(0, idx).to(dev, dtype=torch.float32, non_blocking=True)
                with torch.no_grad():
                    w = pseudo_labels(ema(x), rc.sigma, rc.k, rc.alpha)
                loss = relaxed_contrastive_loss(model(x), w, rc.margin)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"reconpatch: non-finite loss at epoch {epoch} step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(p, 1.0 - rc.ema_decay)  # ē ← decay·ē + (1−decay)·θ
                loss_sum += loss.detach()
                w_sum += (w.sum() - bs) / (bs * (bs - 1))  # off-diagonal mean
                bar.update(1)
                if progress and (step % 10 == 0 or step == steps - 1):
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            rec = {"epoch": epoch, "loss": float(loss_sum) / steps, "mean_w": float(w_sum) / steps,
                   "seconds": round(time.perf_counter() - t0, 4), "steps": steps, "batch_size": bs}
            save_checkpoint(ckdir, epoch, model, ema, opt, cfg.seed)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            say(f"reconpatch epoch {epoch}/{rc.epochs}: loss {rec['loss']:.5f}  mean w {rec['mean_w']:.4f}  "
                f"{rec['seconds']:.2f}s")
    finally:
        bar.close()

    adapter = model.adapter().eval()
    atomic_save_tensors(ckdir / "adapter.safetensors", adapter.state_dict())
    return adapter


__all__ = ["CheckpointError", "epoch_plan", "load_checkpoint", "save_checkpoint", "train_reconpatch"]

"""ToCoAD at the paper's schedule (100 + 100 epochs, batch 16) against frozen-F PatchCore.

Per category and seed, stage I trains D once on the fitting images (the training images minus the
held-out validation share that ``train-all``'s model selection uses); then stage II fine-tunes F
from the same D once per variant (``paper``: the paper's form, ``configs/paper.yaml``; ``default``:
the library's defaults). Every ``--every`` epochs of stage II (and before it: epoch 0 is the
pretrained F, i.e. PatchCore) the bench records

* the test-free validation score of F (the quick bank the tune trials and stage II's
  ``keep_best`` use: held-out normals + anomalies of a generator training never used), and
* F's weights, which afterwards get the full PatchCore treatment: a bank (coreset, same seed)
  over every training image, evaluated on the test split (image / pixel AUROC, AUPRO).

So each curve answers: does F get better with training, when does it peak, and does validation
see the peak. Epoch 0's test metrics are frozen-F PatchCore with the same seed, backbone,
resolution and coreset. The epoch validation picks (``keep_best``) and its test metrics are in the
summary. Runs resume: finished stages and evaluated checkpoints are kept under ``--out``.

    python bench/paper_schedule.py --data DATA_ROOT/mpdd --category metal_plate --seeds 0,1,2
    python bench/paper_schedule.py --data DATA_ROOT/mvtec_ad --category bottle --seeds 0

Prints one JSON line per evaluated checkpoint and a summary; writes ``OUT/<category>/summary.json``
and ``curves.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tocoad_ray.config import build_config  # noqa: E402
from tocoad_ray.data import Preprocess, load_split, read_image  # noqa: E402
from tocoad_ray.artifact import atomic_save_tensors  # noqa: E402
from tocoad_ray.fileio import atomic_write_bytes  # noqa: E402
from tocoad_ray.pipeline import evaluate, fit  # noqa: E402
from tocoad_ray.synth import AnomalyGenerator  # noqa: E402
from tocoad_ray.train.allocator import keep_freed_memory  # noqa: E402
from tocoad_ray.train.bn_folding import unfold_bn  # noqa: E402
from tocoad_ray.train.extractor import build_extractor  # noqa: E402
from tocoad_ray.train.images import prepare_images  # noqa: E402
from tocoad_ray.train.schedule import STAGE_IDS, iter_batches  # noqa: E402
from tocoad_ray.train.seeding import seeded_init  # noqa: E402
from tocoad_ray.train.stage1 import Stage1Trainer, make_stage1_batch  # noqa: E402
from tocoad_ray.train.stage2 import Stage2Trainer, make_stage2_batch  # noqa: E402
from tocoad_ray.train.views import view_augment  # noqa: E402
from tocoad_ray.validation import (  # noqa: E402
    QuickValidator,
    ValidationConfig,
    build_validation_set,
    holdout,
    resolve_generator,
)

# stage II forms compared (overrides of the library's defaults)
VARIANTS = {
    "paper": {"stage2.lr": 0.01, "stage2.contrast": "global", "stage2.preserve": "none", "stage2.crop_scale_min": 0.2},
    "default": {},
    # the default with F's stem, blocks.0 and blocks.1 frozen (stage2.trainable_from)
    "partial": {"stage2.trainable_from": "blocks.2"},
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def base_config(args, seed: int, variant: str):
    ov = {"method": "tocoad", "seed": seed, "data.layout": args.layout, "stage1.epochs": args.stage1_epochs,
          "stage2.epochs": args.stage2_epochs, "stage1.batch_size": 16, "stage2.batch_size": 16,
          "bank.coreset_ratio": args.coreset, **VARIANTS[variant]}
    return build_config({}, ov)


def body_state(extractor) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in extractor.body.state_dict().items()}


def train_seed(args, seed: int, paths: list[Path], out: Path, log) -> dict:
    """Stage I once, then stage II per variant with F saved and validated every ``--every`` epochs."""
    from safetensors.torch import load_file, save_file

    keep_freed_memory()
    cfg0 = base_config(args, seed, "default")
    d = cfg0.distributed
    vcfg = ValidationConfig(fraction=d.select_fraction, min_images=d.select_min_images,
                            max_images=max(ValidationConfig.max_images, d.select_min_images))
    fit_idx, val_idx = holdout(len(paths), vcfg, seed)
    fit_paths = [paths[i] for i in fit_idx]
    f0 = seeded_init(seed, 0, lambda: build_extractor(cfg0))
    pre = Preprocess(cfg0.data, f0.mean, f0.std)
    vset = build_validation_set([paths[i] for i in val_idx], pre, resolve_generator(vcfg, [cfg0.generator.kind]),
                                seed, vcfg.min_anomaly_fraction)
    quick = torch.stack([pre.image(read_image(p)) for p in fit_paths[:vcfg.quick_bank_images]])
    validator = QuickValidator(cfg0, quick, vset)
    imgs = prepare_images(fit_paths, pre)
    gen = AnomalyGenerator.from_config(cfg0.generator)
    info = {"fit_images": len(fit_paths), "held_out": len(val_idx), "val_generator": vset.generator}

    d_file = out / f"seed{seed}" / "stage1_D.safetensors"
    t1 = Stage1Trainer(cfg0, copy.deepcopy(f0), "cpu")
    if d_file.is_file():
        t1.discriminator.load_state_dict(load_file(str(d_file)))
    else:
        t = time.perf_counter()
        losses = []
        for epoch in range(cfg0.stage1.epochs):
            batches = iter_batches(imgs, 16, None, seed, STAGE_IDS["stage1"], epoch,
                                   lambda ims, rng: make_stage1_batch(ims, gen, pre, rng))
            losses.append(t1.train_epoch(batches, epoch)["losses"]["loss"])
        d_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / f"seed{seed}" / "stage1.json", {"losses": losses, "seconds": time.perf_counter() - t})
        save_file(t1.model_state_dict(), str(d_file))
        log(f"seed {seed}: stage I {cfg0.stage1.epochs} epochs in {time.perf_counter() - t:.0f} s")
    disc = t1.discriminator

    for variant in args.variants:
        vdir = out / f"seed{seed}" / variant
        done = vdir / "stage2.json"
        if done.is_file():
            continue
        cfg = base_config(args, seed, variant)
        f = copy.deepcopy(f0)
        t2 = Stage2Trainer(cfg, f, "cpu", discriminator=copy.deepcopy(disc))
        augment = view_augment(cfg, pre.size)
        make2 = lambda ims, rng: make_stage2_batch(ims, pre, rng, cfg.stage2.num_views, augment, gen)  # noqa: E731
        rows, t = [], time.perf_counter()
        for epoch in range(cfg.stage2.epochs + 1):
            if epoch % args.every == 0 or epoch == cfg.stage2.epochs:
                vdir.mkdir(parents=True, exist_ok=True)
                atomic_save_tensors(vdir / f"F_e{epoch:04d}.safetensors", body_state(t2.extractor))
                rows.append({"epoch": epoch, **validator(t2.extractor)})
            if epoch == cfg.stage2.epochs:
                break
            m = t2.train_epoch(iter_batches(imgs, 16, None, seed, STAGE_IDS["stage2"], epoch, make2), epoch)
            rows.append({"epoch": epoch + 1, "losses": m["losses"], "proj_std": m.get("proj_std")})
        unfold_bn(t2.extractor)
        atomic_write_json(done, {"rows": rows, "seconds": time.perf_counter() - t, **info})
        log(f"seed {seed} {variant}: stage II {cfg.stage2.epochs} epochs in {time.perf_counter() - t:.0f} s")
    return info


def test_checkpoints(args, seed: int, out: Path, log) -> None:
    """PatchCore on every saved F: bank over all training images (coreset, this seed), test metrics."""
    for variant in args.variants:
        vdir = out / f"seed{seed}" / variant
        for wfile in sorted(vdir.glob("F_e*.safetensors")):
            res_file = wfile.with_suffix(".test.json")
            if res_file.is_file():
                continue
            epoch = int(wfile.stem.split("_e")[1])
            cfg = build_config(base_config(args, seed, variant).to_dict(),
                               {"method": "patchcore", "backbone.weights": str(wfile)})
            art = vdir / f"artifact_e{epoch:04d}"
            t = time.perf_counter()
            fit(cfg, args.data, args.category, art, progress=False, log=lambda s: None)
            res = evaluate(art, args.data, args.category, layout=args.layout, progress=False)
            row = {"seed": seed, "variant": variant, "epoch": epoch, **{k: float(res[k]) for k in METRICS},
                   "seconds": round(time.perf_counter() - t, 1)}
            atomic_write_json(res_file, row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(art, ignore_errors=True)  # the weights file stays; the bank is rebuilt on demand


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def collect(args, out: Path) -> dict:
    """Curves per variant and seed, the keep_best pick, and the mean over seeds."""
    curves: dict = {}
    for variant in args.variants:
        for seed in args.seeds:
            vdir = out / f"seed{seed}" / variant
            if not (vdir / "stage2.json").is_file():
                continue
            rows = json.loads((vdir / "stage2.json").read_text())["rows"]
            val = {r["epoch"]: r["val_score"] for r in rows if "val_score" in r}
            test = {}
            for f in vdir.glob("F_e*.test.json"):
                r = json.loads(f.read_text())
                test[r["epoch"]] = {k: r[k] for k in METRICS}
            pts = [{"epoch": e, "val_score": val[e], **test.get(e, {})} for e in sorted(val)]
            best = max((p for p in pts if p["epoch"] > 0), key=lambda p: (p["val_score"], -p["epoch"]), default=None)
            last = pts[-1]
            curves.setdefault(variant, {})[seed] = {
                "points": pts, "kept_epoch": best["epoch"] if best else None,
                "kept": {k: best.get(k) for k in ("val_score",) + METRICS} if best else None,
                "last": {k: last.get(k) for k in ("val_score",) + METRICS},
                "patchcore": {k: pts[0].get(k) for k in ("val_score",) + METRICS},
                "selection_ships": ("tocoad" if best and best["val_score"] > pts[0]["val_score"] else "patchcore"),
                "test_peak_epoch": max(pts, key=lambda p: p.get("image_auroc", -1))["epoch"]}
    means = {}
    for variant, by_seed in curves.items():
        for key in ("last", "kept", "patchcore"):
            vals = [s[key] for s in by_seed.values() if s[key]]
            means.setdefault(variant, {})[key] = {m: float(np.mean([v[m] for v in vals if v.get(m) is not None]))
                                                  for m in ("val_score",) + METRICS if vals and all(v.get(m) is not None for v in vals)}
    return {"curves": curves, "means": means}


def plot(summary: dict, category: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tocoad_ray.run_report import save_figure

    panels = ("val_score", "image_auroc", "pixel_auroc", "aupro")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    colours = {"paper": "tab:red", "default": "tab:blue", "partial": "tab:green"}
    for ax, key in zip(axes[0], panels):
        for variant, by_seed in summary["curves"].items():
            for i, (seed, c) in enumerate(sorted(by_seed.items())):
                pts = [(p["epoch"], p[key]) for p in c["points"] if p.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=colours.get(variant), alpha=0.8,
                            label=f"ToCoAD {variant}" if i == 0 else None)
        ax.set_title(f"{category}: {'validation score (test-free)' if key == 'val_score' else 'test ' + key}")
        ax.set_xlabel("stage II epoch (0 = pretrained F: PatchCore)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="data root holding the category folder")
    ap.add_argument("--category", required=True)
    ap.add_argument("--layout", default="mvtec")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="paper,default")
    ap.add_argument("--stage1-epochs", type=int, default=100)
    ap.add_argument("--stage2-epochs", type=int, default=100)
    ap.add_argument("--every", type=int, default=20, help="validate, save and test F every this many stage II epochs")
    ap.add_argument("--coreset", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="runs/paper_schedule")
    ap.add_argument("--report-only", action="store_true", help="summarise and plot what --out holds; train nothing")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out) / args.category
    log = lambda m: print(json.dumps({"log": m}), flush=True)  # noqa: E731
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"settings": {**{k: v for k, v in vars(args).items()}, "commit": commit,
                                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                   "torch": torch.__version__}}), flush=True)
    paths = [s.path for s in load_split(args.data, args.category, args.layout).train]
    t = time.perf_counter()
    for seed in ([] if args.report_only else args.seeds):
        train_seed(args, seed, paths, out, log)
        test_checkpoints(args, seed, out, log)
    summary = {"category": args.category, "commit": commit, "wall_s": round(time.perf_counter() - t, 1),
               **collect(args, out)}
    atomic_write_json(out / "summary.json", summary)
    plot(summary, args.category, out / "curves.png")
    print(json.dumps({"summary": {"means": summary["means"],
                                  "per_seed": {v: {s: {k: c[k] for k in ("kept_epoch", "selection_ships", "test_peak_epoch")}
                                                   for s, c in by.items()} for v, by in summary["curves"].items()}}}),
          flush=True)


if __name__ == "__main__":
    main()

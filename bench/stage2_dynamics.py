"""Stage II dynamics: does the contrastive term learn, and how far does F drift?

Per category: stage I trains D once (frozen F), then each stage II variant fine-tunes a fresh
pretrained F against that D, and every step records

* the losses: L (total), L_sym per stage-II layer, L_neg (D's focal loss on G's samples), L_pres;
* the projector-output std (collapse guard, ≈ 1/sqrt(proj_dim) when healthy);
* on a fixed probe batch (two views of 16 training images, eval mode): cosine similarity of the
  two views of one image ("pos") against views of *other* images ("neg"), pooled (GAP, what the
  paper's C sees) and per patch at corresponding locations (the crop boxes give the pairing; for
  "neg" the same box pair on the next image), for the stage-II layers and the bank layers;
* drift: mean relative change ‖e − e0‖ / ‖e0‖ of the bank's patch embeddings (patch_embed of the
  bank layers) on held-out normal training images, against the pretrained F0.

Prints one JSON document (also written to OUT/dynamics.json) and a PNG of the curves
(OUT/dynamics.png). CPU default: 128 px, 8 stage-I steps, 40 stage-II steps of 16 images.

    python bench/stage2_dynamics.py
    python bench/stage2_dynamics.py --size 224 --steps 2000 --stage1-steps 2000   # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tocoad_ray.bank.embedding import patch_embed  # noqa: E402
from tocoad_ray.config import load_config  # noqa: E402
from tocoad_ray.data import Preprocess, load_split  # noqa: E402
from tocoad_ray.models.backbone import resolve_device  # noqa: E402
from tocoad_ray.synth import AnomalyGenerator  # noqa: E402
from tocoad_ray.train.extractor import build_extractor  # noqa: E402
from tocoad_ray.train.images import prepare_images  # noqa: E402
from tocoad_ray.train.losses import correspondence  # noqa: E402
from tocoad_ray.train.schedule import iter_batches  # noqa: E402
from tocoad_ray.train.seeding import seeded_init  # noqa: E402
from tocoad_ray.train.stage1 import Stage1Trainer, make_stage1_batch  # noqa: E402
from tocoad_ray.train.stage2 import Stage2Trainer, make_stage2_batch  # noqa: E402
from tocoad_ray.train.views import view_augment  # noqa: E402

PAPER = {"stage2.contrast": "global", "stage2.preserve": "none", "stage2.crop_scale_min": 0.2, "stage2.lr": 0.01}
VARIANTS = {  # each is the paper's form with one change (the library default is dense + l2sp β 1, crop 0.5)
    "paper": PAPER,
    "dense": {**PAPER, "stage2.contrast": "dense"},
    "feature": {**PAPER, "stage2.preserve": "feature", "stage2.preserve_weight": 3.0},
    "dense+feature": {**PAPER, "stage2.contrast": "dense", "stage2.preserve": "feature", "stage2.preserve_weight": 3.0},
    "l2sp": {**PAPER, "stage2.preserve": "l2sp", "stage2.preserve_weight": 10.0},
    "default": {"stage2.contrast": "dense", "stage2.preserve": "l2sp", "stage2.preserve_weight": 1.0,
                "stage2.crop_scale_min": 0.5, "stage2.lr": 0.001},
}


def cosine_stats(feats_a: dict, feats_b: dict, box_a: torch.Tensor, box_b: torch.Tensor, layers: list[str]) -> dict:
    """pos / neg cosine similarities, pooled and per corresponding patch, per layer."""
    out = {}
    for l in layers:
        fa, fb = feats_a[l].float(), feats_b[l].float()
        ga, gb = Fn.normalize(fa.mean(dim=(2, 3)), dim=1), Fn.normalize(fb.mean(dim=(2, 3)), dim=1)
        sim = ga @ gb.T
        n = len(sim)
        off = ~torch.eye(n, dtype=torch.bool)
        patch = {}
        for name, shift in (("pos", 0), ("neg", 1)):
            fb_s, bb_s = torch.roll(fb, shift, 0), torch.roll(box_b, shift, 0)
            grid, valid = correspondence(box_a, bb_s, *fa.shape[-2:])
            read = Fn.grid_sample(fb_s, grid, mode="bilinear", padding_mode="border", align_corners=False)
            cos = (Fn.normalize(fa, dim=1) * Fn.normalize(read, dim=1)).sum(1)
            patch[name] = float(cos[valid].mean()) if bool(valid.any()) else float("nan")
        out[l] = {"pooled_pos": float(sim.diag().mean()), "pooled_neg": float(sim[off].mean()),
                  "patch_pos": patch["pos"], "patch_neg": patch["neg"]}
    return out


def run_category(args, category: str, device: torch.device) -> dict:
    overrides = {"method": "tocoad", "seed": args.seed, "data.image_size": args.size, "data.crop_size": None,
                 "stage1.batch_size": args.batch, "stage2.batch_size": args.batch, "stage2.lam": args.lam}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    base = load_config(args.config, overrides)
    split = load_split(args.data, category, base.data.layout)
    paths = [s.path for s in split.train]
    order = np.random.default_rng(args.seed).permutation(len(paths))
    held = [paths[i] for i in order[: args.heldout]]
    train = [paths[i] for i in order[args.heldout:]]

    f0 = seeded_init(base.seed, 0, lambda: build_extractor(base)).to(device).eval()
    pre = Preprocess(base.data, f0.mean, f0.std)
    imgs = prepare_images(train, pre)
    gen = AnomalyGenerator.from_config(base.generator)

    # stage I once: D over the frozen pretrained F
    t = time.perf_counter()
    t1 = Stage1Trainer(base, copy.deepcopy(f0), device)
    done, epoch = 0, 0
    while done < args.stage1_steps:
        batches = iter_batches(imgs, base.stage1.batch_size, args.stage1_steps - done, base.seed, 1, epoch,
                               lambda ims, rngs: make_stage1_batch(ims, gen, pre, rngs))
        m = t1.train_epoch(batches, epoch)
        done += m["steps"]
        epoch += 1
    d_state = {k: v.clone() for k, v in t1.discriminator.state_dict().items()}
    stage1 = {"steps": done, "loss": m["losses"]["loss"], "seconds": time.perf_counter() - t}

    bank_layers = list(base.backbone.layers)
    held_x = torch.stack([pre.image(im) for im in prepare_images(held, pre)]).to(device)
    with torch.no_grad():
        e0 = patch_embed([f0(held_x)[l] for l in bank_layers], base.bank.patch_size)
    probe = make_stage2_batch(imgs[: args.batch], pre, np.random.default_rng(12345), 2, view_augment(base, pre.size))

    result = {"category": category, "n_train": len(train), "n_heldout": len(held), "stage1": stage1, "variants": {}}
    for name in args.variants:
        lr = {} if args.lr is None else {"stage2.lr": args.lr}
        cfg = load_config(args.config, {**overrides, **VARIANTS[name], **lr})
        f = copy.deepcopy(f0)
        d = t1.discriminator
        d.load_state_dict(d_state)
        t2 = Stage2Trainer(cfg, f, device, discriminator=d)
        layers = list(dict.fromkeys(list(cfg.backbone.stage2_layers) + bank_layers))
        augment = view_augment(cfg, pre.size)
        steps, epoch, rows = 0, 0, []
        t = time.perf_counter()
        while steps < args.steps:
            for batch in iter_batches(imgs, cfg.stage2.batch_size, None, cfg.seed, 2, epoch,
                                      lambda ims, rngs: make_stage2_batch(ims, pre, rngs, 2, augment, gen)):
                m = t2.train_step(batch)
                steps += 1
                row = {"step": steps, **{k: float(v) for k, v in m.items()}}
                if steps % args.diag_every == 0 or steps == args.steps:
                    f.eval()
                    with torch.no_grad():
                        fa = f(probe["views"][0].to(device))
                        fb = f(probe["views"][1].to(device))
                        row["cos"] = cosine_stats(fa, fb, probe["boxes"][0].to(device), probe["boxes"][1].to(device), layers)
                        e = patch_embed([f(held_x)[l] for l in bank_layers], base.bank.patch_size)
                        row["drift"] = float(((e - e0).norm(dim=1) / e0.norm(dim=1).clamp_min(1e-12)).mean())
                rows.append(row)
                if steps >= args.steps:
                    break
            epoch += 1
            t2.scheduler.step()  # per-epoch cosine schedule, as train_epoch steps it
            t2.epoch = epoch
        secs = time.perf_counter() - t
        last = [r for r in rows if "drift" in r][-1]
        result["variants"][name] = {"overrides": VARIANTS[name], "seconds": secs, "steps": rows,
                                    "final": {k: last[k] for k in last if k != "step"}}
        sym0, sym1 = rows[0]["loss_sym"], np.mean([r["loss_sym"] for r in rows[-5:]])
        print(f"{category} {name}: L_sym {sym0:.4f} → {sym1:.4f}, drift {last['drift']:.4f}, {secs:.0f}s", file=sys.stderr)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss_sym", "L_sym"), ("loss_neg", "L_neg"), ("gap_pooled", "pooled cos: pos − neg"),
              ("gap_patch", "patch cos: pos − neg (bank layers)"), ("drift", "bank feature drift")]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(4 * len(panels), 3 * len(results)), squeeze=False)
    for r, res in zip(axes, results):
        for ax, (key, title) in zip(r, panels):
            for name, v in res["variants"].items():
                rows = v["steps"]
                if key.startswith("gap"):
                    pts = [(x["step"], _gap(x, key, res)) for x in rows if "cos" in x]
                else:
                    pts = [(x["step"], x[key]) for x in rows if key in x]
                if pts:
                    ax.plot(*zip(*pts), label=name)
            ax.set_title(f"{res['category']}: {title}", fontsize=9)
            ax.set_xlabel("stage II step", fontsize=8)
        r[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _gap(row: dict, key: str, res: dict) -> float:
    cos = row["cos"]
    if key == "gap_pooled":
        layers = [l for l in cos if l not in res["bank_layers"]] or list(cos)
        return float(np.mean([cos[l]["pooled_pos"] - cos[l]["pooled_neg"] for l in layers]))
    return float(np.mean([cos[l]["patch_pos"] - cos[l]["patch_neg"] for l in res["bank_layers"]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--categories", default="mvtec_ad/bottle,mpdd/metal_plate,magnetic_tile/mt")
    ap.add_argument("--variants", default="paper,dense,feature,dense+feature,l2sp")
    ap.add_argument("--config", default=None, help="base config (default: the library defaults)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stage1-steps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="stage II steps per variant")
    ap.add_argument("--lr", type=float, default=None, help="stage II lr for every variant (default: each variant's)")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--diag-every", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every variant")
    ap.add_argument("--out", default="runs/stage2_dynamics")
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for cat in args.categories.split(","):  # "dataset/category" under --data, or a category of --data
        sub, _, name = cat.rpartition("/")
        res = run_category(argparse.Namespace(**{**vars(args), "data": str(Path(args.data) / sub)}), name, device)
        res["bank_layers"] = list(load_config(args.config).backbone.layers)
        results.append(res)
    doc = {"bench": "stage2_dynamics", "device": str(device), "torch_threads": torch.get_num_threads(),
           "platform": platform.platform(), "args": {k: v for k, v in vars(args).items()}, "results": results}
    (out / "dynamics.json").write_text(json.dumps(doc, indent=1))
    plot(results, out / "dynamics.png")
    summary = {r["category"]: {n: {"L_sym_first": v["steps"][0]["loss_sym"], "L_sym_last5": float(np.mean([x["loss_sym"] for x in v["steps"][-5:]])),
                                   "drift": v["final"]["drift"], "seconds": round(v["seconds"], 1)}
                               for n, v in r["variants"].items()} for r in results}
    print(json.dumps({"bench": "stage2_dynamics", "out": str(out), "summary": summary}, indent=1))


if __name__ == "__main__":
    main()

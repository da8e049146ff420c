"""Where scoring time goes, and what the faster options buy: one JSON line per category, then a summary.

    python bench/scoring.py                       # bottle, metal_plate, magnetic_tile; anchor protocol
    python bench/scoring.py --categories mvtec_ad/bottle --batches 16

Per category it fits (or reuses) a PatchCore artifact with ``configs/anchor.yaml`` (256 × 256, Lite0
blocks.2 + blocks.4, 3 × 3, coreset 10 %, b = 9), then splits ms/image at batch 1 and 16 into
decode + preprocess, backbone forward, nearest-neighbour search (eq. 8), eq. 9 (with the exact
re-check of each image's maximum for the IVF index) and the pixel map, for every search option on
the same features in the same run, with image / pixel AUROC and AUPRO of each and the largest
relative difference of its image scores from the exact path's. Medians over ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tocoad_ray.artifact import ArtifactError, read_meta  # noqa: E402
from tocoad_ray.bank.memory_bank import MemoryBank  # noqa: E402
from tocoad_ray.bank.scoring import anomaly_maps, patch_scores, refine_maxima, reweighted_image_scores  # noqa: E402
from tocoad_ray.config import load_config  # noqa: E402
from tocoad_ray.data import load_split, read_image, read_mask  # noqa: E402
from tocoad_ray.metrics import evaluate_scores  # noqa: E402
from tocoad_ray.pipeline import fit, load_detector  # noqa: E402

SEARCHES = {"exact": {"search": "exact"}, "ivf": {"search": "ivf"},
            "sq8": {"search": "exact", "sq8": True}, "sq8+ivf": {"search": "ivf", "sq8": True}}


def _old_maps(s_prime_grid: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """The pixel map by the earlier path (torchvision's 2-D convolution blur), for the baseline row."""
    import torch.nn.functional as Fn
    from torchvision.transforms.functional import gaussian_blur

    from tocoad_ray.bank.scoring import gaussian_kernel_size

    t = Fn.interpolate(torch.as_tensor(s_prime_grid, dtype=torch.float32)[:, None], size=(size, size),
                       mode="bilinear", align_corners=False)
    k = gaussian_kernel_size(sigma)
    return gaussian_blur(t, kernel_size=[k, k], sigma=[sigma, sigma])[:, 0].numpy()


def _median_ms(fn, n_images: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times) / n_images


def artifact_for(data: Path, cat: str, out: Path) -> Path:
    art = out / cat.replace("/", "_")
    try:
        read_meta(art)
        return art
    except ArtifactError:
        pass
    root, name = (data / cat).parent, (data / cat).name
    fit(load_config(ROOT / "configs" / "anchor.yaml"), root, name, art, progress=False, log=lambda m: None)
    return art


def bench_category(data: Path, cat: str, out: Path, batches: list[int], repeats: int, nprobe: int,
                   timing_images: int, options: tuple[str, ...] = tuple(SEARCHES)) -> dict:
    art = artifact_for(data, cat, out)
    root, name = (data / cat).parent, (data / cat).name
    det = load_detector(art)
    cfg, model, pre = det.cfg, det.model, det.preprocess
    split = load_split(root, name, cfg.data.layout)
    samples = split.test
    b = cfg.bank.num_neighbors

    # decode + preprocess, all test images once (timed on the first ones)
    t = time.perf_counter()
    images = torch.stack([pre.image(read_image(s.path)) for s in samples])
    decode_ms = 1000 * (time.perf_counter() - t) / len(samples)
    labels = np.array([s.label for s in samples])
    masks = np.stack([(pre.mask(read_mask(s.mask_path), path=s.mask_path)[0].numpy() > 0.5) if s.mask_path
                      else np.zeros(images.shape[-2:], bool) for s in samples])

    f32 = det.bank.bank
    q = MemoryBank(f32).quantized()
    banks = {k: (MemoryBank(q.bank, search=v["search"], nlist=cfg.bank.ivf_nlist, nprobe=nprobe, sq8=q.sq8)
                 if v.get("sq8") else MemoryBank(f32, search=v["search"], nlist=cfg.bank.ivf_nlist, nprobe=nprobe))
             for k, v in SEARCHES.items() if k in options}
    from tocoad_ray.models.backbone import FeatureExtractor
    from tocoad_ray.patch_model import PatchModel

    eager = PatchModel(FeatureExtractor(det.meta["backbone"]["name"], det.meta["backbone"]["layers"],
                                        cfg.backbone.weights), cfg.bank.patch_size, fast=False)
    res: dict = {"category": cat, "n_test": len(samples), "bank_rows": len(det.bank), "dim": det.bank.dim,
                 "decode_preprocess_ms": decode_ms, "batches": {}}
    for bs in batches:
        sub = images[:max(bs, min(timing_images, len(images)))]
        n_t = len(sub) - len(sub) % bs
        chunks = [sub[i:i + bs] for i in range(0, n_t, bs)]
        model.embed(chunks[0])  # warm-up (and the one-off trace of the fast path)
        eager.embed(chunks[0])
        backbone_ms = _median_ms(lambda: [model.embed(c) for c in chunks], n_t, repeats)
        eager_ms = _median_ms(lambda: [eager.embed(c) for c in chunks], n_t, repeats)
        rows = [model.embed(c) for c in chunks]
        h, w = rows[0][1]
        P = h * w
        entry = {"backbone_ms": backbone_ms, "backbone_eager_ms": eager_ms, "timing_images": n_t, "options": {}}
        for kind, bank in banks.items():
            patch_scores(bank, rows[0][0])  # warm-up
            search_ms = _median_ms(lambda: [patch_scores(bank, r) for r, _ in rows], n_t, repeats)
            found = [patch_scores(bank, r) for r, _ in rows]

            def eq9():
                out = []
                for (r, _), (s, nn) in zip(rows, found):
                    if bank.approximate:
                        s, nn = refine_maxima(bank, r, s, nn, len(r) // P)
                    out.append((reweighted_image_scores(bank, r, s, nn, len(r) // P, b), s))
                return out

            eq9_ms = _median_ms(eq9, n_t, repeats)
            scored = eq9()
            map_ms = _median_ms(lambda: [anomaly_maps(s.reshape(-1, h, w), images.shape[-1], cfg.bank.blur_sigma)
                                          for _, s in scored], n_t, repeats)
            entry["options"][kind] = {"search_ms": search_ms, "eq9_ms": eq9_ms, "map_ms": map_ms,
                                      "total_ms": decode_ms + backbone_ms + search_ms + eq9_ms + map_ms}
            if kind == "exact":  # the earlier path: eager F, exact search, 2-D conv blur
                old_map_ms = _median_ms(lambda: [_old_maps(s.reshape(-1, h, w), images.shape[-1],
                                                           cfg.bank.blur_sigma) for _, s in scored], n_t, repeats)
                entry["options"]["baseline"] = {"search_ms": search_ms, "eq9_ms": eq9_ms, "map_ms": old_map_ms,
                                                "total_ms": decode_ms + eager_ms + search_ms + eq9_ms + old_map_ms}
        res["batches"][str(bs)] = entry

    # accuracy of every option on the whole test split (features once)
    feats = [model.embed(images[i:i + 16])[0] for i in range(0, len(images), 16)]
    acc = {}
    for kind, bank in banks.items():
        scores, maps = [], []
        for r in feats:
            n = len(r) // P
            sc, s = bank.score(r, n, b)
            scores.append(sc)
            maps.append(anomaly_maps(s.reshape(n, h, w), images.shape[-1], cfg.bank.blur_sigma))
        scores = np.concatenate(scores)
        m = evaluate_scores(labels, scores, masks if masks.any() else None, np.concatenate(maps))
        acc[kind] = {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
                     "bank_bytes": int(bank.bank.nbytes), "index_bytes_in_memory": bank.index.nbytes,
                     "scores": scores}
    ref = acc["exact"]["scores"]
    for kind, a in acc.items():
        a["max_rel_score_diff"] = float(np.max(np.abs(a.pop("scores") - ref) / np.abs(ref)))
    res["accuracy"] = acc
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--categories", default="mvtec_ad/bottle,mpdd/metal_plate,magnetic_tile/mt")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timing-images", type=int, default=64, help="test images per timing run")
    ap.add_argument("--nprobe", type=int, default=16, help="IVF cells probed (the bank.ivf_nprobe default)")
    ap.add_argument("--options", default=",".join(SEARCHES),
                    help="search options (exact is always run: the reference); the 8-bit flat scan is slow on big banks")
    ap.add_argument("--out", default="runs/bench_scoring")
    args = ap.parse_args()
    out = Path(args.out)
    settings = {"protocol": "anchor", "config": "configs/anchor.yaml", "torch_threads": torch.get_num_threads(),
                "machine": platform.platform(), "processor": platform.processor(), "nprobe": args.nprobe,
                "repeats": args.repeats}
    results = []
    for cat in args.categories.split(","):
        r = bench_category(Path(args.data), cat, out, [int(x) for x in args.batches.split(",")], args.repeats,
                           args.nprobe, args.timing_images, tuple({"exact", *args.options.split(",")}))
        print(json.dumps({**settings, **r}), flush=True)
        results.append(r)
    summary = {cat["category"]: {bs: {k: round(v["total_ms"], 1) for k, v in e["options"].items()}
                                 for bs, e in cat["batches"].items()} for cat in results}
    print(json.dumps({"summary_total_ms_per_image": summary}))


if __name__ == "__main__":
    main()

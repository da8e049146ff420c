"""Every GPU path of the library on one machine, as one JSON object (under 8 minutes on one GPU).

    python bench/gpu_check.py                          # --data DATA_ROOT --category mvtec_ad/bottle
    python bench/gpu_check.py --quick                  # smaller sizes (about 2 minutes)
    python bench/gpu_check.py --weights random --skip serve_gpu_shard

Checks, each with "status" (pass | fail | skipped, with the reason), "seconds" and its numbers:

* ``process_group``: the training workers' process group (``stages.torch_config(gpu=True)``, nccl
  for CUDA tensors and gloo for CPU ones) carries ``stages.mean_over_workers`` on the GPU and on
  the CPU: two processes on two GPUs when there are two, else a one-process group on one GPU.
* ``stage1_steps`` / ``stage2_steps``: the library's trainers (``stages.build_stage_trainer``)
  take training steps on CUDA on real batches (``make_stage1_batch`` / ``make_stage2_batch``);
  stage II with the paper's ``stage2_layers`` and with layers that stop before EfficientNet's
  last block (its tail must stay frozen and unchanged).
* ``ray_stages``: stage I then stage II in one ``stages.run_stages`` run (Ray TorchTrainer, Ray Data
  samples) with ``use_gpu``: 2 workers when the machine has 2 GPUs or more, else 1; stage II with
  the short ``stage2_layers`` and ``preserve: none`` (the DDP case). Needs Ray.
* ``fp16_bank``: PatchCore ``fit`` + ``evaluate`` (``configs/anchor.yaml``) with the bank
  features in fp16 autocast (``backbone.fast_inference``, the default) and in plain fp32 (TF32
  off): image AUROC within 0.002.
* ``faiss_gpu``: faiss-gpu flat and IVF indexes (``bank.knn.KNNIndex``) return the CPU index's
  neighbours (up to ties) and distances; skipped when faiss-gpu is not installed.
* ``serve_gpu_shard``: the Serve application (``serve.app.build_app``) with its Backbone and
  BankShard replicas on the GPU scores test images as ``pipeline.evaluate`` does on the same
  artifact. Needs Ray Serve (the shards search on CPU when faiss-gpu is missing: reported).

Exit status: 0 when no check failed, 1 when one did, 2 when torch sees no CUDA device (the JSON
says so). Everything but the final JSON goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECKS = ("process_group", "stage1_steps", "stage2_steps", "ray_stages", "fp16_bank", "faiss_gpu", "serve_gpu_shard")
NEEDS_DATA = {"stage1_steps", "stage2_steps", "ray_stages", "fp16_bank", "serve_gpu_shard"}
AUROC_TOL = 0.002
SHORT_LAYERS = ["blocks.2", "blocks.4"]  # stops before Lite0's blocks.5 / blocks.6


class Skip(Exception):
    """A check that cannot run here (a package is missing); not a failure."""


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _finite(values) -> bool:
    return bool(np.all(np.isfinite(np.asarray(list(values), dtype=np.float64))))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- data -------------------------------------------------------------------------------------------
def category_root(args) -> tuple[Path, str]:
    """(root, category) of ``--data``/``--category``, e.g. (data/mvtec_ad, bottle)."""
    path = Path(args.data) / args.category
    if not path.is_dir():
        raise FileNotFoundError(f"category folder {path} not found (--data, --category)")
    return path.parent, path.name


def subset_root(src: Path, dst: Path, n_train: int) -> Path:
    """An MVTec-layout tree of symlinks to files: every k-th of ``n_train`` training images, the
    whole test split and its masks (the AUROC needs every test image)."""
    out = dst / src.name
    train = sorted((src / "train" / "good").iterdir())
    step = max(1, len(train) // n_train)
    files = train[::step][:n_train] + [f for sub in ("test", "ground_truth") for f in sorted((src / sub).rglob("*"))
                                       if f.is_file()]
    for f in files:
        link = out / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
    return dst


# --- process group ----------------------------------------------------------------------------------
def _pg_worker(rank: int, world: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    from tocoad_ray.distributed.stages import mean_over_workers, torch_config

    torch.cuda.set_device(rank)
    dist.init_process_group(torch_config(gpu=True).backend, store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world)
    try:
        values = {"loss": 1.0 + rank, "loss_sym": 4.0 * rank}
        got = {"cuda": mean_over_workers(values, world, torch.device("cuda", rank)),
               "cpu": mean_over_workers(values, world, torch.device("cpu"))}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def check_process_group(ctx: dict) -> dict:
    import torch.distributed as dist

    from tocoad_ray.distributed.stages import torch_config

    backend = torch_config(gpu=True).backend
    n = torch.cuda.device_count()
    if n >= 2:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_pg_worker, args=(2, str(Path(tmp) / "store"), tmp), nprocs=2, join=True)
            got = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
        want = {"loss": 1.5, "loss_sym": 2.0}
        ok = all(g["cuda"] == want and g["cpu"] == want for g in got)
        return {"status": "pass" if ok else "fail", "backend": backend, "processes": 2, "got": got, "want": want}
    # one GPU: a one-process group still has to take a CUDA tensor (nccl) and a CPU one (gloo)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        tg, tc = torch.tensor([1.0, 2.0], device="cuda"), torch.tensor([3.0, 4.0])
        dist.all_reduce(tg)
        dist.all_reduce(tc)
        _sync()
        ok = tg.tolist() == [1.0, 2.0] and tc.tolist() == [3.0, 4.0]
    finally:
        dist.destroy_process_group()
    return {"status": "pass" if ok else "fail", "backend": backend, "processes": 1,
            "note": "one GPU: all-reduce of a CUDA and a CPU tensor in a one-process group (nccl + gloo)"}


# --- trainers on CUDA -------------------------------------------------------------------------------
def train_cfg(args, stage2_layers: list[str] | None = None, preserve: str | None = None):
    from tocoad_ray.config import load_config

    ov = {"method": "tocoad", "seed": 0, "data.image_size": args.train_size, "data.crop_size": None,
          "backbone.weights": args.weights, "stage1.batch_size": args.batch, "stage2.batch_size": args.batch}
    if stage2_layers is not None:
        ov["backbone.stage2_layers"] = stage2_layers
    if preserve is not None:
        ov["stage2.preserve"] = preserve
    return load_config(None, ov)


def _prepared(cfg, paths):
    from tocoad_ray.data import Preprocess
    from tocoad_ray.synth import AnomalyGenerator
    from tocoad_ray.train import build_extractor, prepare_images
    from tocoad_ray.train.seeding import seeded_init

    ex = seeded_init(cfg.seed, 0, lambda: build_extractor(cfg))
    pre = Preprocess(cfg.data, ex.mean, ex.std)
    gen = AnomalyGenerator.from_config(cfg.generator)
    return prepare_images(paths, pre), pre, gen


def _steps(trainer, make: Callable[[int], dict], steps: int) -> dict:
    """Train ``steps`` steps; the first one (cuDNN set-up) is timed apart from the rest."""
    losses = []
    t = time.perf_counter()
    for s in range(steps):
        m = trainer.train_step(make(s))
        losses.append(float(m["loss"]))
        if s == 0:
            _sync()
            first = time.perf_counter() - t
            t = time.perf_counter()
    _sync()
    rest = time.perf_counter() - t
    return {"losses": [round(v, 5) for v in losses], "first_step_s": round(first, 3),
            "ms_per_step": round(1000 * rest / max(1, steps - 1), 1)}


def _rows(n_images: int, batch: int, step: int) -> list[int]:
    return [(step * batch + i) % n_images for i in range(batch)]


def check_stage1(ctx: dict) -> dict:
    from tocoad_ray.distributed.stages import build_stage_trainer
    from tocoad_ray.train import make_stage1_batch
    from tocoad_ray.train.schedule import row_rng

    args = ctx["args"]
    cfg = train_cfg(args)
    images, pre, gen = _prepared(cfg, ctx["train_paths"])
    dev = ctx["device"]
    t1 = build_stage_trainer(cfg, 1, dev)
    on_cuda = all(p.device.type == dev.type for p in t1.discriminator.parameters())

    def make(step):
        rows = _rows(len(images), args.batch, step)
        return make_stage1_batch([images[r] for r in rows], gen, pre, [row_rng(cfg.seed, 1, 0, r) for r in rows])

    r = _steps(t1, make, args.steps)
    ctx["stage1_d"] = {k: v.detach().cpu() for k, v in t1.discriminator.state_dict().items()}
    ok = on_cuda and _finite(r["losses"])
    return {"status": "pass" if ok else "fail", "image_size": args.train_size, "batch": args.batch,
            "steps": args.steps, "d_on_cuda": on_cuda, **r}


def check_stage2(ctx: dict) -> dict:
    from tocoad_ray.distributed.stages import build_stage_trainer
    from tocoad_ray.train import build_extractor, make_stage2_batch
    from tocoad_ray.train.schedule import row_rng
    from tocoad_ray.train.seeding import seeded_init
    from tocoad_ray.train.stage1 import build_discriminator
    from tocoad_ray.train.views import view_augment

    args = ctx["args"]
    dev = ctx["device"]
    out: dict[str, Any] = {"image_size": args.train_size, "batch": args.batch, "steps": args.steps, "variants": {}}
    ok = True
    base_layers = train_cfg(args).backbone.stage2_layers
    for name, layers, preserve in (("paper_layers_l2sp", None, "l2sp"), ("short_layers_none", SHORT_LAYERS, "none"),
                                   ("short_layers_feature", SHORT_LAYERS, "feature")):
        cfg = train_cfg(args, layers, preserve)
        images, pre, gen = _prepared(cfg, ctx["train_paths"])
        if ctx.get("stage1_d") is not None and cfg.backbone.stage2_layers == base_layers:
            d_state, d_from = ctx["stage1_d"], "stage1_steps"
        else:  # D over this variant's levels of F, as stage I would start it
            d_state = build_discriminator(cfg, seeded_init(cfg.seed, 0, lambda: build_extractor(cfg))).state_dict()
            d_from = "fresh"
        t2 = build_stage_trainer(cfg, 2, dev, d_state)
        before = {n: p.detach().clone() for n, p in t2.extractor.named_parameters()}
        augment = view_augment(cfg, pre.size)

        def make(step):
            rows = _rows(len(images), args.batch, step)
            return make_stage2_batch([images[r] for r in rows], pre, [row_rng(cfg.seed, 2, 0, r) for r in rows],
                                     cfg.stage2.num_views, augment, gen)

        r = _steps(t2, make, args.steps)
        frozen = [n for n, p in t2.extractor.named_parameters() if not p.requires_grad]
        frozen_same = all(torch.equal(p, before[n]) for n, p in t2.extractor.named_parameters() if n in frozen)
        trained = any(not torch.equal(p, before[n]) for n, p in t2.extractor.named_parameters())
        on_cuda = all(p.device.type == dev.type for p in t2.net.parameters())
        tail = sorted({".".join(n.split(".")[1:3]) for n in frozen})
        v_ok = on_cuda and trained and frozen_same and _finite(r["losses"])
        if layers == SHORT_LAYERS:  # Lite0's blocks after blocks.4 feed no loss: frozen
            v_ok = v_ok and tail == ["blocks.5", "blocks.6"]
        out["variants"][name] = {"ok": v_ok, "stage2_layers": cfg.backbone.stage2_layers, "preserve": preserve,
                                 "discriminator": d_from, "frozen_modules": tail, "frozen_unchanged": frozen_same,
                                 "f_trained": trained, **r}
        ok = ok and v_ok
        del t2
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["status"] = "pass" if ok else "fail"
    return out


# --- Ray Train ---------------------------------------------------------------------------------------
def _ray(ctx: dict):
    try:
        import ray
    except ImportError as e:
        raise Skip(f"ray not installed ({e})")
    if not ray.is_initialized():
        ray.init(num_cpus=min(16, os.cpu_count() or 2), num_gpus=torch.cuda.device_count(), include_dashboard=False,
                 log_to_driver=False, object_store_memory=2 << 30)
        ctx["ray_started"] = True
    return ray


def check_ray_stages(ctx: dict) -> dict:
    _ray(ctx)
    from tocoad_ray.config import replace
    from tocoad_ray.distributed.samples import SampleSpec, decode_images, image_store
    from tocoad_ray.distributed.stages import run_stages
    from tocoad_ray.train import build_extractor
    from tocoad_ray.train.seeding import seeded_init

    args = ctx["args"]
    gpus = ctx["gpus"]
    workers = 2 if gpus >= 2 else 1
    cfg = train_cfg(args, SHORT_LAYERS, "none")
    cfg.stage1 = replace(cfg.stage1, epochs=2, max_steps_per_epoch=2)
    cfg.stage2 = replace(cfg.stage2, epochs=2, max_steps_per_epoch=2)
    cfg.distributed = replace(cfg.distributed, num_workers=workers, use_gpu=gpus > 0, gpus_per_worker=1.0,
                              cpus_per_worker=1.0, data_cpus=0.5, data_tasks=1, max_failures=0)
    paths = ctx["train_paths"]
    ex = seeded_init(cfg.seed, 0, lambda: build_extractor(cfg))
    t = time.perf_counter()
    store = image_store(decode_images(paths, cfg, ex.mean, ex.std), len(paths))
    decode_s = time.perf_counter() - t
    storage = Path(ctx["tmp"]) / "ray_storage"
    res = run_stages(cfg, [1, 2], "gpu_check", store, len(paths),  # one worker group, as train-all runs them
                     {s: SampleSpec.build(cfg, s, ex.mean, ex.std) for s in (1, 2)}, str(storage))
    r1, r2 = res[1], res[2]
    out = {"workers": workers, "gpus": gpus, "use_gpu": gpus > 0, "stage2_layers": SHORT_LAYERS, "preserve": "none",
           "decode_s": round(decode_s, 2)}
    ok = True
    for name, r, scfg in (("stage1", r1, cfg.stage1), ("stage2", r2, cfg.stage2)):
        losses = [h["losses"]["loss"] for h in r.history]
        s_ok = len(r.history) == scfg.epochs and _finite(losses) and all(h["workers"] == workers for h in r.history)
        out[name] = {"ok": s_ok, "epochs": len(r.history), "losses": [round(v, 5) for v in losses],
                     "epoch_s": [round(h["seconds"], 2) for h in r.history], "train_s": round(r.seconds, 1),
                     "run_wall_s": round(r.run_seconds, 1)}
        ok = ok and s_ok
    out["status"] = "pass" if ok else "fail"
    return out


# --- fp16 bank features ------------------------------------------------------------------------------
def check_fp16_bank(ctx: dict) -> dict:
    from tocoad_ray.config import load_config
    from tocoad_ray.pipeline import evaluate, fit

    args = ctx["args"]
    root, category = ctx["eval_root"], ctx["category"]
    out: dict[str, Any] = {"config": "configs/anchor.yaml", "category": args.category,
                           "n_train": len(ctx["train_paths"]), "tolerance": AUROC_TOL}
    res = {}
    for mode, fast in (("fp16", True), ("fp32", False)):
        cfg = load_config(ROOT / "configs" / "anchor.yaml", {
            "backbone.weights": args.weights, "backbone.fast_inference": fast, "bank.device": ctx["device"].type,
            **args.fit_overrides})
        art = Path(ctx["tmp"]) / f"artifact_{mode}"
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        if mode == "fp32":  # a true fp32 reference
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            t = time.perf_counter()
            meta = fit(cfg, root, category, art, progress=False, log=lambda m: None)
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            ev = evaluate(art, root, category, progress=False, return_arrays=True)
            eval_s = time.perf_counter() - t
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        res[mode] = ev
        out[mode] = {"image_auroc": ev["image_auroc"], "pixel_auroc": ev["pixel_auroc"], "aupro": ev["aupro"],
                     "bank_size": meta["bank_size"], "device": meta["device"], "fit_s": round(fit_s, 1),
                     "features_s": round(meta["timings"]["features_s"], 2),
                     "coreset_s": round(meta["timings"]["coreset_s"], 2), "evaluate_s": round(eval_s, 1),
                     "ms_per_image": round(ev["ms_per_image"], 2)}
        ctx[f"artifact_{mode}"] = art
    ctx["reference_fp16"] = res["fp16"]
    d = abs(res["fp16"]["image_auroc"] - res["fp32"]["image_auroc"])
    out["image_auroc_diff"] = d
    out["pixel_auroc_diff"] = (abs(res["fp16"]["pixel_auroc"] - res["fp32"]["pixel_auroc"])
                               if res["fp16"]["pixel_auroc"] is not None else None)
    out["n_test"] = res["fp16"]["n_test"]
    out["status"] = "pass" if d <= AUROC_TOL else "fail"
    return out


# --- faiss-gpu ---------------------------------------------------------------------------------------
def _faiss_gpu():
    try:
        import faiss
    except ImportError as e:
        raise Skip(f"faiss not installed ({e})")
    if not hasattr(faiss, "StandardGpuResources"):
        raise Skip("faiss-gpu not installed (this faiss has no StandardGpuResources)")
    return faiss


def _compare(cpu: tuple[np.ndarray, np.ndarray], gpu: tuple[np.ndarray, np.ndarray], queries: np.ndarray,
             bank: np.ndarray, allowed_rows: float) -> dict:
    """Same neighbours up to ties: an id may differ only where its distance equals the CPU one at
    that rank (equally near rows exchanged), and the GPU's distances are those of its ids.
    ``allowed_rows``: the share of query rows that may differ otherwise (IVF: the GPU assigns the
    bank rows to cells itself, and a row equally near two centroids may land in the other cell)."""
    (dc, ic), (dg, ig) = cpu, gpu
    floor = 1e-3 * float(np.median(dc)) + 1e-12  # relative differences, but not of near-zero distances
    rel = np.abs(dg - dc) / np.maximum(dc, floor)
    differ = ig != ic
    bad_rows = (differ & (rel > 1e-4)).any(1)
    good = rel[~bad_rows]
    max_rel = float(good.max()) if good.size else float("inf")
    own = np.sqrt(np.stack([((bank[ig[:, j]] - queries) ** 2).sum(1) for j in range(ig.shape[1])], 1))
    own_rel = float(np.max(np.abs(own - dg) / np.maximum(own, floor)))
    return {"id_match": float(1.0 - differ.mean()), "rows_not_ties": float(bad_rows.mean()),
            "allowed_rows": allowed_rows, "max_rel_dist_diff": max_rel, "max_rel_own_dist_diff": own_rel,
            "ok": bool(bad_rows.mean() <= allowed_rows and max_rel <= 1e-3 and own_rel <= 1e-3)}


def check_faiss_gpu(ctx: dict) -> dict:
    faiss = _faiss_gpu()
    from tocoad_ray.bank.knn import KNNIndex, faiss_gpu_available

    if not faiss_gpu_available():
        return {"status": "fail", "error": f"faiss-gpu is installed but sees {faiss.get_num_gpus()} GPUs"}
    args = ctx["args"]
    rng = np.random.default_rng(0)
    art = ctx.get("artifact_fp32")
    if art is not None:  # the real bank, queries near its rows
        from tocoad_ray.artifact import load_tensors

        bank = np.ascontiguousarray(load_tensors(Path(art) / "bank.safetensors")["bank"], dtype=np.float32)
        queries = (bank[rng.integers(0, len(bank), args.queries)]
                   + rng.normal(scale=0.05 * bank.std(), size=(args.queries, bank.shape[1]))).astype(np.float32)
        source = "fp32 artifact bank (queries: bank rows + noise)"
    else:
        bank = rng.normal(size=(args.bank_rows, 128)).astype(np.float32)
        queries = rng.normal(size=(args.queries, 128)).astype(np.float32)
        source = "random"
    out: dict[str, Any] = {"bank": list(bank.shape), "queries": len(queries), "source": source, "k": 9}
    ok = True
    for kind in ("exact", "ivf"):
        cpu = KNNIndex(bank, use_gpu=False, kind=kind)
        gpu = KNNIndex(bank, use_gpu=True, kind=kind)
        t = time.perf_counter()
        rc = cpu.search(queries, 9)
        cpu_s = time.perf_counter() - t
        gpu.search(queries[:16], 9)  # warm-up
        t = time.perf_counter()
        rg = gpu.search(queries, 9)
        gpu_s = time.perf_counter() - t
        c = _compare(rc, rg, queries, bank, 0.0 if kind == "exact" else 1e-3)
        c.update(index=gpu.kind, on_gpu=gpu.on_gpu, cpu_search_s=round(cpu_s, 4), gpu_search_s=round(gpu_s, 4))
        if kind == "ivf":
            c.update(nlist=int(cpu.index.nlist), nprobe=int(cpu.index.nprobe))
        c["ok"] = c["ok"] and gpu.on_gpu and gpu.kind == kind
        out["flat" if kind == "exact" else "ivf"] = c
        ok = ok and c["ok"]
    out["status"] = "pass" if ok else "fail"
    return out


# --- the Serve application with GPU replicas ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serve(ctx: dict) -> dict:
    art, ref = ctx.get("artifact_fp16"), ctx.get("reference_fp16")
    if art is None:
        raise Skip("needs the fp16_bank check's artifact")
    if ctx["args"].weights == "random":  # replicas rebuild F from backbone.weights: a random F differs
        raise Skip("--weights random: the service cannot rebuild a random backbone; use pretrained weights or a file")
    _ray(ctx)
    try:
        import httpx
        from ray import serve

        from serve.app import build_app
    except ImportError as e:
        raise Skip(f"the service's packages are missing ({e})")
    from tocoad_ray.bank.knn import faiss_gpu_available
    from tocoad_ray.data import load_split, read_image
    from tocoad_ray.pipeline import load_detector

    args = ctx["args"]
    paths = [s.path for s in load_split(ctx["eval_root"], ctx["category"], "mvtec").test][:args.serve_images]
    # the library's scores of the same artifact on this GPU, one image per forward like the service's
    det = load_detector(art)
    want = np.asarray([det.score(det.preprocess.image(read_image(p))[None])[0][0] for p in paths], dtype=np.float64)
    del det
    evaluated = np.asarray(ref["_arrays"]["scores"][:len(paths)], dtype=np.float64)
    port = _free_port()
    gpu = 0.25 if ctx["gpus"] else 0.0  # replicas share the GPU
    service = {"products": [{"name": "gpu", "artifact": str(art), "shards": 2}], "poll_interval_s": 1.0,
               "backbone": {"num_cpus": 0.5, "num_gpus": gpu, "min_replicas": 1, "max_replicas": 1},
               "shards": {"num_cpus": 0.25, "num_gpus": gpu, "min_replicas": 1, "max_replicas": 1},
               "ingress": {"num_cpus": 0.25}, "registry": {"num_cpus": 0.1}}
    t = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(service), name="gpu_check", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 180
        while (ready := client.get("/readyz")).status_code != 200:
            states = {p["state"] for p in ready.json().get("products", [])}
            if time.monotonic() > deadline or "unavailable" in states:
                return {"status": "fail", "error": "the product did not become ready", "ready": ready.json()}
            time.sleep(0.5)
        start_s = time.perf_counter() - t
        snap = serve.get_deployment_handle("Registry", app_name="gpu_check").snapshot.remote().result()
        info = snap["products"]["gpu"]
        shard_h = serve.get_deployment_handle("BankShard", app_name="gpu_check")
        shards = [shard_h.options(multiplexed_model_id=s["id"]).info.remote(info["bank_source"]).result()
                  for s in info["shards"]]
        bb = serve.get_deployment_handle("Backbone", app_name="gpu_check")
        device = bb.options(multiplexed_model_id=info["backbone_id"]).warm.remote(info["model_source"]).result()
        got, codes = [], []
        t = time.perf_counter()
        for p in paths:
            r = client.post("/v1/products/gpu/score", content=Path(p).read_bytes())
            codes.append(r.status_code)
            got.append(r.json().get("score", float("nan")) if r.status_code == 200 else float("nan"))
        score_ms = 1000 * (time.perf_counter() - t) / len(paths)
        client.close()
    finally:
        serve.shutdown()
    got_a = np.asarray(got, dtype=np.float64)
    finite = bool(np.all(np.isfinite(got_a)))
    rel = float(np.max(np.abs(got_a - want) / np.abs(want))) if finite else float("inf")
    rel_eval = float(np.max(np.abs(got_a - evaluated) / np.abs(evaluated))) if finite else float("inf")
    gpu_shards = all(s["on_gpu"] for s in shards)
    faiss_gpu = faiss_gpu_available()
    out = {"images": len(paths), "http_codes": sorted(set(codes)), "max_rel_score_diff": rel,
           "max_rel_score_diff_vs_evaluate": rel_eval,
           "backbone_device": device.get("device"), "shards": [{k: s[k] for k in ("size", "on_gpu", "index")}
                                                               for s in shards],
           "startup_s": round(start_s, 1), "ms_per_request": round(score_ms, 1),
           "reference": "load_detector(artifact).score, one image at a time, this GPU (fp16 features); "
                        "vs_evaluate: pipeline.evaluate's batches of bank.batch_size (informative)"}
    ok = codes == [200] * len(paths) and rel <= 1e-3 and str(device.get("device", "")).startswith(ctx["device"].type)
    if faiss_gpu:
        ok = ok and gpu_shards
    else:
        out["gpu_shard"] = "not covered: faiss-gpu not installed, the shards searched on CPU"
    out["status"] = "pass" if ok else "fail"
    return out


# --- driver ------------------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[[dict], dict]] = {
    "process_group": check_process_group, "stage1_steps": check_stage1, "stage2_steps": check_stage2,
    "ray_stages": check_ray_stages, "fp16_bank": check_fp16_bank, "faiss_gpu": check_faiss_gpu,
    "serve_gpu_shard": check_serve,
}


def run_check(name: str, ctx: dict) -> dict:
    log(f"{name} ...")
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            res = RUNNERS[name](ctx)
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # a crash is a failed check; the others still run
        traceback.print_exc(file=sys.stderr)
        res = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:2000]}
    res["seconds"] = round(time.perf_counter() - t, 2)
    log(f"{name}: {res['status']} ({res['seconds']} s)")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--category", default="mvtec_ad/bottle", help="DATASET/CATEGORY under --data (MVTec layout)")
    ap.add_argument("--weights", default="pretrained", help="backbone weights: pretrained | random | a file")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: fewer training images and steps")
    ap.add_argument("--skip", default="", help=f"comma-separated checks to leave out, of {','.join(CHECKS)}")
    args = ap.parse_args(argv)
    q = args.quick
    args.train_images = 40 if q else 0  # 0: all
    args.train_size, args.batch, args.steps = (128, 8, 3) if q else (224, 16, 10)
    args.queries, args.bank_rows, args.serve_images = (2048, 20000, 8) if q else (16384, 100000, 24)
    args.fit_overrides = {}

    head = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "machine": f"{platform.machine()} {platform.node()}", "quick": q}
    if not torch.cuda.is_available():
        print(json.dumps({**head, "error": "no CUDA device: torch.cuda.is_available() is False; nothing checked",
                          "checks": {}}))
        return 2
    head.update(gpus=torch.cuda.device_count(), device=torch.cuda.get_device_name(0))
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(CHECKS)
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; choose from {','.join(CHECKS)}")

    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    ctx: dict[str, Any] = {"args": args, "tmp": tmp, "device": torch.device("cuda"),
                           "gpus": torch.cuda.device_count()}
    checks: dict[str, dict] = {}
    try:
        try:
            src_root, category = category_root(args)
            src = src_root / category
            eval_root = subset_root(src, Path(tmp) / "data", args.train_images) if args.train_images else src_root
            from tocoad_ray.data import load_split

            ctx.update(eval_root=eval_root, category=category,
                       train_paths=[s.path for s in load_split(eval_root, category, "mvtec").train])
        except Exception as e:  # the checks that need images fail; the others still run
            data_error = f"{type(e).__name__}: {e}"
        else:
            data_error = None
        for name in CHECKS:
            if name in skip:
                checks[name] = {"status": "skipped", "reason": "--skip"}
            elif data_error and name in NEEDS_DATA:
                checks[name] = {"status": "fail", "error": data_error}
            else:
                checks[name] = run_check(name, ctx)
    finally:
        if ctx.get("ray_started"):
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [k for k, v in checks.items() if v["status"] == "fail"]
    print(json.dumps({**head, "checks": checks, "failed": failed,
                      "skipped": [k for k, v in checks.items() if v["status"] == "skipped"],
                      "seconds": round(time.perf_counter() - t0, 1)}, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

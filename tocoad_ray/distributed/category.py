"""One category, end to end on Ray: stage I → stage II → bank → evaluation, plus the frozen-F
PatchCore baseline built in the same run. ``tocoad train-all`` runs one of these per category as
a Ray task; a Ray Tune trial can run the same function.

Output layout under ``out``::

    artifacts/<category>/   the method's artifact (tocoad evaluate / predict / serve take it)
    baseline/<category>/    frozen-F PatchCore artifact of the same run
    work/<category>/        stage{1,2}/ final stage states, result.json (written last: done)

Ray Train checkpoints live in ``storage_path`` (shared storage on a multi-node cluster). Running
again with the same output folder skips a finished category (same configuration) and resumes an
interrupted stage from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..artifact import ArtifactError, atomic_save_tensors, atomic_write_bytes, read_meta
from ..config import Config, ConfigError, replace
from ..data import DataError, Preprocess, load_split
from ..digest import digest
from ..models.backbone import FeatureExtractor
from ..train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_pointer,
    save_checkpoint,
)
from ..train.extractor import build_extractor
from ..train.seeding import seeded_init
from ..validation import (
    QuickValidator,
    ValidationConfig,
    build_validation_set,
    holdout,
    resolve_generator,
    score_validation,
)
from .features import extract_features
from .progress import report_progress
from .samples import SampleSpec, decode_images, image_store, local_image_store
from .stages import STAGE_NAMES, run_stages, stage_fingerprint, use_gpu

RESULT = "result.json"


# where the work ran, not what it computed: a finished category is reused whatever these were
PLACEMENT_KEYS = ("placement_strategy", "worker_resources", "driver_resources")


def category_fingerprint(cfg: Config, data_root: str | Path, category: str, validation: dict | None = None) -> str:
    """A finished category is reused only for the same config, data, category and validation plan."""
    conf = cfg.to_dict()
    conf["distributed"] = {k: v for k, v in conf["distributed"].items() if k not in PLACEMENT_KEYS}
    conf.pop("tracking", None)  # where the run is logged, not what it computes
    return digest({"config": conf, "data": str(data_root), "category": category,
                   **({"validation": validation} if validation else {})})


def finished_result(out: Path, cfg: Config, data_root: str | Path, category: str, validation: dict | None = None
                    ) -> dict[str, Any] | None:
    """The saved result of a finished category with this configuration, if its artifacts still verify."""
    path = Path(out) / "work" / category / RESULT
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
        if res.get("status") != "ok" or \
                res.get("fingerprint") != category_fingerprint(cfg, data_root, category, validation):
            return None
        for art in (res.get("artifact"), res.get("baseline_artifact")):
            if art:
                read_meta(art)  # checksums of every file
    except (ValueError, KeyError, ArtifactError, OSError):
        return None
    return res


def _mean_std(cfg: Config) -> tuple[list[float], list[float]]:
    from ..models.backbone import normalisation

    mean, std = normalisation(cfg.backbone.name)
    return list(mean), list(std)


def _train(cfg: Config, category: str, work: Path, store, n: int, mean, std, storage: str, board: str | None,
           log: Callable[[str], None], validator=None, callbacks: list | None = None) -> dict[int, dict[str, Any]]:
    """The enabled stages' final states: those that finished in an earlier run (``work/stage{1,2}``,
    same configuration, stage II on the same D) are reused, the rest train in one TorchTrainer run
    (stage I hands D to stage II inside it)."""
    stages = [s for s in (1, 2) if (cfg.stage1 if s == 1 else cfg.stage2).enabled]
    done: dict[int, dict[str, Any]] = {}
    d_sha = None
    for stage in stages:
        name, scfg = STAGE_NAMES[stage], (cfg.stage1 if stage == 1 else cfg.stage2)
        try:
            pointer = read_pointer(work / name)
        except CheckpointError:
            pointer = None
        if not (pointer and pointer.get("fingerprint") == stage_fingerprint(cfg, stage)
                and pointer.get("discriminator") == d_sha and int(pointer["epoch"]) == scfg.epochs):
            break
        state, meta = load_checkpoint(work / name)
        log(f"{name}: finished before ({scfg.epochs} epochs), reused")
        done[stage] = {"state": state, "history": meta.get("history", []), "seconds": 0.0, "reused": True,
                       "best_epoch": meta.get("best_epoch")}
        if stage == 1:
            d_sha = _state_digest(state["model"])
    todo = [s for s in stages if s not in done]
    if not todo:
        return done
    d_state = done[1]["state"]["model"] if 1 in done else None  # stage II alone, on the reused D
    specs = {s: SampleSpec.build(cfg, s, mean, std, with_generator=1 in stages) for s in todo}
    report_progress(board, category, stage=STAGE_NAMES[todo[0]], epoch=0,
                    epochs=(cfg.stage1 if todo[0] == 1 else cfg.stage2).epochs)
    res = run_stages(cfg, todo, category, store, n, specs, storage, discriminator_state=d_state, progress=board,
                     salt=d_sha, validator=validator, callbacks=callbacks)
    for stage in todo:
        r, name = res[stage], STAGE_NAMES[stage]
        fp = stage_fingerprint(cfg, stage)
        save_checkpoint(work / name, r.state, {"stage": name, "fingerprint": fp, "discriminator": d_sha,
                                               "history": r.history, "run": r.run_name, "best_epoch": r.best_epoch})
        log(f"{name}: {len(r.history)} epochs, {r.seconds:.1f}s of training on {r.workers} workers"
            + (f" (resumed after epoch {max(r.attempts_resumed)})" if max(r.attempts_resumed, default=0) else "")
            + (f"; keeping epoch {r.best_epoch} (best validation score)" if r.best_epoch is not None else ""))
        done[stage] = {"state": r.state, "history": r.history, "seconds": r.seconds, "reused": False,
                       "resumed_from": r.attempts_resumed, "best_epoch": r.best_epoch}
        if stage == 1:
            d_sha = _state_digest(r.state["model"])
    log(f"{' + '.join(STAGE_NAMES[s] for s in todo)}: {res[todo[-1]].run_seconds:.1f}s in one worker group "
        f"(start-up included)")
    return done


def _state_digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _remote_reconpatch(cfg: Config, work: Path, category: str) -> Callable[..., torch.nn.Module]:
    """``train_adapter`` for ``finish_fit``: ReConPatch's training as one Ray task, checkpointing
    into the category's ``work/`` folder (on the shared output folder: the task may run on another
    node, and ``storage_path`` may be a URI that only Ray reads)."""
    import ray

    def train(cfg_: Config, patches: torch.Tensor, workdir: Path, **_: Any) -> torch.nn.Module:
        from ..models.reconpatch import PatchAdapter

        task = ray.remote(num_cpus=cfg.distributed.driver_cpus, num_gpus=1 if use_gpu(cfg) else 0,
                          resources=cfg.distributed.worker_resources or None,
                          max_retries=cfg.distributed.max_failures)(_reconpatch_task)
        sd = ray.get(task.remote(cfg_.to_dict(), ray.put(patches.numpy()), str(work / "reconpatch")))
        return PatchAdapter.from_state_dict(sd)

    return train


def _reconpatch_task(cfg: dict, patches: np.ndarray, workdir: str) -> dict[str, torch.Tensor]:
    from ..config import from_dict
    from ..train.reconpatch import train_reconpatch

    adapter = train_reconpatch(from_dict(Config, cfg), torch.from_numpy(np.array(patches)), workdir, resume=True,
                               progress=False, log=None)
    return {k: v.detach().cpu() for k, v in adapter.state_dict().items()}


def _bank(cfg: Config, out: Path, category: str, data_root: str | Path, paths: list[Path], weights: str,
          files: dict[str, str], timings: dict[str, float], t_start: float, work: Path,
          log: Callable[[str], None]) -> dict[str, Any]:
    """Features through Ray Data, then ``pipeline.finish_fit`` exactly as ``tocoad fit``."""
    from ..models.backbone import resolve_device
    from ..pipeline import finish_fit

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode())
    t = time.perf_counter()
    patches, grid = extract_features(paths, cfg, weights, cfg.distributed.feature_actors, use_gpu(cfg),
                                     cfg.distributed.driver_cpus)
    timings["features_s"] = time.perf_counter() - t
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        extractor = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, weights)
    preprocess = Preprocess(cfg.data, extractor.mean, extractor.std)
    return finish_fit(cfg, out, category, data_root, extractor, preprocess, patches, grid, len(paths), files=files,
                      timings=timings, t_start=t_start, device=resolve_device("cpu"), progress=False, log=log,
                      train_adapter=_remote_reconpatch(cfg, work, category) if cfg.method == "reconpatch" else None,
                      train_images=paths)


def _evaluate(art: Path, data_root: str | Path, category: str, cfg: Config) -> dict[str, Any]:
    from ..pipeline import evaluate

    res = evaluate(art, data_root, category, layout=cfg.data.layout, progress=False)
    res.pop("_arrays", None)
    return res


def _validation_plan(validation: ValidationConfig | None, val_generator: str | None, cfg: Config) -> dict | None:
    if validation is None:
        return None
    return {**asdict(validation), "generator": val_generator or resolve_generator(validation, [cfg.generator.kind])}


def _validation_data(cfg: Config, plan: dict, paths: list[Path], mean, std) -> tuple[list[Path], Any, Any]:
    """(fitting paths, validation set, per-epoch validator) for ``validation`` mode."""
    from ..data import read_image

    vcfg = ValidationConfig(**{**plan, "generator": "auto"})
    fit_idx, val_idx = holdout(len(paths), vcfg, cfg.seed)
    pre = Preprocess(cfg.data, mean, std)
    vset = build_validation_set([paths[i] for i in val_idx], pre, plan["generator"], cfg.seed,
                                vcfg.min_anomaly_fraction)
    fit = [paths[i] for i in fit_idx]
    quick = torch.stack([pre.image(read_image(p)) for p in fit[:vcfg.quick_bank_images]])
    return fit, vset, QuickValidator(cfg, quick, vset)


def _selects(cfg: Config) -> bool:
    """Whether the category chooses between fine-tuned F and the frozen-F baseline (``distributed.select``)."""
    return (cfg.method == "tocoad" and cfg.stage2.enabled and cfg.distributed.baseline
            and cfg.distributed.select == "validation")


def _selection_plan(cfg: Config) -> dict[str, Any]:
    d = cfg.distributed
    vcfg = ValidationConfig(fraction=d.select_fraction, min_images=d.select_min_images,
                            max_images=max(ValidationConfig.max_images, d.select_min_images))
    return {**asdict(vcfg), "generator": resolve_generator(vcfg, [cfg.generator.kind])}


def _fine_tuned_into(folder: Path, body: dict[str, torch.Tensor], files: dict[str, str]) -> str:
    """Write fine-tuned F's weights into an artifact folder (listed in ``files``); returns their path."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / "backbone.safetensors", body)
    files["backbone.safetensors"] = ""
    return str(folder / "backbone.safetensors")


def _select(cfg: Config, body: dict[str, torch.Tensor], folder: Path, category: str, data_root: str | Path,
            paths: list[Path], vset: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Fine-tuned F against frozen F on the validation objective (``validation.score_validation``):
    a bank of each over the images F trained on (at most ``distributed.select_bank_images`` of
    them), scored on the held-out normal images and G_val's anomalies made from them. The baseline
    wins ties: fine-tuning must earn its place."""
    from ..pipeline import load_detector

    cap = cfg.distributed.select_bank_images
    if cap and len(paths) > cap:  # evenly spaced, so the subset is a pure function of the list
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, cap).round()]
    scores = {}
    for method in ("tocoad", "patchcore"):
        c, d = replace(cfg, method=method), folder / method
        files: dict[str, str] = {}
        weights = _fine_tuned_into(d, body, files) if method == "tocoad" else cfg.backbone.weights
        _bank(c, d, category, data_root, paths, weights, files, {}, time.perf_counter(), folder, lambda m: None)
        scores[method] = score_validation(load_detector(d), vset)
    shipped = "tocoad" if scores["tocoad"]["val_score"] > scores["patchcore"]["val_score"] else "patchcore"
    t, b = scores["tocoad"]["val_score"], scores["patchcore"]["val_score"]
    reason = (f"fine-tuned F validates better ({t:.4f} vs {b:.4f}, Δ {t - b:+.4g})" if shipped == "tocoad" else
              f"frozen-F PatchCore validates {'better' if b > t else 'as well'} ({b:.4f} vs {t:.4f}, Δ {b - t:+.4g})")
    log(f"model selection: shipping {'ToCoAD (fine-tuned F)' if shipped == 'tocoad' else 'PatchCore (frozen F)'}: "
        f"{reason}")
    return {"shipped": shipped, "reason": reason, "validation": scores, "n_validation": int(len(vset.labels)),
            "n_bank_images": len(paths)}


def train_category(cfg: Config, data_root: str | Path, category: str, out: str | Path, storage_path: str | Path,
                   board: str | None = None, log: Callable[[str], None] | None = None,
                   validation: ValidationConfig | None = None, val_generator: str | None = None,
                   callbacks: list | None = None, tracking: Any = None) -> dict[str, Any]:
    """Train, build and evaluate one category; returns (and writes to work/<category>/result.json)
    its metrics, the baseline's, per-stage times and per-epoch histories.

    ``validation`` (the ``tocoad tune`` objective): a share of the training images is held out from
    fitting and the artifact is scored on them and on G_val's anomalies made from them
    (``val_generator``, default: the first generator other than ``generator.kind``); the test split
    is never opened. Every training epoch then also reports the quick-bank validation score, and
    ``callbacks`` go to the stages' Ray Train runs (Tune's ``TuneReportCallback``).

    ``tracking`` (a ``tracking.RunRef``): the category's MLflow run; every epoch and the final
    metrics are logged into it (``distributed/tracking.py``)."""
    out, storage = Path(out), str(storage_path)
    work, art, base = out / "work" / category, out / "artifacts" / category, out / "baseline" / category
    work.mkdir(parents=True, exist_ok=True)
    messages: list[str] = []
    plan = _validation_plan(validation, val_generator, cfg)

    def say(msg: str) -> None:
        messages.append(msg)
        (log or (lambda m: None))(f"[{category}] {msg}")
        report_progress(board, category, message=msg)

    prior = finished_result(out, cfg, data_root, category, plan)
    if tracking is not None and prior is None:
        from .tracking import EpochLogger

        callbacks = [*(callbacks or []), EpochLogger(tracking)]
    if prior is not None:
        say("finished in an earlier run with this configuration: skipped")
        report_progress(board, category, stage="done (earlier run)")
        return {**prior, "skipped": True}

    torch.set_num_threads(max(1, int(round(cfg.distributed.driver_cpus))))
    t0 = time.perf_counter()
    split = load_split(data_root, category, cfg.data.layout)
    if not split.train:
        raise DataError(f"no training images for {category!r} under {data_root}")
    if plan is None and not split.test:
        raise DataError(f"no test images for {category!r} under {data_root}")
    paths = all_paths = [s.path for s in split.train]  # paths: what F trains on
    validator = vset = sel_set = None
    selection: dict[str, Any] | None = None
    if plan is not None:
        mean, std = _mean_std(cfg)
        paths, vset, validator = _validation_data(cfg, plan, paths, mean, std)
        say(f"validation: {len(vset.labels) // 2} held-out normal images + as many {plan['generator']} anomalies; "
            f"fitting on {len(paths)}")
    elif _selects(cfg):
        sel_plan = _selection_plan(cfg)
        try:
            paths, sel_set, validator = _validation_data(cfg, sel_plan, all_paths, *_mean_std(cfg))
        except ConfigError as e:  # too few images to hold any out: nothing to select on
            selection = {"mode": "validation", "shipped": "tocoad", "reason": f"selection skipped: {e}"}
            say(f"model selection skipped: {e}")
        else:
            selection = {"mode": "validation", "generator": sel_plan["generator"], "n_held_out": len(all_paths) - len(paths)}
            say(f"model selection: {selection['n_held_out']} held-out normal images + as many {sel_plan['generator']} "
                f"anomalies; training F on {len(paths)}")
    timings: dict[str, float] = {}
    files: dict[str, str] = {}
    histories: dict[str, list] = {}
    resumed: dict[str, list] = {}
    weights = cfg.backbone.weights

    if cfg.method == "tocoad":
        report_progress(board, category, stage="decode")
        t = time.perf_counter()
        mean, std = _mean_std(cfg)
        if len(paths) <= cfg.distributed.local_decode_max_images:
            store = local_image_store(paths, cfg, mean, std)
        else:
            store = image_store(decode_images(paths, cfg, mean, std, cfg.distributed.data_cpus,
                                              cfg.distributed.data_tasks), len(paths))
        timings["decode_s"] = time.perf_counter() - t
        trained = _train(cfg, category, work, store, len(paths), mean, std, storage, board, say, validator=validator,
                         callbacks=callbacks)
        best_epoch = None
        for stage, r in trained.items():
            name = STAGE_NAMES[stage]
            histories[name], timings[f"{name}_s"] = r["history"], r["seconds"]
            resumed[name] = r.get("resumed_from", [])
        if 2 in trained:
            body = {k[2:]: v for k, v in trained[2]["state"]["model"].items() if k.startswith("F.")}
            best_epoch = trained[2].get("best_epoch")
        else:  # stage I only: F stays the pretrained one
            body = seeded_init(cfg.seed, 0, lambda: build_extractor(cfg)).body.state_dict()
        body = {k: v.detach().cpu().contiguous() for k, v in body.items()}
        timings["train_s"] = time.perf_counter() - t0
        if sel_set is not None:
            report_progress(board, category, stage="select")
            t = time.perf_counter()
            selection.update(_select(cfg, body, work / "select", category, data_root, paths, sel_set, say))
            timings["select_s"] = time.perf_counter() - t
        if selection is not None:
            selection["best_epoch"] = best_epoch
        art.mkdir(parents=True, exist_ok=True)
        if selection is None or selection["shipped"] == "tocoad":
            weights = _fine_tuned_into(art, body, files)
        else:  # a PatchCore artifact: no fine-tuned weights in it (an earlier run's would be stale)
            (art / "backbone.safetensors").unlink(missing_ok=True)
        art.joinpath("train").mkdir(exist_ok=True)
        lines = [json.dumps(h) for stage in ("stage1", "stage2") for h in histories.get(stage, [])]
        atomic_write_bytes(art / "train" / "train_log.jsonl", ("\n".join(lines) + "\n").encode())

    shipped_cfg = cfg if selection is None or selection["shipped"] == "tocoad" else replace(cfg, method="patchcore")
    # the shipped bank holds every training image (the held-out ones too, once the choice is made);
    # a tune trial's holds only its fitting images (the rest are its validation set)
    bank_paths = all_paths if plan is None else paths
    report_progress(board, category, stage="bank")
    meta = _bank(shipped_cfg, art, category, data_root, bank_paths, weights, files, timings, t0, work, say)
    def score(artifact: Path, c: Config) -> dict[str, Any]:
        if vset is None:
            return _evaluate(artifact, data_root, category, c)
        from ..pipeline import load_detector

        return {**score_validation(load_detector(artifact), vset), "n_validation": int(len(vset.labels)),
                "validation_generator": vset.generator}

    report_progress(board, category, stage="evaluate" if vset is None else "validate")
    t = time.perf_counter()
    metrics = score(art, shipped_cfg)
    timings["evaluate_s"] = time.perf_counter() - t

    baseline = finetuned = None
    if shipped_cfg is not cfg:  # the baseline was shipped: it is the artifact just scored; the fine-tuned
        baseline, base = dict(metrics), art  # F's bank (every training image) is built for the report
        report_progress(board, category, stage="fine-tuned F (not shipped)")
        t = time.perf_counter()
        tuned, tuned_files = out / "finetuned" / category, {}
        _bank(cfg, tuned, category, data_root, bank_paths, _fine_tuned_into(tuned, body, tuned_files), tuned_files,
              {}, t, work, say)
        finetuned = {**score(tuned, cfg), "artifact": str(tuned)}
        timings["finetuned_s"] = time.perf_counter() - t
    elif cfg.method != "patchcore" and cfg.distributed.baseline:
        report_progress(board, category, stage="baseline")
        t = time.perf_counter()
        cfg_b = replace(cfg, method="patchcore")
        _bank(cfg_b, base, category, data_root, bank_paths, cfg.backbone.weights, {}, {}, t, work, say)
        baseline = score(base, cfg_b)
        timings["baseline_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    result = {
        "category": category, "status": "ok", "method": cfg.method,
        "fingerprint": category_fingerprint(cfg, data_root, category, plan), "validation": plan,
        "metrics": metrics, "baseline": baseline,
        "finetuned": finetuned,  # the fine-tuned F's test metrics when it was not shipped (else: metrics)
        "timings": {**meta["timings"], **timings},
        "workers": cfg.distributed.num_workers, "histories": histories, "resumed_from": resumed,
        "artifact": str(art), "baseline_artifact": str(base) if baseline is not None else None,
        "n_train": len(bank_paths), "n_test": metrics.get("n_test"), "messages": messages, "selection": selection,
    }
    atomic_write_bytes(work / RESULT, json.dumps(result, indent=2, default=float).encode())
    if tracking is not None:
        from .tracking import log_category_result

        log_category_result(tracking, result, work, say)
    report_progress(board, category, stage="done")
    return result


def train_category_safe(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``train_category``, with a failure returned as {"status": "failed", "error"} (full traceback
    in work/<category>/error.txt) so the other categories of the run carry on."""
    category = args[2] if len(args) > 2 else kwargs["category"]
    out = Path(args[3] if len(args) > 3 else kwargs["out"])
    try:
        return train_category(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported per category, never hides the error
        err = _root_message(e)
        work = out / "work" / category
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(work / "error.txt", traceback.format_exc().encode())
        board = kwargs.get("board") or (args[5] if len(args) > 5 else None)
        report_progress(board, category, stage="failed", message=err)
        return {"category": category, "status": "failed", "error": err, "traceback": str(work / "error.txt")}


def _chain(e: BaseException):
    """``e`` and every exception behind it (Ray's ``.cause`` and Python's ``__cause__``/``__context__``)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]


def _root_message(e: BaseException) -> str:
    """The user-facing cause: our own error (it names the file) rather than Ray's wrappers
    (task errors, Ray Data's "UDF failed") or a library's low-level error behind it."""
    import re

    chain = [x for x in _chain(e) if isinstance(x, BaseException)]
    # a remote error arrives as text: its traceback names our exception and message
    for x in chain:
        hit = re.search(r"^tocoad_ray[\w.]*\.(\w+(?:Error|Exception)): (.+)$", str(x), re.M)
        if hit:
            return f"{hit.group(1)}: {hit.group(2).strip()}"

    def plain(x: BaseException) -> bool:
        return (not type(x).__module__.startswith("ray") and not type(x).__name__.startswith("RayTaskError")
                and not isinstance(x, (StopIteration, GeneratorExit)))

    ours = [x for x in chain if plain(x) and type(x).__module__.startswith("tocoad_ray")]
    inner = (ours or [x for x in chain if plain(x)] or [e])[0]
    lines = [m for m in str(inner).strip().splitlines() if m and not m.startswith(("ray::", "Traceback"))]
    return f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")

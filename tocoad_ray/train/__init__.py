"""ToCoAD two-stage training: stage I DNP (D over frozen F) and stage II NCL (F + C with frozen D)."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .extractor import build_extractor, needed_layers
from .images import prepare_images
from .losses import ce_loss, focal_loss, neg_cosine, projection_std, sym_loss
from .schedule import iter_batches, step_rng
from .stage1 import Stage1Trainer, make_stage1_batch
from .stage2 import Stage2Trainer, make_stage2_batch
from .tocoad import train_tocoad
from .views import ViewAugment

__all__ = [
    "CheckpointError", "Stage1Trainer", "Stage2Trainer", "ViewAugment", "build_extractor", "ce_loss", "focal_loss",
    "iter_batches", "load_checkpoint", "make_stage1_batch", "make_stage2_batch", "needed_layers", "neg_cosine",
    "prepare_images", "projection_std", "save_checkpoint", "step_rng", "sym_loss", "train_tocoad",
]

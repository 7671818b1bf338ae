"""DataLoaders for training and testing, and timm's Mixup/CutMix.

Every loader yields the batch contract ``(images, targets, bad_files)``:

* ``images``: float tensor (B, 3, H, W); an evaluation batch may be smaller than the batch size, even
  empty (B = 0), when it held unreadable files;
* ``targets``: int64 tensor (B,), class indices;
* ``bad_files``: list of ``(path, reason)`` skipped while making this batch, for the engine to report.

Order is reproducible: the training sampler is torch's DistributedSampler even for one process, so
``loader.set_epoch(epoch)`` makes an epoch's order a function of SEED and the epoch alone and a
resumed run sees the same batches. It also reseeds the worker processes, so with WORKERS > 0 an
epoch's augmentation is a function of SEED, the rank and the epoch; under DETERMINISTIC the workers
are started afresh every epoch for that (persistent ones would carry their generators on from
epochs a resumed run never ran). Testing shards indices as rank::world_size with no padding and no
dropping, so a distributed evaluation counts every image exactly once.

Worker processes run in a process group of their own: a signal to the training process's group
(Ctrl-C in a terminal, torchrun stopping its workers) then reaches only the training process, which
finishes the current step, saves and shuts its workers down. A worker that died of it would crash
the run instead.
"""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from yacs.config import CfgNode

from ..config import SAMPLERS
from ..errors import UserError, short_list
from .dataset import BadFile, ImageFolderDataset, Item, stop_error
from .digits import default_digits_root, ensure_digits_dataset
from .transforms import build_transform, test_output_size

__all__ = [
    "Batch",
    "BatchCollate",
    "FolderLoader",
    "ShardSampler",
    "build_loader",
    "build_mixup",
    "resolve_dataset_root",
    "usable_cores",
]

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, list[BadFile]]
SPLITS = ("train", "test")


class BatchCollate:
    """Stack the kept items into ``(images, targets, bad_files)``, dropping items without an image.

    `image_shape` (C, H, W) gives an all-dropped batch its shape (0, C, H, W).
    """

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        self.image_shape = image_shape

    def __call__(self, items: Sequence[Item]) -> Batch:
        kept = [(image, target) for image, target, _ in items if image is not None]
        bad = [entry for _, _, skipped in items for entry in skipped]
        if not kept:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.long), bad
        images = torch.stack([image for image, _ in kept])
        targets = torch.tensor([target for _, target in kept], dtype=torch.long)
        return images, targets, bad


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... of a dataset: every index on exactly one rank, once."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Nothing: the order is fixed. Present so callers can treat every loader's sampler alike."""


class FolderLoader(DataLoader):
    """A DataLoader with per-epoch seeding that raises the 'stop' policy's bad-file error in the main
    process.

    A `UserError` raised inside a worker process arrives wrapped in a multi-line traceback; under
    'stop' the dataset returns the bad file as data instead and this raises the one-line error here.
    `seed` (a list of ints) with the epoch seeds the generator the worker processes are seeded from.
    """

    def __init__(self, dataset: ImageFolderDataset, *, seed: list[int], **kwargs) -> None:
        self.stop_on_bad = dataset.bad_files == "stop"
        self.seed = seed
        super().__init__(dataset, generator=torch.Generator(), worker_init_fn=_detach_from_stop_signals, **kwargs)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Make the coming pass's order and worker seeds those of `epoch`; call before iterating."""
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        seed = np.random.SeedSequence([*self.seed, epoch]).generate_state(1)[0]
        self.generator.manual_seed(int(seed))

    def __iter__(self) -> Iterator[Batch]:
        for batch in super().__iter__():
            if self.stop_on_bad and batch[2]:
                raise stop_error(batch[2][0])
            yield batch


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container or `taskset` may allow fewer
    than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_dataset_root(cfg: CfgNode) -> Path:
    """DATASET.ROOT; for the digits demo with ROOT empty (or the cache folder itself), the cache folder,
    the dataset written there first if need be. Only that folder is ever created: any other ROOT
    must exist, so a mistyped path is an error, not a new dataset somewhere unexpected."""
    root = str(cfg.DATASET.ROOT)
    if cfg.DATASET.DATASET == "digits" and (not root or Path(root).expanduser() == default_digits_root()):
        return ensure_digits_dataset()
    if root and Path(root).is_dir():
        return Path(root)
    if not root:
        raise UserError("DATASET.ROOT: not set; set it to the folder holding the dataset's split folders")
    raise UserError(
        f"DATASET.ROOT: folder {root} not found; set DATASET.ROOT to the folder holding "
        f"{cfg.DATASET.TRAIN_SET}/ and {cfg.DATASET.TEST_SET}/"
    )


def build_loader(
    cfg: CfgNode,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    class_names: Sequence[str] | None = None,
) -> tuple[DataLoader, ImageFolderDataset]:
    """The loader of one split ('train' or 'test') for process `rank` of `world_size`, and its dataset.

    `class_names` (from a checkpoint) must equal the split's class folders: a different set or
    order would silently map predictions to the wrong classes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    is_train = split == "train"
    root = resolve_dataset_root(cfg)
    dataset = ImageFolderDataset(
        root,
        cfg.DATASET.TRAIN_SET if is_train else cfg.DATASET.TEST_SET,
        build_transform(cfg, is_train),
        bad_files=cfg.DATASET.BAD_FILES,
        max_pixels=int(cfg.DATASET.MAX_IMAGE_PIXELS),
        # Evaluation must not count an image twice, so a bad file is dropped, not replaced.
        replace_bad=is_train,
    )
    if class_names is not None:
        _check_class_names(dataset, list(class_names))

    if is_train:
        sampler = _train_sampler(cfg, dataset, rank, world_size)
        batch_size = cfg.TRAIN.BATCH_SIZE_PER_GPU
        if len(sampler) < batch_size:
            raise UserError(
                f"TRAIN.BATCH_SIZE_PER_GPU: {batch_size} is more than the {len(sampler)} images each "
                f"of {world_size} process(es) gets from {dataset.split_dir} per epoch, so an epoch "
                "would have no batch; lower TRAIN.BATCH_SIZE_PER_GPU"
            )
        image_size = cfg.TRAIN.IMAGE_SIZE[0]
        image_shape = (3, image_size, image_size)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
        batch_size = cfg.TEST.BATCH_SIZE_PER_GPU
        image_shape = (3, *test_output_size(cfg))

    workers = min(int(cfg.WORKERS), usable_cores())
    if workers < cfg.WORKERS and is_train:
        # More decoding processes than cores only queue for them (the recipes assume a GPU server).
        logger.info("WORKERS %d is more than the %d usable cores: %d worker processes per loader",
                    cfg.WORKERS, usable_cores(), workers)
    loader = FolderLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=BatchCollate(image_shape),
        pin_memory=bool(cfg.PIN_MEMORY) and torch.cuda.is_available(),
        # Training batches keep one size: timm's Mixup needs an even batch, and the LR and
        # BatchNorm statistics assume a full one.
        drop_last=is_train,
        persistent_workers=workers > 0 and not cfg.DETERMINISTIC,
        # Worker processes seed Python, NumPy and torch from the loader's generator: distinct,
        # well-mixed seeds per (SEED, rank, split, epoch), so ranks do not augment alike.
        seed=[int(cfg.SEED), rank, SPLITS.index(split)],
    )
    logger.info("%s: %d images in %d classes, %d batches of %d per process", dataset.split_dir,
                len(dataset), len(dataset.classes), len(loader), batch_size)
    return loader, dataset


def _train_sampler(cfg: CfgNode, dataset: ImageFolderDataset, rank: int, world_size: int) -> Sampler:
    kind = cfg.DATASET.SAMPLER
    if kind == "repeated_aug":
        return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=cfg.TRAIN.SHUFFLE)
    if kind == "default":
        return DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=cfg.TRAIN.SHUFFLE,
            seed=int(cfg.SEED),
            drop_last=False,
        )
    raise UserError(f"DATASET.SAMPLER: unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)}")


def _detach_from_stop_signals(worker_id: int) -> None:
    """A worker's own process group (see the module docstring), and the default handlers back: a
    forked worker inherits the training process's SIGINT/SIGTERM handler, which would log a stop
    request it cannot act on and keep the DataLoader from terminating a stuck worker."""
    if hasattr(os, "setpgid"):  # POSIX
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_class_names(dataset: ImageFolderDataset, expected: list[str]) -> None:
    found = dataset.classes
    if found == expected:
        return
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        detail = f"missing folders: {short_list(missing)}; folders the checkpoint lacks: {short_list(extra)}"
    else:
        first = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
        detail = (f"same names in a different order, first at index {first}: "
                  f"folder {found[first]!r}, checkpoint {expected[first]!r}")
    raise UserError(
        f"{dataset.split_dir}: class folders differ from the checkpoint's {len(expected)} classes "
        f"({detail}); use the class folders the model was trained with"
    )


def build_mixup(cfg: CfgNode, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing, or None when the config turns both off."""
    aug = cfg.AUG
    if not (aug.MIXUP_PROB > 0 and (aug.MIXUP > 0 or aug.MIXCUT > 0)):
        return None
    if cfg.TRAIN.BATCH_SIZE_PER_GPU % 2:
        raise UserError(
            f"TRAIN.BATCH_SIZE_PER_GPU: {cfg.TRAIN.BATCH_SIZE_PER_GPU} is odd, but Mixup/CutMix pairs "
            "images within a batch; use an even batch size or set AUG.MIXUP_PROB 0"
        )
    return Mixup(
        mixup_alpha=aug.MIXUP,
        cutmix_alpha=aug.MIXCUT,
        cutmix_minmax=list(aug.MIXCUT_MINMAX) or None,
        prob=aug.MIXUP_PROB,
        switch_prob=aug.MIXUP_SWITCH_PROB,
        mode=aug.MIXUP_MODE,
        label_smoothing=cfg.LOSS.LABEL_SMOOTHING,
        num_classes=num_classes,
    )

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

import itertools
import logging
import os
import re
import signal
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from yacs.config import CfgNode

from ..config import DOWNSTREAM_DATASETS, SAMPLERS
from ..errors import UserError, short_list
from .dataset import BadFile, ImageFolderDataset, ImageListDataset, Item, split_folder, stop_error
from .digits import default_digits_root, ensure_digits_dataset
from .downstream import build_downstream_dataset
from .labels import read_class_map
from .transforms import build_transform, test_output_size, train_output_size

__all__ = [
    "Batch",
    "BatchCollate",
    "FolderLoader",
    "RepeatAugAccumSampler",
    "ShardSampler",
    "WindowSampler",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "resolve_dataset_root",
    "train_batch_key",
    "train_batch_per_process",
    "worker_failure",
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


class WindowSampler(Sampler[int]):
    """A training sampler's indices, or a window of them: what a step-based run resumed mid-pass
    needs to start at its position. The window applies until it is changed; `set_epoch` is passed on."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base = base
        self.window: tuple[int, int | None] = (0, None)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)  # type: ignore[attr-defined]

    def set_window(self, start: int, stop: int | None) -> None:
        """Yield only the base order's indices start .. stop - 1 (stop None: to the end)."""
        self.window = (start, stop)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), *self.window)

    def __len__(self) -> int:
        start, stop = self.window
        return max(0, min(len(self.base), len(self.base) if stop is None else stop) - start)  # type: ignore[arg-type]


class RepeatAugAccumSampler(Sampler[int]):
    """Repeated augmentation over processes x ACCUM_STEPS virtual replicas, for gradient accumulation
    standing in for GPUs: process `rank`'s micro-batch a of optimizer step s is batch s of timm's
    RepeatAugSampler on replica rank * accum_steps + a of world_size * accum_steps, so an optimizer
    step sees the images (and the copies of each image spread over micro-batches) it would see on the
    recipe's GPUs. Only full batches are yielded, ACCUM_STEPS of them per step.
    """

    def __init__(self, dataset: Sized, *, rank: int, world_size: int, accum_steps: int, batch_size: int,
                 shuffle: bool) -> None:
        replicas = world_size * accum_steps
        self.replicas = [
            RepeatAugSampler(dataset, num_replicas=replicas, rank=rank * accum_steps + a, shuffle=shuffle)
            for a in range(accum_steps)
        ]
        self.batch_size = batch_size
        self.steps = len(self.replicas[0]) // batch_size

    def __iter__(self) -> Iterator[int]:
        streams = [list(replica) for replica in self.replicas]
        size = self.batch_size
        for step in range(self.steps):
            for stream in streams:
                yield from stream[step * size:(step + 1) * size]

    def __len__(self) -> int:
        return self.steps * self.batch_size * len(self.replicas)

    def set_epoch(self, epoch: int) -> None:
        for replica in self.replicas:
            replica.set_epoch(epoch)


class FolderLoader(DataLoader):
    """A DataLoader with per-epoch seeding that raises the 'stop' policy's bad-file error in the main
    process.

    A `UserError` raised inside a worker process arrives wrapped in a multi-line traceback; under
    'stop' the dataset returns the bad file as data instead and this raises the one-line error here.
    `seed` (a list of ints) with the epoch seeds the generator the worker processes are seeded from.
    """

    def __init__(self, dataset: ImageListDataset, *, seed: list[int], **kwargs) -> None:
        self.stop_on_bad = dataset.bad_files == "stop"
        self.seed = seed
        super().__init__(dataset, generator=torch.Generator(), worker_init_fn=_detach_from_stop_signals, **kwargs)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Make the coming pass's order and worker seeds those of `epoch`; call before iterating."""
        self.set_window(epoch, 0, None)

    def set_window(self, epoch: int, first_batch: int, num_batches: int | None) -> None:
        """Make the coming iteration yield `num_batches` batches (None: to the end) of pass `epoch`'s
        order from batch `first_batch` on, with worker seeds a function of (epoch, first_batch), so a
        run resumed at that batch sees the same data. Training loaders only (a `WindowSampler`)."""
        sampler = self.sampler
        sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        if isinstance(sampler, WindowSampler):
            size = int(self.batch_size or 1)
            sampler.set_window(first_batch * size, None if num_batches is None else (first_batch + num_batches) * size)
        elif first_batch or num_batches is not None:
            raise ValueError("only a training loader (a WindowSampler) can start mid-pass")
        # A whole pass keeps the seeds epoch-based runs have always had.
        entropy = [*self.seed, epoch] + ([first_batch] if first_batch else [])
        self.generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def __iter__(self) -> Iterator[Batch]:
        try:
            for batch in super().__iter__():
                if self.stop_on_bad and batch[2]:
                    raise stop_error(batch[2][0])
                yield batch
        except UserError as e:
            raise _unwrapped(e) from None
        except RuntimeError as e:
            failure = worker_failure(e)
            if failure is None:
                raise
            raise failure from None


def _unwrapped(error: UserError) -> UserError:
    """A UserError raised in a worker process reaches this one with the worker's traceback in its
    message: keep the one line it was raised with."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught UserError in DataLoader worker"):
        return UserError(lines[-1].split(": ", 1)[-1])
    return error


_WORKER_DEATH = re.compile(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (exited unexpectedly|is killed by signal: [^.]+)")


def worker_failure(error: BaseException) -> UserError | None:
    """The one-line error for torch's report of a data-loader worker that died (killed by the
    system, usually for memory), or None when `error` is something else."""
    match = _WORKER_DEATH.search(str(error))
    if match is None:
        return None
    pids, how = match.groups()
    return UserError(
        f"data-loader worker process {pids.strip()} {how} (the system kills workers when memory runs out); "
        "the last saved checkpoint is intact: run the same command again, with fewer WORKERS if memory is short"
    )


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
    problem = "is a file, not a folder" if Path(root).exists() else "not found"
    raise UserError(
        f"DATASET.ROOT: folder {root} {problem}; set DATASET.ROOT to the folder holding "
        f"{cfg.DATASET.TRAIN_SET}/ and {cfg.DATASET.TEST_SET}/"
    )


def check_dataset_folders(cfg: CfgNode) -> None:
    """A UserError unless DATASET.ROOT and its two split folders are there (a folder dataset's; the
    published downstream formats are checked as they are read): cheap, for a run to call before it
    changes anything in its run folder."""
    if cfg.DATASET.DATASET not in DOWNSTREAM_DATASETS:
        root = resolve_dataset_root(cfg)
        for split in (cfg.DATASET.TRAIN_SET, cfg.DATASET.TEST_SET):
            split_folder(root, split)


def build_dataset(cfg: CfgNode, split: str, *, index_targets: bool = False) -> ImageListDataset:
    """The dataset of one split ('train' or 'test'): DATASET.DATASET's published format for the names
    `cvt.data.downstream` reads, else the folder dataset ROOT/<split>/<class>/<image> (classes in
    DATASET.CLASS_MAP's order when set). `index_targets`: see `ImageListDataset`."""
    is_train = split == "train"
    options = dict(
        bad_files=cfg.DATASET.BAD_FILES,
        max_pixels=int(cfg.DATASET.MAX_IMAGE_PIXELS),
        # Evaluation must not count an image twice, so a bad file is dropped, not replaced.
        replace_bad=is_train,
    )
    split_name = cfg.DATASET.TRAIN_SET if is_train else cfg.DATASET.TEST_SET
    transform = build_transform(cfg, is_train)
    if cfg.DATASET.DATASET in DOWNSTREAM_DATASETS:
        return build_downstream_dataset(cfg.DATASET.DATASET, Path(cfg.DATASET.ROOT), split_name, transform, **options)
    root = resolve_dataset_root(cfg)
    class_map = read_class_map(cfg.DATASET.CLASS_MAP, root) if cfg.DATASET.CLASS_MAP else None
    return ImageFolderDataset(root, split_name, transform, class_names=class_map, index_targets=index_targets, **options)


def train_batch_key(cfg: CfgNode) -> str:
    """The key that sets this run's training batch: FINETUNE.BATCH_SIZE for a step run."""
    return "FINETUNE.BATCH_SIZE" if cfg.FINETUNE.FINETUNE else "TRAIN.BATCH_SIZE_PER_GPU"


def train_batch_per_process(cfg: CfgNode, world_size: int) -> int:
    """Images per training batch in each process: TRAIN.BATCH_SIZE_PER_GPU, or for a step run the
    global FINETUNE.BATCH_SIZE split over `world_size` processes and TRAIN.ACCUM_STEPS micro-batches."""
    if not cfg.FINETUNE.FINETUNE:
        return int(cfg.TRAIN.BATCH_SIZE_PER_GPU)
    total, accum = int(cfg.FINETUNE.BATCH_SIZE), int(cfg.TRAIN.ACCUM_STEPS)
    parts = world_size * accum
    if total % parts:
        raise UserError(
            f"FINETUNE.BATCH_SIZE {total} does not split evenly over {world_size} process(es) x "
            f"{accum} accumulation steps (TRAIN.ACCUM_STEPS); make it a multiple of {parts}"
        )
    return total // parts


def build_loader(
    cfg: CfgNode,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    class_names: Sequence[str] | None = None,
    batch_size: int | None = None,
    index_targets: bool = False,
) -> tuple[DataLoader, ImageListDataset]:
    """The loader of one split ('train' or 'test') for process `rank` of `world_size`, and its dataset.

    `class_names` (from a checkpoint) must equal the split's class folders: a different set or
    order would silently map predictions to the wrong classes. Class indices follow
    DATASET.CLASS_MAP when set. `batch_size`: the training batch per process, by default
    `train_batch_per_process`. `index_targets`: see `ImageListDataset`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    is_train = split == "train"
    dataset = build_dataset(cfg, split, index_targets=index_targets)
    if class_names is not None:
        _check_class_names(dataset, list(class_names))

    if is_train:
        batch_size = batch_size or train_batch_per_process(cfg, world_size)
        sampler: Sampler[int] = WindowSampler(_train_sampler(cfg, dataset, rank, world_size, batch_size))
        key = train_batch_key(cfg)
        if len(sampler) < batch_size:
            per_process = "" if key == "TRAIN.BATCH_SIZE_PER_GPU" else " (per process)"
            raise UserError(
                f"{key}{per_process}: {batch_size} is more than the {len(sampler)} images each "
                f"of {world_size} process(es) gets from {dataset.split_dir} per epoch, so an epoch "
                f"would have no batch; lower {key}"
            )
        image_shape = (3, *train_output_size(cfg))
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


def _train_sampler(cfg: CfgNode, dataset: ImageListDataset, rank: int, world_size: int, batch_size: int) -> Sampler:
    """As the release: repeated augmentation only over several replicas (processes, here also
    gradient-accumulation steps); one process shuffles plainly, so an epoch sees every image once."""
    kind = cfg.DATASET.SAMPLER
    accum_steps = int(cfg.TRAIN.ACCUM_STEPS)
    if kind == "repeated_aug" and accum_steps > 1:
        return RepeatAugAccumSampler(dataset, rank=rank, world_size=world_size, accum_steps=accum_steps,
                                     batch_size=batch_size, shuffle=cfg.TRAIN.SHUFFLE)
    if kind == "repeated_aug" and world_size > 1:
        return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=cfg.TRAIN.SHUFFLE)
    if kind == "repeated_aug":
        logger.info("DATASET.SAMPLER repeated_aug: one process shuffles plainly, as the release does")
        kind = "default"
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
    forked worker inherits the training process's SIGINT/SIGTERM/SIGHUP handler, which would log a stop
    request it cannot act on and keep the DataLoader from terminating a stuck worker."""
    if hasattr(os, "setpgid"):  # POSIX
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _check_class_names(dataset: ImageListDataset, expected: list[str]) -> None:
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


def build_mixup(cfg: CfgNode, num_classes: int, batch_size: int | None = None) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing, or None when the config turns both off. `batch_size`:
    the training batch per process, by default `train_batch_per_process` for one process."""
    aug = cfg.AUG
    if not (aug.MIXUP_PROB > 0 and (aug.MIXUP > 0 or aug.MIXCUT > 0)):
        return None
    batch_size = batch_size or train_batch_per_process(cfg, 1)
    if batch_size % 2:
        odd = f"TRAIN.BATCH_SIZE_PER_GPU: {batch_size} is odd" if not cfg.FINETUNE.FINETUNE else (
            f"FINETUNE.BATCH_SIZE: {cfg.FINETUNE.BATCH_SIZE} gives an odd {batch_size} images per process "
            "(split over the processes and TRAIN.ACCUM_STEPS)")
        raise UserError(f"{odd}, but Mixup/CutMix pairs images within a batch; "
                        "use an even batch per process or set AUG.MIXUP_PROB 0")
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

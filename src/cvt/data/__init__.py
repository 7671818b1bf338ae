"""Folder datasets and the transfer datasets' published formats (both surviving bad files), the
release's transforms, loaders, and the digits demo.

The batch contract every loader yields: ``(images, targets, bad_files)``, see `cvt.data.loader`.
"""
from .dataset import (
    IMAGE_EXTENSIONS,
    BadFile,
    BadImageError,
    ImageFolderDataset,
    ImageListDataset,
    check_same_classes,
    load_rgb,
)
from .digits import default_digits_root, ensure_digits_dataset
from .downstream import build_downstream_dataset
from .labels import RealLabels, read_class_map, read_valid_labels
from .loader import (
    Batch,
    BatchCollate,
    RepeatAugAccumSampler,
    ShardSampler,
    WindowSampler,
    build_dataset,
    build_loader,
    build_mixup,
    check_dataset_folders,
    resolve_dataset_root,
    train_batch_per_process,
    usable_cores,
)
from .transforms import build_transform, test_output_size, train_output_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadFile",
    "BadImageError",
    "Batch",
    "BatchCollate",
    "ImageFolderDataset",
    "ImageListDataset",
    "RealLabels",
    "RepeatAugAccumSampler",
    "ShardSampler",
    "WindowSampler",
    "build_dataset",
    "check_dataset_folders",
    "build_downstream_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "check_same_classes",
    "default_digits_root",
    "ensure_digits_dataset",
    "load_rgb",
    "read_class_map",
    "read_valid_labels",
    "resolve_dataset_root",
    "test_output_size",
    "train_batch_per_process",
    "train_output_size",
    "usable_cores",
]

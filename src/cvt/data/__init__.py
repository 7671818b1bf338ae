"""Folder datasets that survive bad files, the release's transforms, loaders, and the digits demo.

The batch contract every loader yields: ``(images, targets, bad_files)``, see `cvt.data.loader`.
"""
from .dataset import (
    IMAGE_EXTENSIONS,
    BadFile,
    BadImageError,
    ImageFolderDataset,
    check_same_classes,
    load_rgb,
)
from .digits import default_digits_root, ensure_digits_dataset
from .loader import (
    Batch,
    BatchCollate,
    ShardSampler,
    build_loader,
    build_mixup,
    resolve_dataset_root,
    usable_cores,
)
from .transforms import build_transform, test_output_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadFile",
    "BadImageError",
    "Batch",
    "BatchCollate",
    "ImageFolderDataset",
    "ShardSampler",
    "build_loader",
    "build_mixup",
    "build_transform",
    "check_same_classes",
    "default_digits_root",
    "ensure_digits_dataset",
    "load_rgb",
    "resolve_dataset_root",
    "test_output_size",
    "usable_cores",
]

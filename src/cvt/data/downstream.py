"""The transfer datasets of the paper, read from their published on-disk formats (no download, no network).

DATASET.DATASET names the format, DATASET.ROOT the folder holding the dataset's own top folder (or
that folder itself), DATASET.TRAIN_SET / TEST_SET the published splits:

* ``cifar10``: ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta); splits train, test.
* ``cifar100``: ``cifar-100-python/`` (train, test, meta; the 100 fine labels); splits train, test.
* ``pets``: ``oxford-iiit-pet/`` (images/*.jpg, annotations/trainval.txt and test.txt), listed by
  torchvision's OxfordIIITPet; splits trainval, test.
* ``flowers102``: ``flowers-102/`` (jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat), read with
  scipy.io.loadmat; splits train, val, test and trainval (train + val).

The CIFAR batches are Python pickles. They are read with an unpickler that admits only plain
containers and NumPy arrays, so a tampered file cannot run code. Every dataset yields the items of
`cvt.data.dataset` (and so the loaders' batch contract); a missing or malformed file stops with one
line naming it and the expected layout.
"""
from __future__ import annotations

import codecs
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import OxfordIIITPet

from ..config import DOWNSTREAM_DATASETS
from ..errors import UserError
from .dataset import ImageListDataset, Item

__all__ = ["CifarDataset", "build_downstream_dataset", "read_cifar_batch"]

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]

_CIFAR = {
    # name: (top folder, {split: batch files}, meta file, label key, class names key)
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_labels", "fine_label_names"),
}
_PETS_FOLDER = "oxford-iiit-pet"
_FLOWERS_FOLDER = "flowers-102"
_FLOWERS_SPLITS = {"train": ("trnid",), "val": ("valid",), "test": ("tstid",), "trainval": ("trnid", "valid")}
_LAYOUTS = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version)",
    "cifar100": "cifar-100-python/{train, test, meta} (the python version)",
    "pets": "oxford-iiit-pet/{images/*.jpg, annotations/trainval.txt, annotations/test.txt}",
    "flowers102": "flowers-102/{jpg/image_00001.jpg..., imagelabels.mat, setid.mat}",
}
_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "pets": ("trainval", "test"),
           "flowers102": tuple(_FLOWERS_SPLITS)}


def _layout_error(name: str, path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}; DATASET.DATASET {name} expects DATASET.ROOT/{_LAYOUTS[name]}")


def _dataset_folder(name: str, root: Path, folder: str) -> Path:
    """ROOT/<folder>, or ROOT itself when it is that folder."""
    if not str(root) or not root.is_dir():
        raise _layout_error(name, root, "DATASET.ROOT folder not found")
    for candidate in (root / folder, root):
        if candidate.name == folder and candidate.is_dir():
            return candidate
    raise _layout_error(name, root / folder, "folder not found")


# --------------------------------------------------------------------------------------------------
# CIFAR: pickled batches, read safely
# --------------------------------------------------------------------------------------------------

try:  # NumPy 2 moved the array internals to numpy._core; pickles name either module
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # How Python 3 writes bytes in protocol 2 pickles: text to bytes, nothing else.
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, "_reconstruct"): _reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Plain containers and NumPy arrays only: any other global (a function to call) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only NumPy arrays are allowed") from None


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """One CIFAR batch or meta file as {str key: value}; UserError for anything else."""
    try:
        with open(path, "rb") as f:
            # 'bytes': the published files were written by Python 2; keys come back as bytes.
            data = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: not a CIFAR batch file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a CIFAR batch file (holds a {type(data).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in data.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class CifarDataset(ImageListDataset):
    """CIFAR images held in memory (N, 32, 32, 3) uint8; no file can be bad, so no item is skipped.

    `samples` name each image as ``<batch file>[<index>]``, for messages.
    """

    def __init__(self, images: np.ndarray, targets: list[int], classes: list[str], split_dir: Path,
                 names: list[str], transform: Transform, split: str) -> None:
        super().__init__([(n, t) for n, t in zip(names, targets)], classes, split_dir, transform, split=split)
        self.images = images

    def __getitem__(self, index: int) -> Item:
        return self.transform(Image.fromarray(self.images[index], "RGB")), self.samples[index][1], []


def _cifar(name: str, root: Path, split: str, transform: Transform) -> CifarDataset:
    folder_name, split_files, meta_file, label_key, names_key = _CIFAR[name]
    folder = _dataset_folder(name, root, folder_name)
    for file in [*split_files[split], meta_file]:
        if not (folder / file).is_file():
            raise _layout_error(name, folder / file, "file not found")
    meta = read_cifar_batch(folder / meta_file)
    if names_key not in meta:
        raise _layout_error(name, folder / meta_file, f"holds no {names_key!r} list")
    classes = [_text(c) for c in meta[names_key]]
    images, targets, names = [], [], []
    for file in split_files[split]:
        batch = read_cifar_batch(folder / file)
        data, labels = batch.get("data"), batch.get(label_key)
        ok = (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
              and isinstance(labels, (list, np.ndarray)) and len(labels) == data.shape[0])
        if not ok:
            raise _layout_error(name, folder / file, f"expected 'data' (N x 3072 uint8 values) and N '{label_key}'")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        targets += [int(t) for t in labels]
        names += [f"{folder / file}[{i}]" for i in range(data.shape[0])]
    if any(not 0 <= t < len(classes) for t in targets):
        raise _layout_error(name, folder, f"labels outside the {len(classes)} classes of {meta_file}")
    return CifarDataset(np.ascontiguousarray(np.concatenate(images)), targets, classes, folder, names, transform, split)


# --------------------------------------------------------------------------------------------------
# Oxford-IIIT Pets and Flowers-102: image files listed by annotation files
# --------------------------------------------------------------------------------------------------


def _pets_samples(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    folder = _dataset_folder("pets", root, _PETS_FOLDER)
    listing = folder / "annotations" / f"{split}.txt"
    for path in (folder / "images", listing):
        if not path.exists():
            raise _layout_error("pets", path, "not found")
    try:
        pets = OxfordIIITPet(str(folder.parent), split=split, target_types="category", download=False)
    except (ValueError, RuntimeError) as e:
        raise _layout_error("pets", listing, f"malformed ({e}); each line should be '<image> <class 1-37> <species> <breed>'") from None
    return [(str(p), int(t)) for p, t in zip(pets._images, pets._labels)], list(pets.classes), listing


def _load_mat(path: Path, key: str) -> np.ndarray:
    # scipy is slow to import and only these files need it.
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise _layout_error("flowers102", path, "file not found")
    try:
        values = loadmat(str(path), squeeze_me=True)[key]
        return np.atleast_1d(np.asarray(values, dtype=np.int64))
    except (KeyError, ValueError, TypeError, OSError, MatReadError) as e:
        raise _layout_error("flowers102", path, f"not a MATLAB file holding {key!r} ({type(e).__name__}: {e})") from None


def _flowers_samples(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    folder = _dataset_folder("flowers102", root, _FLOWERS_FOLDER)
    if not (folder / "jpg").is_dir():
        raise _layout_error("flowers102", folder / "jpg", "folder not found")
    labels = _load_mat(folder / "imagelabels.mat", "labels")  # 1-based class of image i + 1
    ids = np.concatenate([_load_mat(folder / "setid.mat", key) for key in _FLOWERS_SPLITS[split]])
    if labels.min(initial=1) < 1 or ids.min(initial=1) < 1 or ids.max(initial=0) > len(labels):
        raise _layout_error("flowers102", folder / "setid.mat", f"image ids outside the {len(labels)} labels of imagelabels.mat")
    num_classes = int(labels.max())
    samples = [(str(folder / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in sorted(ids.tolist())]
    return samples, [str(c) for c in range(1, num_classes + 1)], folder / "setid.mat"


def build_downstream_dataset(
    name: str,
    root: Path,
    split: str,
    transform: Transform,
    *,
    bad_files: str,
    max_pixels: int,
    replace_bad: bool,
) -> ImageListDataset:
    """Split `split` of the dataset `name` (one of DOWNSTREAM_DATASETS) under `root`."""
    if name not in DOWNSTREAM_DATASETS:
        raise ValueError(f"{name!r} is not one of {DOWNSTREAM_DATASETS}")
    if split not in _SPLITS[name]:
        raise UserError(
            f"DATASET.TRAIN_SET / TEST_SET {split!r} is not a split of {name}; use one of {', '.join(_SPLITS[name])}"
        )
    if name in _CIFAR:
        dataset: ImageListDataset = _cifar(name, root, split, transform)
    else:
        samples, classes, listing = (_pets_samples if name == "pets" else _flowers_samples)(root, split)
        if not samples:
            raise _layout_error(name, listing, f"lists no image for split {split!r}")
        dataset = ImageListDataset(samples, classes, listing, transform, split=split, bad_files=bad_files,
                                   max_pixels=max_pixels, replace_bad=replace_bad)
    logger.info("%s %s: %d images in %d classes", name, split, len(dataset), len(dataset.classes))
    return dataset

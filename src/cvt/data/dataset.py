"""Folder datasets (ROOT/<split>/<class>/<image>) that survive bad files.

The layout and class order are the release's (torchvision ImageFolder: class index = position of the
folder name in sorted order). What differs is what happens when something is wrong:

* a missing split, a split with no class folders or with no images stops with one `UserError` line
  before any training starts;
* class folders may hold links, to files and to folders outside the split; a link back into the
  split or to a folder above it (a loop, or another class's images) is not followed, and said once;
* EXIF orientation is applied on load, so a phone photo trains upright, as it is displayed;
* an unreadable image (empty, truncated, not an image, a decompression bomb) never crashes a run that
  is hours in: with ``bad_files='skip'`` it is reported through the batch and replaced (training) or
  dropped (evaluation); with ``bad_files='stop'`` it stops the run naming the file.

Every item is ``(image, target, bad)`` with ``bad`` the list of ``(path, reason)`` skipped for it;
the loaders' ``(images, targets, bad_files)`` is the batch every loader yields.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info

from ..config import BAD_FILE_POLICIES, DEFAULT_MAX_IMAGE_PIXELS
from ..errors import UserError, short_list

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadFile",
    "BadImageError",
    "ImageFolderDataset",
    "ImageListDataset",
    "Item",
    "check_same_classes",
    "load_rgb",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)

BadFile = tuple[str, str]
"""(path, reason) of a file that could not be used."""
Item = tuple[torch.Tensor | None, int, list[BadFile]]
"""(image or None when dropped, target, bad files skipped for this item)."""


class BadImageError(Exception):
    """A file that cannot be used as an image; `path` and `reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        # Both go to args so the exception pickles across DataLoader worker processes.
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, or raise `BadImageError` saying why not.

    Truncated files are refused (PIL's LOAD_TRUNCATED_IMAGES is never set: a half-grey image is
    silent label noise). The pixel count is checked from the header, before decoding, so a
    decompression bomb costs no memory. PIL's own hard limit (twice its MAX_IMAGE_PIXELS) still
    applies above ``max_pixels``.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file")
        with open(path, "rb") as f:
            with warnings.catch_warnings():
                # The pixel limit below is ours; PIL's warning at its lower threshold is noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f)
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    path,
                    f"{width}x{height} is {width * height:,} pixels, more than the {max_pixels:,} "
                    "allowed (a decompression bomb?); if it is genuine, raise DATASET.MAX_IMAGE_PIXELS "
                    "(`cvt predict`: --max-image-pixels)",
                )
            image.load()  # decode now, while the file is open, so errors surface here
            image = ImageOps.exif_transpose(image)  # upright, as viewers show it
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"refused by PIL as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise BadImageError(path, "not an image file PIL can identify") from err
    except OSError as err:
        raise BadImageError(path, f"cannot read or decode: {err}") from err
    except Exception as err:  # PIL's decoders raise many types (SyntaxError, ValueError, struct.error)
        raise BadImageError(path, f"cannot decode: {type(err).__name__}: {err}") from err
    return _to_rgb(image, path)


def _to_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """8-bit RGB from any PIL mode, keeping the full range of 16-bit and float images."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        # PIL's convert("L") clips these at 255, turning most of a 16-bit image white. Mode "I" is
        # how PIL opens 16-bit PGM/TIFF data, so both are scaled from 0..65535.
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return _gray_to_rgb(values)
    if mode == "F":
        # Float images (scientific TIFFs) conventionally hold 0..1 intensities.
        values = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0.0, 1.0) * 255.0
        return _gray_to_rgb(values)
    if mode == "P" and "transparency" in image.info:
        # Through RGBA, as PIL asks for palettes with transparency; the alpha is then dropped, which
        # gives the same colours as the release's plain convert("RGB").
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise BadImageError(path, f"image mode {mode} cannot be converted to RGB") from err


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.rint(values).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------

def _is_hidden(name: str) -> bool:
    # Hidden entries are never data: '.ipynb_checkpoints' would become a class, macOS '._x.jpg'
    # resource forks would be "images" that fail to decode.
    return name.startswith(".")


def _find_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _list_images(class_dir: Path, split_real: str, walked: set[str]) -> list[str]:
    """Image files under one class folder (subfolders included, as torchvision's), sorted.

    Links to files are followed, and links to folders outside the split folder; a folder already in
    `walked` (real paths, shared by the split's classes, holding every class folder from the start) is
    never entered twice, and a link into the split (real path `split_real`) or above it is not
    followed: a link to '.' would count images again, one to '..' take another class's images, and
    together they would walk forever.
    """
    found: list[str] = []
    pending = [str(class_dir)]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:  # as os.walk, go on without it; unlike it, say so
            logger.warning("%s: cannot list this folder (%s): its images are left out", folder, e.strerror or e)
            continue
        subfolders: list[str] = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            if not entry.is_dir():
                if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(entry.path)
                continue
            real = os.path.realpath(entry.path)
            looping = entry.is_symlink() and (_inside(real, split_real) or _inside(split_real, real))
            if looping or real in walked:
                logger.warning("%s: a link to %s, a folder already in the dataset's walk: not followed", entry.path, real)
                continue
            walked.add(real)
            subfolders.append(entry.path)
        pending.extend(reversed(subfolders))  # depth first in name order, as os.walk's top-down walk
    return found


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

class ImageListDataset(Dataset):
    """Images from a list of ``(path, class index)`` samples, that survives bad files.

    ``index_targets`` makes each item's target its index in ``samples`` instead of its class, for an
    evaluation that needs more about each image than its class (ImageNet-ReaL labels).

    ``replace_bad`` chooses what a skipped bad file becomes: True (training) returns the next
    readable sample instead (following indices, wrapping), so every batch keeps its size, which
    timm's Mixup needs; False (evaluation, where no sample may count twice) returns
    ``(None, target, bad)``, which the loaders' `BatchCollate` drops. ``split_dir`` names the split
    in messages (a folder, or the list file the samples came from).
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        split_dir: Path,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        split: str = "",
        bad_files: str = "skip",
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        replace_bad: bool = True,
        index_targets: bool = False,
    ) -> None:
        if bad_files not in BAD_FILE_POLICIES:
            raise UserError(
                f"DATASET.BAD_FILES: unknown policy {bad_files!r}; use one of {', '.join(BAD_FILE_POLICIES)}"
            )
        self.samples = samples
        self.classes = classes
        self.split_dir = split_dir
        self.split = split or split_dir.name
        self.transform = transform
        self.bad_files = bad_files
        self.max_pixels = max_pixels
        self.replace_bad = replace_bad
        self.index_targets = index_targets

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        bad: list[BadFile] = []
        for step in range(len(self.samples)):
            sample = (index + step) % len(self.samples)
            path, target = self.samples[sample]
            try:
                image = load_rgb(path, self.max_pixels)
            except BadImageError as err:
                bad.append((err.path, err.reason))
                if self.bad_files == "stop":
                    if get_worker_info() is None:
                        raise stop_error(bad[0]) from err
                    # In a worker process a raised UserError would reach the main process wrapped in
                    # a multi-line traceback; the loader raises it there instead (see loader.py).
                    return None, target, bad
                if not self.replace_bad:
                    return None, target, bad
                continue
            return self.transform(image), (sample if self.index_targets else target), bad
        raise UserError(
            f"{self.split_dir}: none of its {len(self.samples)} images can be read "
            f"(e.g. {bad[0][0]}: {bad[0][1]}); fix or replace the files"
        )


class ImageFolderDataset(ImageListDataset):
    """ROOT/<split>/<class>/<image>, class index = position of the class folder in sorted order, or
    in ``class_names`` (a class map, DATASET.CLASS_MAP), which must name exactly the split's folders."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        bad_files: str = "skip",
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        replace_bad: bool = True,
        class_names: Sequence[str] | None = None,
        index_targets: bool = False,
    ) -> None:
        self.root = Path(root)
        split_dir = split_folder(self.root, split)
        classes = _find_classes(split_dir)
        if class_names is not None:
            classes = _mapped_classes(split_dir, classes, list(class_names))
        if not classes:
            raise UserError(
                f"{split_dir}: no class folders; put each class's images in its own subfolder, "
                f"{split_dir}/<class>/<image>"
            )
        samples: list[tuple[str, int]] = []
        empty: list[str] = []
        walked = {os.path.realpath(split_dir / name) for name in classes}
        split_real = os.path.realpath(split_dir)
        for index, name in enumerate(classes):
            files = _list_images(split_dir / name, split_real, walked)
            if not files:
                empty.append(name)
            samples.extend((path, index) for path in files)
        if not samples:
            raise UserError(
                f"{split_dir}: no images in its {len(classes)} class folders "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)}); put the images in {split_dir}/<class>/"
            )
        if empty:
            logger.warning("%s: %d class folder(s) hold no images: %s", split_dir, len(empty), ", ".join(empty))
        super().__init__(samples, classes, split_dir, transform, split=split, bad_files=bad_files,
                         max_pixels=max_pixels, replace_bad=replace_bad, index_targets=index_targets)


def _mapped_classes(split_dir: Path, folders: list[str], class_names: list[str]) -> list[str]:
    """`class_names` (the class map's order) after checking they are exactly the split's folders."""
    missing = sorted(set(class_names) - set(folders))
    unmapped = sorted(set(folders) - set(class_names))
    if missing or unmapped:
        raise UserError(
            f"{split_dir}: class folders differ from DATASET.CLASS_MAP (missing folders: {short_list(missing)}; "
            f"folders not in the map: {short_list(unmapped)}); give the split exactly the map's class folders"
        )
    return class_names


def split_folder(root: Path, split: str) -> Path:
    """ROOT/<split>, the folder of one split of a folder dataset; a UserError when it is not there."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(
            f"{split_dir}: dataset split folder not found; expected the layout "
            f"{root}/{split}/<class>/<image> (check DATASET.ROOT, DATASET.TRAIN_SET, DATASET.TEST_SET)"
        )
    return split_dir


def stop_error(bad: BadFile) -> UserError:
    """The error for a bad file under the 'stop' policy."""
    path, reason = bad
    return UserError(
        f"{path}: {reason}; fix or remove the file, or set DATASET.BAD_FILES skip to skip unreadable images"
    )


def check_same_classes(train: ImageListDataset, val: ImageListDataset) -> None:
    """Raise `UserError` when the two splits do not have the same class folders.

    Different folder sets shift the class indices, so the accuracy would be silently wrong.
    """
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise UserError(
        f"{train.split_dir} and {val.split_dir} have different class folders "
        f"(only in {train.split}: {short_list(only_train)}; only in {val.split}: {short_list(only_val)}); "
        "give both splits the same class folders"
    )


"""The demo dataset: scikit-learn's handwritten digits as a folder dataset.

1,797 real 8x8 scans of the digits 0-9 ship inside scikit-learn, so the demo trains on real images
with no download. They are written as ROOT/{train,val}/<digit>/<index>.png (index = position in
`load_digits`), 32x32 8-bit grayscale, with a fixed stratified 80/20 split.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from ..files import atomic_write_text, ensure_folder

__all__ = ["DIGITS_IMAGE_SIZE", "default_digits_root", "ensure_digits_dataset"]

logger = logging.getLogger(__name__)

DIGITS_IMAGE_SIZE = 32
MARKER = "digits.json"
_FORMAT_VERSION = 1  # bump when the written images change, so old caches are not reused
# Folders this process has already written or checked: a run's two loaders both ask for the dataset,
# and it is announced (written or reused) once.
_READY: set[Path] = set()


def default_digits_root() -> Path:
    """$CVT_CACHE_DIR/digits, else $XDG_CACHE_HOME/cvt/digits, else ~/.cache/cvt/digits."""
    if os.environ.get("CVT_CACHE_DIR"):
        return Path(os.environ["CVT_CACHE_DIR"]).expanduser() / "digits"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "cvt" / "digits"


def _split() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(images 0..16, targets, {'train': indices, 'val': indices}): the fixed stratified split."""
    # Importing scikit-learn can draw from Python's global generator (rich, one of its dependencies,
    # does at import). Training is seeded before it builds its data, so without this the first run in
    # a process would draw other random numbers than the next one with the same seed.
    state = random.getstate()
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    finally:
        random.setstate(state)

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(indices, test_size=0.2, random_state=0, stratify=digits.target)
    return digits.images, digits.target, {"train": np.sort(train), "val": np.sort(val)}


def _manifest(splits: dict[str, np.ndarray]) -> dict:
    return {
        "source": "sklearn.datasets.load_digits",
        "format": _FORMAT_VERSION,
        "image_size": DIGITS_IMAGE_SIZE,
        "classes": 10,
        "counts": {name: int(len(idx)) for name, idx in splits.items()},
    }


def _is_complete(root: Path, manifest: dict) -> bool:
    """The marker says this dataset was written whole, and the files are all still there."""
    try:
        if json.loads((root / MARKER).read_text(encoding="utf-8")) != manifest:
            return False
    except (OSError, ValueError):
        return False
    return all(
        sum(1 for _ in (root / name).glob("*/*.png")) == count
        for name, count in manifest["counts"].items()
    )


def _to_png(scan: np.ndarray) -> Image.Image:
    # 0..16 -> 0..255, upscaled in float so the smooth interpolation loses nothing to rounding.
    small = Image.fromarray((scan * (255.0 / 16.0)).astype(np.float32), "F")
    large = small.resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.Resampling.BICUBIC)
    return Image.fromarray(np.clip(np.rint(np.asarray(large)), 0, 255).astype(np.uint8), "L")


def ensure_digits_dataset(root: Path | None = None) -> Path:
    """The digits dataset's folder, written first if it is not already there complete."""
    root = Path(root).expanduser() if root is not None else default_digits_root()
    if root in _READY:
        return root
    images, targets, splits = _split()
    manifest = _manifest(splits)
    if _is_complete(root, manifest):
        logger.info("Digits dataset: reusing %s", root)
        _READY.add(root)
        return root
    if root.exists():
        if not root.is_dir() or any(root.iterdir()):
            raise UserError(
                f"{root}: exists but is not a complete digits dataset (no valid {MARKER} or files "
                "missing); delete it to have it rebuilt, or set DATASET.ROOT to another folder"
            )
        root.rmdir()  # an empty folder: take its place

    logger.info("Digits dataset: writing %d images (train %d, val %d) to %s", len(targets),
                manifest["counts"]["train"], manifest["counts"]["val"], root)
    # The place comes from the environment, not from an argument: say which variable moves it.
    fix = f"set CVT_CACHE_DIR to a writable folder (the dataset is written to $CVT_CACHE_DIR/{root.name})"
    ensure_folder(root.parent, fix)
    # Built beside the target and renamed into place, so the folder is either complete or absent.
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    except OSError as e:
        raise UserError(f"cannot write in {str(root.parent)!r}: {e.strerror or e}; {fix}") from None
    try:
        for split_name, indices in splits.items():
            for index in indices:
                folder = staging / split_name / str(int(targets[index]))
                folder.mkdir(parents=True, exist_ok=True)
                _to_png(images[index]).save(folder / f"{int(index)}.png", format="PNG")
        atomic_write_text(staging / MARKER, json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(staging, root)
        except OSError:
            # Another process (another rank) finished first; its copy is as good as ours.
            if not _is_complete(root, manifest):
                raise
            logger.info("Digits dataset: another process wrote %s first; using it", root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _READY.add(root)
    return root

"""What several test files share: paths, a tiny spec, and a generated 3-class image folder with the
overrides for a tiny, fast CPU run on it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cvt.config import load_config

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

# Small enough to run in milliseconds, with every feature of the published spec (cls token in the
# last stage, dw_bn projections with strided k/v, three stages).
TINY_SPEC = {
    "NUM_STAGES": 3,
    "DIM_EMBED": [16, 32, 48],
    "NUM_HEADS": [1, 2, 3],
    "DEPTH": [1, 2, 3],
}

CLASSES = ("circle", "cross", "square")
TRAIN_PER_CLASS = (8, 8, 8)
VAL_PER_CLASS = (4, 3, 4)  # 11 images: an odd count, so two ranks get unequal shards


def draw_shape(kind: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A noisy left-right symmetric picture of class `kind`, so horizontal flips change nothing."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    shape = [np.hypot(x, y) < size / 3, (np.abs(x) < 3) | (np.abs(y) < 3), np.maximum(np.abs(x), np.abs(y)) < size / 3][kind]
    image = shape[..., None] * np.array([200, 120 + 40 * kind, 60]) + rng.integers(0, 50, (size, size, 3))
    image = (image + image[:, ::-1]) / 2
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, counts in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for kind, (name, count) in enumerate(zip(CLASSES, counts)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(draw_shape(kind, rng)).save(folder / f"{i}.png")
    return root


def run_opts(data: Path, out: Path, *extra: object) -> list[str]:
    """Overrides for a tiny, fast, CPU run on the generated folder."""
    opts: list[object] = [
        "NAME", "tiny", "OUTPUT_DIR", out, "DATASET.DATASET", "shapes", "DATASET.ROOT", data,
        "MODEL.NUM_CLASSES", len(CLASSES),
        "MODEL.SPEC.DIM_EMBED", TINY_SPEC["DIM_EMBED"], "MODEL.SPEC.NUM_HEADS", TINY_SPEC["NUM_HEADS"],
        "MODEL.SPEC.DEPTH", [1, 1, 1],
        "TRAIN.IMAGE_SIZE", [32, 32], "TEST.IMAGE_SIZE", [32, 32], "TEST.CENTER_CROP", False,
        "AUG.SCALE", (0.8, 1.0),
        "TRAIN.BATCH_SIZE_PER_GPU", 8, "TEST.BATCH_SIZE_PER_GPU", 4, "WORKERS", 0,
        "TRAIN.OPTIMIZER", "adamW", "TRAIN.LR", 2e-3, "TRAIN.WD", 0.05, "TRAIN.WITHOUT_WD_LIST", ["bn", "bias", "ln"],
        "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", 1, "TRAIN.LR_SCHEDULER.ARGS.warmup_lr", 1e-4,
        "TRAIN.END_EPOCH", 2, "PRINT_FREQ", 1, "TENSORBOARD", True,
        *extra,
    ]
    return [str(o) for o in opts]


def config(data: Path, out: Path, *extra: object):
    return load_config(None, run_opts(data, out, *extra))


def epochs_in(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

"""What several test files share: paths, a tiny spec, and a generated 3-class image folder with the
overrides for a tiny, fast CPU run on it."""
from __future__ import annotations

import contextlib
import json
import socket
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


# --------------------------------------------------------------------------------------------------
# The transfer datasets' published on-disk formats, in miniature
# --------------------------------------------------------------------------------------------------


def _cifar_images(rng: np.random.Generator, labels: list[int]) -> np.ndarray:
    """(N, 3072) uint8 rows as CIFAR stores them (channel planes), each showing its class's shape."""
    return np.stack([draw_shape(label % 3, rng).transpose(2, 0, 1).reshape(-1) for label in labels])


def make_cifar(root: Path, name: str = "cifar10", per_batch: int = 6) -> Path:
    """ROOT/cifar-10-batches-py (5 train batches, test_batch, batches.meta) or ROOT/cifar-100-python
    (train, test, meta), pickled as the python version is, with 3 classes of synthetic shapes."""
    import pickle

    rng = np.random.default_rng(0)
    classes = list(CLASSES)
    if name == "cifar10":
        folder, files, meta, label_key, names_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta", "labels", "label_names"
    else:
        folder, files, meta, label_key, names_key = root / "cifar-100-python", ["train", "test"], "meta", "fine_labels", "fine_label_names"
    folder.mkdir(parents=True)
    for file in files:
        labels = [i % 3 for i in range(per_batch)]
        batch = {b"data": _cifar_images(rng, labels), label_key.encode(): labels, b"filenames": [b"x.png"] * per_batch}
        (folder / file).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / meta).write_bytes(pickle.dumps({names_key.encode(): [c.encode() for c in classes]}, protocol=2))
    return root


PET_BREEDS = ("Abyssinian", "beagle", "Bengal")  # capitalised cats, lower-case dogs, as the real list


def make_pets(root: Path, per_class: int = 4) -> Path:
    """ROOT/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/trainval.txt, test.txt}."""
    rng = np.random.default_rng(0)
    folder = root / "oxford-iiit-pet"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for label, breed in enumerate(PET_BREEDS):
        for n in range(1, per_class + 1):
            Image.fromarray(draw_shape(label, rng)).save(folder / "images" / f"{breed}_{n}.jpg")
            species = 1 if breed[0].isupper() else 2
            lines["trainval" if n % 2 else "test"].append(f"{breed}_{n} {label + 1} {species} 1")
    for split, rows in lines.items():
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_flowers(root: Path, per_class: int = 4) -> Path:
    """ROOT/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat} for 3 classes; images 1, 2
    of each class train, 3 val, 4.. test, as MATLAB files written by scipy."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for image_id in range(1, 3 * per_class + 1):
        label = (image_id - 1) % 3
        labels.append(label + 1)
        Image.fromarray(draw_shape(label, rng)).save(folder / "jpg" / f"image_{image_id:05d}.jpg")
        rank = (image_id - 1) // 3
        ids["trnid" if rank < 2 else "valid" if rank == 2 else "tstid"].append(image_id)
    savemat(folder / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(folder / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return root


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now (all sockets held until every port is chosen,
    so two calls' worth can never be the same port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]

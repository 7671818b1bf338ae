"""Label files a dataset can come with: a class map (DATASET.CLASS_MAP), a subset of a model's classes
(TEST.VALID_LABELS) and ImageNet-ReaL's reassessed labels (TEST.REAL_LABELS)."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

__all__ = ["REAL_LABELS_FILE", "RealLabels", "read_class_map", "read_valid_labels"]

# ImageNet-ReaL's file, read from DATASET.ROOT as the release does.
REAL_LABELS_FILE = "real.json"
# An ImageNet validation image's number (1-based), from its file name.
_VAL_IMAGE_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.\w+$")


def _lines(path: Path, key: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: cannot read {path} ({err}); give a text file, one entry a line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    blank = next((number for number, line in enumerate(lines, 1) if not line.strip()), None)
    if blank is not None:
        raise UserError(f"{key}: line {blank} of {path} is empty; remove it (line numbers are class indices)")
    if not lines:
        raise UserError(f"{key}: {path} is empty; give one entry a line")
    return [line.strip() for line in lines]


def read_class_map(path: str | os.PathLike, root: Path) -> list[str]:
    """The class folder names of a class map (timm's convention: one name a line, line number = class
    index). A relative path that is not a file is looked up in the dataset root, as timm does."""
    file = Path(path)
    if not file.is_file() and not file.is_absolute() and (root / file).is_file():
        file = root / file
    if not file.is_file():
        raise UserError(f"DATASET.CLASS_MAP: {path} not found (nor in {root}); give the class map's path")
    names = _lines(file, "DATASET.CLASS_MAP")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"DATASET.CLASS_MAP: {name!r} appears twice in {file}; give each class folder once")
        seen.add(name)
    return names


def read_valid_labels(path: str | os.PathLike, num_classes: int) -> list[int]:
    """The class indices in a TEST.VALID_LABELS file (one a line), sorted and unique: the release keeps
    those logit columns in index order."""
    indices: set[int] = set()
    for number, line in enumerate(_lines(Path(path), "TEST.VALID_LABELS"), 1):
        try:
            index = int(line)
        except ValueError:
            raise UserError(f"TEST.VALID_LABELS: line {number} of {path} is {line!r}, not a class index") from None
        if not 0 <= index < num_classes:
            raise UserError(
                f"TEST.VALID_LABELS: class index {index} (line {number} of {path}) is outside the model's "
                f"{num_classes} classes (MODEL.NUM_CLASSES)"
            )
        indices.add(index)
    return sorted(indices)


@dataclass(frozen=True)
class RealLabels:
    """ImageNet-ReaL labels of a test split's samples, as tensors for counting hits on the device.

    `targets[i]` is sample i's class index, `labels[i]` its ReaL labels padded with -1 (all -1: no ReaL
    label, the image is left out, as in timm's and the release's evaluator).
    """

    targets: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N, L) int64

    @classmethod
    def read(cls, path: Path, samples: Sequence[tuple[str, int]]) -> RealLabels:
        """`path` (real.json: a list, by validation image number, of label lists) for `samples`
        ((file, class index) pairs whose names carry the image number: ILSVRC2012_val_NNNNNNNN.JPEG)."""
        try:
            real = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"TEST.REAL_LABELS: cannot read {path} ({err}); put ImageNet-ReaL's real.json in DATASET.ROOT") from None
        if not isinstance(real, list) or not all(
            isinstance(x, list) and all(isinstance(label, int) and not isinstance(label, bool) for label in x) for x in real
        ):
            raise UserError(f"TEST.REAL_LABELS: {path} is not a list of lists of class indices; use ImageNet-ReaL's real.json")
        rows: list[list[int]] = []
        for file, _ in samples:
            match = _VAL_IMAGE_NUMBER.search(os.path.basename(file))
            number = int(match.group(1)) if match else 0
            if not 1 <= number <= len(real):
                raise UserError(
                    f"TEST.REAL_LABELS: {file} is not one of the {len(real)} images of {path} (ReaL needs the "
                    "ImageNet validation images, named ILSVRC2012_val_NNNNNNNN.JPEG); set TEST.REAL_LABELS false"
                )
            rows.append(real[number - 1])
        width = max(1, max(map(len, rows), default=1))
        labels = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return cls(torch.tensor([target for _, target in samples], dtype=torch.long), labels)

    def to(self, device: torch.device) -> RealLabels:
        return RealLabels(self.targets.to(device), self.labels.to(device))

    def hits(self, top: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """(top-1 hits, top-5 hits, images with ReaL labels) of predictions `top` (B, k) of `samples`
        (B,): a prediction counts when any of its first k classes is one of the image's ReaL labels."""
        labels = self.labels[samples]
        is_real = top.unsqueeze(2).eq(labels.unsqueeze(1)).any(2)  # (B, k): prediction j is a ReaL label
        counted = labels[:, 0] >= 0
        return torch.stack([(is_real[:, :1].any(1) & counted).sum(), (is_real.any(1) & counted).sum(), counted.sum()])

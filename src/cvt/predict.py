"""Predicting classes of image files with any checkpoint the project reads: `Predictor`.

The images are preprocessed as the model was tested: from an experiment file when one is given, else
from what the checkpoint says (`cvt.weights.load.eval_config`), else, for an ImageNet-sized head
only, with the release's ImageNet test transform. An exported ONNX file runs through ONNX Runtime,
with the preprocessing its metadata carries.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import load_config
from .data import IMAGE_EXTENSIONS, BadImageError, build_transform, load_rgb, test_output_size
from .errors import UserError
from .training.session import choose_cpu_threads, cpu_threads
from .weights.deploy import OnnxClassifier
from .weights.load import eval_config, model_for_config
from .weights.read import Checkpoint, read_checkpoint

__all__ = ["Prediction", "Predictor", "image_files", "resolve_device"]

log = logging.getLogger("cvt")


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, best first; `error` instead when the image could not be read."""

    image: str
    classes: list[dict[str, Any]]  # {"index", "class", "prob"}
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "predictions": self.classes}


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files named, and the image files under the folders named (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image {str(item)!r} does not exist; check the path")
    if not files:
        raise UserError(
            f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "give image files, or folders holding them"
        )
    return files


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not a device this command runs on; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


class Predictor:
    """A model with its test transform and class names, ready to classify image files.

    Args:
        weights: any checkpoint the project reads (path, folder, or a read `Checkpoint`), or an ONNX
            file `cvt export` wrote (run by ONNX Runtime on the CPU).
        cfg_file: experiment file or packaged name for the transform and MODEL.SPEC; default: what
            the checkpoint says.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        batch_size: images per forward pass.
        use_ema: read from `weights` (a path) the EMA weights a training checkpoint (`checkpoint.pth`)
            holds, not its model's (a `Checkpoint` is used as read: `read_checkpoint(..., use_ema=True)`).
        max_image_pixels: the largest image read, in pixels; default: the config's DATASET.MAX_IMAGE_PIXELS.
    """

    def __init__(
        self, weights: str | Path | Checkpoint, cfg_file: str | None = None, *, device: str = "auto",
        batch_size: int = 32, use_ema: bool = False, max_image_pixels: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        if isinstance(weights, (str, Path)) and Path(weights).suffix.lower() == ".onnx":
            if use_ema:
                raise UserError(f"{weights}: an ONNX file holds one set of weights; drop --use-ema (export the EMA weights with it)")
            names = self._init_onnx(Path(weights), cfg_file, device)
        else:
            ckpt = weights if isinstance(weights, Checkpoint) else read_checkpoint(weights, use_ema=use_ema)
            self.cfg = eval_config(ckpt, cfg_file)
            self.model, ckpt = model_for_config(ckpt, self.cfg, cfg_file)
            self.device = resolve_device(device)
            self.model.to(self.device).eval()
            names = ckpt.class_names
            # Chosen once: counting the model's multiply-adds is not work for every call of `predict`.
            self.threads = choose_cpu_threads(
                int(self.cfg.CPU_THREADS), self.model, test_output_size(self.cfg), batch_size
            ) if self.device.type == "cpu" else 0
        self.class_names = names or [str(i) for i in range(self.model.num_classes)]
        self.transform = build_transform(self.cfg, is_train=False)
        self.max_image_pixels = max_image_pixels or int(self.cfg.DATASET.MAX_IMAGE_PIXELS)

    def _init_onnx(self, path: Path, cfg_file: str | None, device: str) -> list[str] | None:
        if device not in ("auto", "cpu"):
            raise UserError(f"--device {device}: an ONNX file runs on the CPU here (ONNX Runtime); use --device cpu")
        self.model = OnnxClassifier(path)
        self.device = torch.device("cpu")
        cfg = load_config(cfg_file) if cfg_file else self.model.eval_config()
        if cfg is None:
            raise UserError(f"{path} does not say how its images were preprocessed; give its experiment file with --cfg")
        self.cfg = cfg
        return self.model.class_names

    def predict(self, files: Iterable[str | Path] | str | os.PathLike, topk: int = 5) -> Iterator[Prediction]:
        """One `Prediction` per file, in the order given (one path alone is one file); unreadable files
        give one with `error` set."""
        if isinstance(files, (str, os.PathLike)):  # a string is iterable too: one "file" per character
            files = [files]
        topk = min(topk, self.model.num_classes)
        # In input order: an unreadable file waits in the batch as its error, so it is not reported
        # before the readable files named ahead of it.
        batch: list[tuple[Path, torch.Tensor | str]] = []
        images = 0
        # An ONNX file runs on ONNX Runtime's own threads; a torch model on as many as its size merits.
        threads = contextlib.nullcontext() if isinstance(self.model, OnnxClassifier) else cpu_threads(
            self.threads, self.model, test_output_size(self.cfg), self.batch_size, self.device, announce=False)
        with threads:
            for path in map(Path, files):
                try:
                    batch.append((path, self.transform(load_rgb(path, self.max_image_pixels))))
                    images += 1
                except BadImageError as e:
                    batch.append((path, str(e)))
                if images == self.batch_size:
                    yield from self._classify(batch, topk)
                    batch, images = [], 0
            if batch:
                yield from self._classify(batch, topk)

    def _classify(self, batch: list[tuple[Path, torch.Tensor | str]], topk: int) -> Iterator[Prediction]:
        """The batch's predictions in its order: its images classified in one forward pass, its
        unreadable files (their error) as they are."""
        images = [image for _, image in batch if isinstance(image, torch.Tensor)]
        probs: Iterator[torch.Tensor] = iter(())
        if images:
            with torch.inference_mode():
                probs = iter(self.model(torch.stack(images).to(self.device)).float().softmax(dim=-1).cpu())
        for path, image in batch:
            if isinstance(image, str):
                yield Prediction(str(path), [], error=image)
                continue
            values, indices = next(probs).topk(topk)
            classes = [{"index": int(i), "class": self.class_names[int(i)], "prob": round(float(p), 6)}
                       for p, i in zip(values, indices)]
            yield Prediction(str(path), classes)

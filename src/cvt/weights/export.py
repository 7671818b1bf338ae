"""Writing weights: the release's layout, safetensors with what the model needs, and Hugging Face's;
and through `deploy`, verified ONNX, TorchScript and torch.export files.

Every file is written atomically (`cvt.files`), so a crash never leaves a half-written file behind,
with a checksum that reading verifies (a .sha256 beside a torch file, `sha256` safetensors metadata).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from ..errors import UserError
from ..files import atomic_torch_save, atomic_write_bytes, atomic_write_text
from ..models.convert import checkpoint_filter_fn, hf_config_from_spec, hf_unsupported, official_to_hf
from ..models.cvt import ConvolutionalVisionTransformer
from ..data.transforms import eval_transform_settings
from .deploy import DEPLOY_FORMATS, deploy, require_dependencies
from .hf_preprocessor import PREPROCESSOR_FILE, hf_preprocessor_config
from .load import checkpoint_config, eval_config, model_for_config
from .read import read_checkpoint, tensor_digest

__all__ = ["EXPORT_FORMATS", "export_checkpoint", "save_hf", "save_official", "save_safetensors"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("official", "safetensors", "hf", *DEPLOY_FORMATS)


def _cpu_state_dict(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    return {k: v.detach().cpu().clone() for k, v in checkpoint_filter_fn(sd).items()}


def save_official(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save a plain state dict with the release's keys (what its model zoo and tools use), atomically."""
    atomic_torch_save(_cpu_state_dict(model_or_state_dict), path)
    return Path(path)


def save_safetensors(
    model: ConvolutionalVisionTransformer,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    eval_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Save weights with the release's keys as .safetensors, with spec, activation, class names and
    the test transform (`eval_settings`, see ``cvt.data.transforms.eval_transform_settings``)."""
    metadata = {"format": "cvt", "spec": json.dumps(model.spec.to_dict()), "act": model.act}
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    if eval_settings is not None:
        metadata["eval_transform"] = json.dumps(dict(eval_settings))
    tensors = {k: v.contiguous() for k, v in _cpu_state_dict(model).items()}
    metadata["sha256"] = tensor_digest(tensors)
    atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))
    return Path(path)


HF_FILES = ("model.safetensors", "config.json", PREPROCESSOR_FILE)


def _check_hf_folder(folder: Path, force: bool) -> None:
    """Refuse to replace files already in `folder` unless `force`."""
    existing = [name for name in HF_FILES if (folder / name).exists()]
    if existing and not force:
        raise UserError(
            f"{str(folder)!r} already holds {', '.join(existing)}; export to an empty folder, or give --force to replace them"
        )


def save_hf(
    model: torch.nn.Module,
    folder: str | Path,
    class_names: Sequence[str] | None = None,
    eval_settings: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``CvtForImageClassification.from_pretrained``
    reads, and with `eval_settings` (the test transform) ``preprocessor_config.json`` for
    ``AutoImageProcessor``. A model running QuickGELU is exported with a warning: the port computes
    exact GELU. A model transformers' CvT cannot run (`hf_unsupported`) is refused, and files already in
    `folder` are replaced only with `force`: in both cases nothing is written."""
    folder = Path(folder)
    unsupported = hf_unsupported(model.spec.to_dict())
    if unsupported:
        raise UserError(
            f"{folder}: not exported: transformers' CvtForImageClassification cannot run this model: "
            f"{unsupported}; export it as safetensors or in the official layout instead"
        )
    _check_hf_folder(folder, force)
    if getattr(model, "act", "gelu") != "gelu":
        log.warning(
            "exporting a QuickGELU model to the Hugging Face layout: transformers' CvT runs exact GELU, "
            "so its outputs will differ slightly from this model's"
        )
    num_classes = model.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
    tensors = {k: v.detach().cpu().contiguous() for k, v in official_to_hf(model.state_dict()).items()}
    config = hf_config_from_spec(model.spec.to_dict(), num_classes, class_names, act=model.act)
    metadata = {"format": "pt", "sha256": tensor_digest(tensors)}
    atomic_write_bytes(folder / "model.safetensors", safetensors_save(tensors, metadata=metadata))
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    if eval_settings is None:  # a replaced folder must not keep another model's preprocessing
        (folder / PREPROCESSOR_FILE).unlink(missing_ok=True)
    else:
        text = json.dumps(hf_preprocessor_config(eval_settings), indent=2) + "\n"
        atomic_write_text(folder / PREPROCESSOR_FILE, text)
    return folder


def export_checkpoint(
    weights: str | os.PathLike, fmt: str, output: str | os.PathLike, cfg_file: str | os.PathLike | None = None,
    force: bool = False, *, use_ema: bool = False,
) -> ConvolutionalVisionTransformer:
    """Convert any checkpoint the project reads to `fmt` (one of `EXPORT_FORMATS`) at `output`; with
    `use_ema` the EMA weights a training checkpoint holds (`read_checkpoint`).

    The official layout is a bare state dict; the others keep how images are to be preprocessed, from
    `cfg_file` or from what the checkpoint says. The deployment formats (onnx, torchscript, exported)
    need to know it (an ImageNet head falls back to the release's ImageNet test transform) and are verified
    against the model after writing (`cvt.weights.deploy`). An hf export replaces files already in the
    `output` folder only with `force`. Returns the model that was written."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if fmt in DEPLOY_FORMATS:
        require_dependencies(fmt)  # before reading and building anything
    if fmt == "hf":
        _check_hf_folder(Path(output), force)
    ckpt = read_checkpoint(weights, use_ema=use_ema)
    if fmt in DEPLOY_FORMATS:
        cfg = eval_config(ckpt, cfg_file)
    else:
        cfg = checkpoint_config(ckpt, cfg_file) if fmt != "official" or cfg_file else None
    model, ckpt = model_for_config(ckpt, cfg, cfg_file)
    eval_settings = eval_transform_settings(cfg) if cfg is not None else None
    if fmt == "official":
        save_official(model, output)
    elif fmt == "safetensors":
        save_safetensors(model, output, ckpt.class_names, eval_settings)
    elif fmt == "hf":
        save_hf(model, output, ckpt.class_names, eval_settings, force=force)
    else:
        deploy(model, fmt, output, cfg, ckpt.class_names)
    return model

"""Reading, loading and writing CvT weights in every supported format, safely and strictly.

Formats read (all through ``torch.load(weights_only=True)`` or safetensors, so no file can run code):

* official model-zoo files: a plain state dict with the release's keys;
* official training checkpoints: ``{'state_dict': ..., 'optimizer': ..., 'epoch': ..., 'perf': ...}``;
* DataParallel / DDP / torch.compile prefixes (``module.``, ``_orig_mod.``);
* Hugging Face ``CvtForImageClassification`` / ``CvtModel`` weights: ``model.safetensors`` or
  ``pytorch_model.bin``, or a folder holding one with its ``config.json``;
* the project's own ``checkpoint.pth`` and ``.safetensors`` exports (which carry spec and class names).

Loading is strict: a file that does not fit raises one error that lists the missing, unexpected and
mis-shaped keys, never a partial load.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save

from ..errors import UserError
from ..io import atomic_torch_save, atomic_write_bytes
from ..models.cvt import ConvolutionalVisionTransformer, CvtSpec, checkpoint_filter_fn, create_model, list_models, model_spec
from .hf import (
    PREPROCESSOR_FILE,
    class_names_from_hf_config,
    eval_settings_from_hf_preprocessor,
    is_hf_state_dict,
    num_labels_from_hf_config,
    spec_from_hf_config,
)

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HEAD_KEYS = ("head.weight", "head.bias")
_LIST_LIMIT = 5


@dataclass
class Checkpoint:
    """Weights read from a file, converted to the model's (official) keys, plus what the file says."""

    state_dict: dict[str, torch.Tensor]
    source: str
    format: str  # 'official', 'official-training', 'huggingface', 'cvt', 'cvt-safetensors', 'state-dict'
    spec: dict[str, Any] | None = None
    act: str | None = None
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the rest of a training checkpoint
    # The test transform the weights were evaluated with ({config key: value}), where the file says.
    eval_settings: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int | None:
        head = self.state_dict.get("head.weight")
        return None if head is None else head.shape[0]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as f:
        magic = f.read(2)
    # torch.save writes a zip archive ("PK"); older torch versions a pickle (protocol marker 0x80).
    if magic not in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise UserError(
            f"{str(path)!r} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
            "give a .pth/.pt/.bin checkpoint, a .safetensors file or a Hugging Face model folder"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # not plain tensors and containers: refused before anything runs
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt or holds Python objects other than tensors and plain "
            "containers; refused, because loading it could run code (re-save it as a state dict or .safetensors)"
        ) from e
    except Exception as e:  # truncated zip, bad magic number, EOF: the file is damaged
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__  # the first sentence
        raise UserError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({reason[:160]}); use an intact copy"
        ) from e


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = safetensors_load_file(path, device="cpu")
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(header_len)).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(f"checkpoint {str(path)!r} is truncated or corrupt ({e}); use an intact copy") from e
    return tensors, metadata


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> Checkpoint:
    """Read weights from a file, folder or in-memory dict, in any supported format."""
    if isinstance(source, Mapping):
        return _from_object(dict(source), "<state dict>")
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; check the path")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {str(path)!r} is empty (0 bytes); use an intact copy")
    if path.suffix == ".safetensors":
        tensors, metadata = _safetensors_load(path)
        return _from_safetensors(tensors, metadata, str(path))
    return _from_object(_torch_load(path), str(path))


def _read_folder(folder: Path) -> Checkpoint:
    weights = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise UserError(f"folder {str(folder)!r} holds none of {', '.join(_WEIGHT_FILES)}; point at a weights file or a Hugging Face model folder")
    ckpt = read_checkpoint(weights)
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{str(config_file)!r} is not valid JSON ({e})") from e
        if config.get("model_type") == "cvt":
            ckpt.spec = spec_from_hf_config(config)
            ckpt.class_names = class_names_from_hf_config(config)
            if num_labels_from_hf_config(config) != ckpt.num_classes:
                ckpt.class_names = None
    preprocessor_file = folder / PREPROCESSOR_FILE
    if preprocessor_file.is_file():
        try:
            preprocessor = json.loads(preprocessor_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{str(preprocessor_file)!r} is not valid JSON ({e})") from e
        ckpt.eval_settings = eval_settings_from_hf_preprocessor(preprocessor) or ckpt.eval_settings
    return ckpt


def _from_safetensors(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> Checkpoint:
    if metadata.get("format") == "cvt":
        return Checkpoint(
            state_dict=checkpoint_filter_fn(tensors),
            source=source,
            format="cvt-safetensors",
            spec=json.loads(metadata["spec"]) if "spec" in metadata else None,
            act=metadata.get("act"),
            class_names=json.loads(metadata["class_names"]) if "class_names" in metadata else None,
            eval_settings=_json_metadata(metadata, "eval_transform", source),
        )
    return _from_object(tensors, source)


def _json_metadata(metadata: Mapping[str, str], key: str, source: str) -> Any:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise UserError(
            f"checkpoint {source!r}: its {key!r} metadata is not valid JSON ({e}); use an intact copy"
        ) from None


def _from_object(obj: Any, source: str) -> Checkpoint:
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint {source!r} holds a {type(obj).__name__}, not a state dict; is it a CvT checkpoint?")
    if "model" in obj and "epoch" in obj and _is_state_dict(obj["model"]):  # the project's checkpoint.pth
        extra = {k: v for k, v in obj.items() if k != "model"}
        return Checkpoint(
            state_dict=checkpoint_filter_fn(obj["model"]),
            source=source,
            format="cvt",
            spec=obj.get("spec"),
            act=obj.get("act"),
            class_names=list(obj["class_names"]) if obj.get("class_names") else None,
            extra=extra,
        )
    if "state_dict" in obj and _is_state_dict(obj["state_dict"]):  # the release's training checkpoint
        extra = {k: v for k, v in obj.items() if k != "state_dict"}
        return Checkpoint(checkpoint_filter_fn(obj["state_dict"]), source, "official-training", extra=extra)
    if not _is_state_dict(obj):
        keys = ", ".join(list(map(str, obj))[:_LIST_LIMIT])
        raise UserError(f"checkpoint {source!r} is not a CvT state dict (top-level keys: {keys}); is it the right file?")
    if is_hf_state_dict(obj):
        return Checkpoint(checkpoint_filter_fn(obj), source, "huggingface", act="gelu")
    return Checkpoint(checkpoint_filter_fn(obj), source, "state-dict")


# --------------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------------


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    more = f", ... +{len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
    return f"[{shown}{more}]"


def _selected(key: str, layers: Sequence[str] | None) -> bool:
    return layers is None or "*" in layers or key.split(".")[0] in layers


def load_checkpoint(
    model: ConvolutionalVisionTransformer,
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    strict: bool = True,
    *,
    backbone_only: bool = False,
    layers: Sequence[str] | None = None,
) -> Checkpoint:
    """Load weights into ``model``.

    Args:
        source: a path, folder, state dict, or an already read :class:`Checkpoint`.
        strict: every selected key must exist on both sides with the same shape; otherwise one
            :class:`UserError` lists the missing, unexpected and mis-shaped keys.
        backbone_only: leave the head out and re-initialise it (fine-tuning to another class count).
        layers: load only keys under these top-level names (``['stage0', 'stage1']``; ``['*']`` = all),
            the release's MODEL.PRETRAINED_LAYERS.

    Weights from the Hugging Face port switch the model to exact GELU, which they were trained with
    (logged). Returns the read :class:`Checkpoint` (class names, spec, training state).
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    incoming = {k: v for k, v in ckpt.state_dict.items() if _selected(k, layers)}
    own = model.state_dict()
    expected = {k for k in own if _selected(k, layers)}

    is_bare_backbone = ckpt.format == "huggingface" and not any(k in incoming for k in ("norm.weight", *_HEAD_KEYS))
    if backbone_only or is_bare_backbone:
        incoming = {k: v for k, v in incoming.items() if k not in _HEAD_KEYS}
        expected -= set(_HEAD_KEYS)
    if is_bare_backbone:  # transformers' CvtModel has neither the final LayerNorm nor the head
        expected -= {"norm.weight", "norm.bias"}

    missing = sorted(expected - incoming.keys())
    unexpected = sorted(incoming.keys() - own.keys())
    mis_shaped = sorted(k for k in incoming.keys() & own.keys() if incoming[k].shape != own[k].shape)
    if strict and (missing or unexpected or mis_shaped):
        raise UserError(_mismatch_message(ckpt, model, missing, unexpected, mis_shaped, incoming, own))
    loadable = {k: v for k, v in incoming.items() if k in own and k not in mis_shaped}
    model.load_state_dict(loadable, strict=False)

    if backbone_only or is_bare_backbone:
        model.reset_classifier(model.num_classes)
        log.info("loaded the backbone from %s; the head (%d classes) is freshly initialised", ckpt.source, model.num_classes)
    if is_bare_backbone:
        log.info("%s is a bare CvtModel without the final LayerNorm: it keeps its initial values", ckpt.source)
    if not strict and (missing or unexpected or mis_shaped):
        log.warning(
            "partial load from %s: %d missing, %d unexpected, %d mis-shaped keys left out",
            ckpt.source, len(missing), len(unexpected), len(mis_shaped),
        )
    wanted_act = ckpt.act or ("gelu" if ckpt.format == "huggingface" else None)
    if wanted_act and wanted_act != model.act:
        log.warning("weights from %s were trained with %s; the model now runs %s too", ckpt.source, wanted_act, wanted_act)
        model.set_activation(wanted_act)
    return ckpt


def _mismatch_message(
    ckpt: Checkpoint,
    model: ConvolutionalVisionTransformer,
    missing: list[str],
    unexpected: list[str],
    mis_shaped: list[str],
    incoming: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected {_listing(unexpected)}")
    if mis_shaped:
        shapes = [f"{k}: file {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}" for k in mis_shaped]
        parts.append(f"{len(mis_shaped)} mis-shaped {_listing(shapes)}")
    hint = "; is it a checkpoint of this architecture?"
    if set(mis_shaped) <= set(_HEAD_KEYS) and not missing and not unexpected:
        hint = (
            f"; the file has {ckpt.num_classes} classes and the model {model.num_classes}: "
            "set MODEL.NUM_CLASSES to match, or fine-tune from it (MODEL.PRETRAINED, or backbone_only=True)"
        )
    return f"checkpoint {ckpt.source!r} does not fit the model: " + ", ".join(parts) + hint


# --------------------------------------------------------------------------------------------------
# Building a model for a checkpoint
# --------------------------------------------------------------------------------------------------


def infer_spec(ckpt: Checkpoint) -> dict[str, Any]:
    """The MODEL.SPEC of a checkpoint: stored in it, or a named variant whose shapes it matches."""
    if ckpt.spec:
        return dict(ckpt.spec)
    sd = ckpt.state_dict
    stages = sorted({int(k[5:].split(".")[0]) for k in sd if k.startswith("stage")})
    dims = [sd[f"stage{i}.patch_embed.proj.weight"].shape[0] for i in stages if f"stage{i}.patch_embed.proj.weight" in sd]
    depths = [len({k.split(".")[2] for k in sd if k.startswith(f"stage{i}.blocks.")}) for i in stages]
    for name in list_models():
        spec = model_spec(name)
        if list(spec.dim_embed) == dims and list(spec.depth) == depths:
            return spec.to_dict()
    raise UserError(
        f"cannot tell the architecture of {ckpt.source!r} (widths {dims}, depths {depths}); "
        "give its experiment file (--cfg) so MODEL.SPEC is known"
    )


def model_from_checkpoint(
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    spec: Mapping[str, Any] | CvtSpec | None = None,
) -> tuple[ConvolutionalVisionTransformer, Checkpoint]:
    """Build the model a checkpoint was saved from (spec, class count, activation) and load it strictly."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    if ckpt.num_classes is None:
        raise UserError(f"checkpoint {ckpt.source!r} has no classifier head; build the model yourself and load it with backbone_only=True")
    model = create_model(spec if spec is not None else infer_spec(ckpt), num_classes=ckpt.num_classes, act=ckpt.act or "quick_gelu")
    load_checkpoint(model, ckpt)
    return model, ckpt


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


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
    atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))
    return Path(path)

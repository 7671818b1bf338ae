"""Hugging Face transformers' CvT port: key names, config.json, and export.

The port (``CvtForImageClassification`` / ``CvtModel``) has the same tensors as the release under
other names. It runs exact GELU where the release runs QuickGELU, so a model holding its weights must
run ``act='gelu'``. This module needs no transformers install: it only renames keys and writes JSON.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from ..io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"

# (official suffix, Hugging Face suffix) inside one block, stage or the network top.
_BLOCK_NAMES = [
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.conv_proj_q.conv.", "attention.attention.convolution_projection_query.convolution_projection.convolution."),
    ("attn.conv_proj_k.conv.", "attention.attention.convolution_projection_key.convolution_projection.convolution."),
    ("attn.conv_proj_v.conv.", "attention.attention.convolution_projection_value.convolution_projection.convolution."),
    ("attn.conv_proj_q.bn.", "attention.attention.convolution_projection_query.convolution_projection.normalization."),
    ("attn.conv_proj_k.bn.", "attention.attention.convolution_projection_key.convolution_projection.normalization."),
    ("attn.conv_proj_v.bn.", "attention.attention.convolution_projection_value.convolution_projection.normalization."),
    ("attn.proj_q.", "attention.attention.projection_query."),
    ("attn.proj_k.", "attention.attention.projection_key."),
    ("attn.proj_v.", "attention.attention.projection_value."),
    ("attn.proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]
_STAGE_NAMES = [
    ("patch_embed.proj.", "embedding.convolution_embeddings.projection."),
    ("patch_embed.norm.", "embedding.convolution_embeddings.normalization."),
    ("cls_token", "cls_token"),
]
_TOP_NAMES = [("norm.", "layernorm."), ("head.", "classifier.")]

_OFFICIAL_BLOCK = re.compile(r"^stage(\d+)\.blocks\.(\d+)\.(.+)$")
_OFFICIAL_STAGE = re.compile(r"^stage(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(?:cvt\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$")
_HF_STAGE = re.compile(r"^(?:cvt\.)?encoder\.stages\.(\d+)\.(.+)$")


def _rename(rest: str, table: Sequence[tuple[str, str]], reverse: bool) -> str | None:
    for official, hf in table:
        src, dst = (hf, official) if reverse else (official, hf)
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def is_hf_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("cvt.encoder.", "encoder.stages.")) for k in state_dict)


def _convert(state_dict: Mapping[str, torch.Tensor], to_hf: bool, base_model_prefix: str = "cvt.") -> dict[str, torch.Tensor]:
    if to_hf:
        block, stage = _OFFICIAL_BLOCK, _OFFICIAL_STAGE
        block_key, stage_key = f"{base_model_prefix}encoder.stages.{{}}.layers.{{}}.{{}}", f"{base_model_prefix}encoder.stages.{{}}.{{}}"
    else:
        block, stage = _HF_BLOCK, _HF_STAGE
        block_key, stage_key = "stage{}.blocks.{}.{}", "stage{}.{}"
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        if m := block.match(key):
            rest = _rename(m.group(3), _BLOCK_NAMES, reverse=not to_hf)
            new = rest and block_key.format(m.group(1), m.group(2), rest)
        elif m := stage.match(key):
            rest = _rename(m.group(2), _STAGE_NAMES, reverse=not to_hf)
            new = rest and stage_key.format(m.group(1), rest)
        else:
            new = _rename(key, _TOP_NAMES, reverse=not to_hf)
        if new is None and to_hf:
            raise KeyError(f"no Hugging Face name for key {key!r}")
        out[new or key] = value
    return out


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face keys to the release's. Keys it does not know are kept as they are, so a
    strict load reports them as unexpected rather than losing them silently."""
    return _convert(state_dict, to_hf=False)


def official_to_hf(state_dict: Mapping[str, torch.Tensor], base_model_prefix: str = "cvt.") -> dict[str, torch.Tensor]:
    """Rename the release's keys to ``CvtForImageClassification``'s."""
    return _convert(state_dict, to_hf=True, base_model_prefix=base_model_prefix)


# config.json <-> MODEL.SPEC --------------------------------------------------------------------

# (MODEL.SPEC key, CvtConfig field)
_CONFIG_FIELDS = [
    ("PATCH_SIZE", "patch_sizes"),
    ("PATCH_STRIDE", "patch_stride"),
    ("PATCH_PADDING", "patch_padding"),
    ("DIM_EMBED", "embed_dim"),
    ("NUM_HEADS", "num_heads"),
    ("DEPTH", "depth"),
    ("MLP_RATIO", "mlp_ratio"),
    ("ATTN_DROP_RATE", "attention_drop_rate"),
    ("DROP_RATE", "drop_rate"),
    ("DROP_PATH_RATE", "drop_path_rate"),
    ("QKV_BIAS", "qkv_bias"),
    ("CLS_TOKEN", "cls_token"),
    ("QKV_PROJ_METHOD", "qkv_projection_method"),
    ("KERNEL_QKV", "kernel_qkv"),
    ("PADDING_KV", "padding_kv"),
    ("STRIDE_KV", "stride_kv"),
    ("PADDING_Q", "padding_q"),
    ("STRIDE_Q", "stride_q"),
]


def spec_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """MODEL.SPEC (upper-case keys) from a transformers ``CvtConfig`` dict."""
    spec: dict[str, Any] = {"NUM_STAGES": len(config["embed_dim"])}
    for ours, theirs in _CONFIG_FIELDS:
        if theirs in config:
            spec[ours] = list(config[theirs])
    return spec


def num_labels_from_hf_config(config: Mapping[str, Any]) -> int | None:
    if "id2label" in config:
        return len(config["id2label"])
    return config.get("num_labels")


def class_names_from_hf_config(config: Mapping[str, Any]) -> list[str] | None:
    labels = config.get("id2label")
    if not labels:
        return None
    return [labels[str(i)] if str(i) in labels else labels[i] for i in range(len(labels))]


def hf_config_from_spec(spec: Mapping[str, Any], num_classes: int, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        "num_channels": 3,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
    }
    for ours, theirs in _CONFIG_FIELDS:
        config[theirs] = list(spec[ours])
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(num_classes)]
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    return config


# transformers' CvT checkpoints preprocess with ConvNextImageProcessor: below 384 px it resizes the
# shortest edge to size / crop_pct and centre-crops a size x size square; from 384 px on it resizes
# to size x size. The key below holds this project's exact settings beside those fields.
_HF_PROCESSOR = "ConvNextImageProcessor"
_EXACT_SETTINGS_KEY = "cvt_eval_transform"
_HF_CROP_FROM = 384


def hf_preprocessor_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json`` for the test transform `settings` (see
    ``cvt.data.transforms.eval_transform_settings``), as close as transformers' processor can say it."""
    from ..data.transforms import CROP_PCT

    width, height = settings["TEST.IMAGE_SIZE"]
    size, crop = width, settings["TEST.CENTER_CROP"]
    if (not crop and width != height) or crop != (size < _HF_CROP_FROM):
        log.warning(
            "transformers' image processor cannot express this test transform (TEST.IMAGE_SIZE %s, "
            "TEST.CENTER_CROP %s) exactly: AutoImageProcessor will %s; cvt reads the exact settings",
            [width, height], crop, "crop a square" if size < _HF_CROP_FROM else "resize without cropping",
        )
    return {
        "image_processor_type": _HF_PROCESSOR,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "crop_pct": CROP_PCT if crop else 1.0,
        "resample": settings["TEST.INTERPOLATION"],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(settings["INPUT.MEAN"]),
        "image_std": list(settings["INPUT.STD"]),
        _EXACT_SETTINGS_KEY: dict(settings),
    }


def eval_settings_from_hf_preprocessor(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The test transform settings a ``preprocessor_config.json`` describes, or None when this
    project's transform cannot reproduce it."""
    from ..config import get_defaults
    from ..data.transforms import CROP_PCT

    if not isinstance(config, Mapping):
        return None
    if isinstance(config.get(_EXACT_SETTINGS_KEY), Mapping):
        return dict(config[_EXACT_SETTINGS_KEY])
    # Older files (Microsoft's hub folders among them) name a feature extractor and give size as an int.
    kind = config.get("image_processor_type") or config.get("feature_extractor_type")
    size = config.get("size")
    size = size.get("shortest_edge") if isinstance(size, Mapping) else size
    if kind not in (_HF_PROCESSOR, "ConvNextFeatureExtractor") or not isinstance(size, int):
        return None
    if not config.get("do_normalize", True):
        return None
    crop_pct = config.get("crop_pct", CROP_PCT)
    if not isinstance(crop_pct, (int, float)):
        return None
    if size < _HF_CROP_FROM and abs(crop_pct - CROP_PCT) > 1e-6:
        return None  # a crop other than the release's 0.875
    defaults = get_defaults()
    return {
        "TEST.IMAGE_SIZE": [size, size],
        "TEST.CENTER_CROP": size < _HF_CROP_FROM,
        "TEST.INTERPOLATION": int(config.get("resample", 3)),
        "INPUT.MEAN": list(config.get("image_mean", defaults.INPUT.MEAN)),
        "INPUT.STD": list(config.get("image_std", defaults.INPUT.STD)),
    }


def save_hf(
    model: torch.nn.Module,
    folder: str | Path,
    class_names: Sequence[str] | None = None,
    eval_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``CvtForImageClassification.from_pretrained``
    reads, and with `eval_settings` (the test transform) ``preprocessor_config.json`` for
    ``AutoImageProcessor``. A model running QuickGELU is exported with a warning: the port computes
    exact GELU."""
    folder = Path(folder)
    if getattr(model, "act", "gelu") != "gelu":
        log.warning(
            "exporting a QuickGELU model to the Hugging Face layout: transformers' CvT runs exact GELU, "
            "so its outputs will differ slightly from this model's"
        )
    num_classes = model.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
    tensors = {k: v.detach().cpu().contiguous() for k, v in official_to_hf(model.state_dict()).items()}
    config = hf_config_from_spec(model.spec.to_dict(), num_classes, class_names)
    atomic_write_bytes(folder / "model.safetensors", safetensors_save(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    if eval_settings is not None:
        text = json.dumps(hf_preprocessor_config(eval_settings), indent=2) + "\n"
        atomic_write_text(folder / PREPROCESSOR_FILE, text)
    return folder

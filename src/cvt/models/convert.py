"""Foreign checkpoint layouts -> this model's keys (the release's), and back.

* DataParallel / DDP / torch.compile prefixes (``module.``, ``_orig_mod.``);
* Hugging Face transformers' port (``CvtForImageClassification`` / ``CvtModel``): the same tensors
  under other names, and its ``config.json`` fields for MODEL.SPEC. The port runs exact GELU where
  the release runs QuickGELU; which one a checkpoint needs is the loader's business (`cvt.weights`).

No transformers install is needed: this only renames keys and maps config fields.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .spec import ACTIVATIONS

__all__ = [
    "activation_from_hf_config",
    "checkpoint_filter_fn",
    "class_names_from_hf_config",
    "hf_config_from_spec",
    "hf_to_official",
    "hf_unsupported",
    "is_hf_state_dict",
    "num_labels_from_hf_config",
    "official_to_hf",
    "spec_from_hf_config",
]


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Convert a state dict in any supported layout (official release, DataParallel/DDP prefixes,
    Hugging Face transformers) to this model's keys, which are the official ones. `model` is unused:
    timm's pretrained loader passes it."""
    state_dict = dict(state_dict)
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    if is_hf_state_dict(state_dict):
        state_dict = hf_to_official(state_dict)
    return state_dict


# Hugging Face key names ----------------------------------------------------------------------------

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


def hf_unsupported(spec: Mapping[str, Any]) -> str | None:
    """Why transformers' `CvtForImageClassification` cannot run a model of `spec` (MODEL.SPEC keys),
    or None when it can. Its CvT builds stage i's drop-path rates as a list of DEPTH[i] entries and
    takes entry i of it for each block (an IndexError when 0 < DEPTH[i] <= i), builds the q/k/v projections' weights
    for 'dw_bn' only, and pools through the last stage's cls token."""
    depths = list(spec["DEPTH"])
    short = [i for i, depth in enumerate(depths) if 0 < depth <= i]
    if short:
        return (f"DEPTH {depths} has a stage i with 0 < DEPTH[i] <= i (stage {short[0]}), and transformers' CvT "
                "indexes each stage's drop-path list by the stage number")
    methods = list(spec["QKV_PROJ_METHOD"])
    if any(method != "dw_bn" for method in methods):
        return f"QKV_PROJ_METHOD {methods}: transformers' CvT runs 'dw_bn' projections only"
    if not spec["CLS_TOKEN"][-1]:
        return "CLS_TOKEN is false in the last stage, and transformers' CvT classifies from that cls token"
    return None


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


# config.json key under which this project records the activation its export computes; transformers
# ignores unknown keys, and a file read back then runs what it was exported with.
HF_ACTIVATION_KEY = "cvt_activation"


def activation_from_hf_config(config: Mapping[str, Any]) -> str | None:
    act = config.get(HF_ACTIVATION_KEY)
    return act if act in ACTIVATIONS else None


def hf_config_from_spec(
    spec: Mapping[str, Any], num_classes: int, class_names: Sequence[str] | None = None, act: str | None = None
) -> dict[str, Any]:
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
    if act is not None:
        config[HF_ACTIVATION_KEY] = act
    return config


"""Loading weights into a model, strictly, and building the model a checkpoint was saved from.

Loading is strict: a file that does not fit raises one error that lists the missing, unexpected and
mis-shaped keys, never a partial load.

The activation is chosen once per load and logged with its reason (`choose_activation`): the one asked
for (``act=``, MODEL.ACTIVATION), else the one the checkpoint is known to have been trained with, else
QuickGELU, the release's (a Hugging Face layout file outside the hub cache does not say; Microsoft's
copies of the release, the common case, need QuickGELU; weights trained in transformers need act='gelu').
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from yacs.config import CfgNode

from ..config import asked_activation, config_from_settings, config_from_yaml_text, load_config, spec_from_config
from ..errors import UserError, short_list
from ..models.cvt import ConvolutionalVisionTransformer, create_model as create_network, timm_pretrained_cfg
from ..models.spec import CvtSpec, check_activation, list_models, model_spec
from ..models.zoo import PUBLISHED, find_published
from .read import Checkpoint, read_checkpoint

__all__ = [
    "checkpoint_config",
    "choose_activation",
    "create_model",
    "eval_config",
    "infer_spec",
    "load_checkpoint",
    "model_for_config",
    "model_from_checkpoint",
]

log = logging.getLogger(__name__)

HEAD_KEYS = ("head.weight", "head.bias")
IMAGENET_CLASSES = 1000
# Whose test transform an ImageNet head that says nothing about its own gets: the release's at 224
# (the zoo files do not say their resolution, and their weights fit any).
IMAGENET_EVAL = PUBLISHED["cvt-13"]


def _selected(key: str, layers: Sequence[str] | None) -> bool:
    return layers is None or "*" in layers or key.split(".")[0] in layers


def load_checkpoint(
    model: ConvolutionalVisionTransformer,
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    strict: bool = True,
    *,
    backbone_only: bool = False,
    layers: Sequence[str] | None = None,
    act: str | None = None,
) -> Checkpoint:
    """Load weights into ``model``.

    Args:
        source: a path, folder, state dict, or an already read :class:`Checkpoint`.
        strict: every selected key must exist on both sides with the same shape; otherwise one
            :class:`UserError` lists the missing, unexpected and mis-shaped keys.
        backbone_only: leave the head out and re-initialise it (fine-tuning to another class count).
        layers: load only keys under these top-level names (``['stage0', 'stage1']``; ``['*']`` = all),
            the release's MODEL.PRETRAINED_LAYERS.
        act: the MLP activation to run, 'quick_gelu' or 'gelu'; None: the one the weights were trained
            with (see `choose_activation`). The model is switched to it, and the choice logged.

    Non-finite (NaN, inf) weights are refused. Returns the read :class:`Checkpoint` (class names, spec,
    training state).
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    incoming = {k: v for k, v in ckpt.state_dict.items() if _selected(k, layers)}
    own = model.state_dict()
    expected = {k for k in own if _selected(k, layers)}

    is_bare_backbone = ckpt.format == "huggingface" and not any(k in incoming for k in ("norm.weight", *HEAD_KEYS))
    if backbone_only or is_bare_backbone:
        incoming = {k: v for k, v in incoming.items() if k not in HEAD_KEYS}
        expected -= set(HEAD_KEYS)
    if is_bare_backbone:  # transformers' CvtModel has neither the final LayerNorm nor the head
        expected -= {"norm.weight", "norm.bias"}

    nonfinite = next((k for k, v in incoming.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if nonfinite is not None:  # a diverged run's weights would predict garbage, at any "accuracy"
        raise UserError(f"checkpoint {ckpt.source!r}: tensor {nonfinite!r} holds NaN or infinite values; use weights saved before the run diverged")
    missing = sorted(expected - incoming.keys())
    unexpected = sorted(incoming.keys() - own.keys())
    mis_shaped = sorted(k for k in incoming.keys() & own.keys() if incoming[k].shape != own[k].shape)
    if strict and (missing or unexpected or mis_shaped):
        raise UserError(_mismatch_message(ckpt, model, missing, unexpected, mis_shaped, incoming, own))
    loadable = {k: v for k, v in incoming.items() if k in own and k not in mis_shaped}
    model.load_state_dict(loadable, strict=False)

    if backbone_only or is_bare_backbone:
        model.reset_classifier(model.num_classes)
        dropped = f" (its own head has {ckpt.num_classes})" if ckpt.num_classes not in (None, model.num_classes) else ""
        log.info("loaded the backbone from %s; the head (%d classes) is freshly initialised%s",
                 ckpt.source, model.num_classes, dropped)
    if is_bare_backbone:
        log.info("%s is a bare CvtModel without the final LayerNorm: it keeps its initial values", ckpt.source)
    if not strict and (missing or unexpected or mis_shaped):
        log.warning(
            "partial load from %s: %d missing, %d unexpected, %d mis-shaped keys left out",
            ckpt.source, len(missing), len(unexpected), len(mis_shaped),
        )
    chosen, reason = choose_activation(ckpt, act, model.act)
    log.info("%s runs %s: %s", ckpt.source, chosen, reason)
    model.set_activation(chosen)
    return ckpt


def choose_activation(ckpt: Checkpoint, act: str | None = None, current: str = "quick_gelu") -> tuple[str, str]:
    """(activation, why) for running `ckpt`'s weights: `act` when given (warning when the checkpoint is
    known to be trained with the other one), else the checkpoint's own, else `current` (the model's)."""
    if act is not None:
        check_activation(act)
        if ckpt.act and ckpt.act != act:
            log.warning("%s was trained with %s (%s), but runs %s as asked", ckpt.source, ckpt.act, ckpt.act_reason, act)
        return act, "asked for (act= / MODEL.ACTIVATION)"
    if ckpt.act:
        return ckpt.act, ckpt.act_reason or "saved with the weights"
    if ckpt.format == "huggingface" and current == "quick_gelu":
        return current, (
            "the Hugging Face layout does not say its activation; the release's checkpoints (Microsoft's hub "
            "copies) need QuickGELU, weights trained in transformers need act='gelu' (MODEL.ACTIVATION gelu)"
        )
    return current, "the model's own; the file does not say"


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
        parts.append(f"{len(missing)} missing [{short_list(missing, 5)}]")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected [{short_list(unexpected, 5)}]")
    if mis_shaped:
        shapes = [f"{k}: file {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}" for k in mis_shaped]
        parts.append(f"{len(mis_shaped)} mis-shaped [{short_list(shapes, 5)}]")
    hint = "; is it a checkpoint of this architecture?"
    in_file, in_model = _stage_shapes(ckpt.state_dict), _stage_shapes(own)
    if in_file[0] and in_file != in_model:
        hint = (f"; the file's stages have {_describe_stages(*in_file)}, the model's {_describe_stages(*in_model)}: "
                "use the experiment (MODEL.SPEC) the file was trained with")
    if set(mis_shaped) <= set(HEAD_KEYS) and not missing and not unexpected:
        hint = (
            f"; the file has {ckpt.num_classes} classes and the model {model.num_classes}: "
            "set MODEL.NUM_CLASSES to match, or fine-tune from it (MODEL.PRETRAINED, or backbone_only=True)"
        )
    return f"checkpoint {ckpt.source!r} does not fit the model: " + ", ".join(parts) + hint


# --------------------------------------------------------------------------------------------------
# Building a model for a checkpoint
# --------------------------------------------------------------------------------------------------


def _stage_shapes(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """The widths and depths of the stages an official-layout state dict holds."""
    stages = sorted({int(m[1]) for m in map(re.compile(r"stage(\d+)\.").match, state_dict) if m})
    dims = [state_dict[f"stage{i}.patch_embed.proj.weight"].shape[0] for i in stages
            if f"stage{i}.patch_embed.proj.weight" in state_dict]
    depths = [len({k.split(".")[2] for k in state_dict if k.startswith(f"stage{i}.blocks.")}) for i in stages]
    return dims, depths


def _variant_named(dims: list[int], depths: list[int]) -> str | None:
    """The named variant (cvt-13, ...) of these widths and depths, if any."""
    for name in list_models():
        spec = model_spec(name)
        if list(spec.dim_embed) == dims and list(spec.depth) == depths:
            return name
    return None


def _describe_stages(dims: list[int], depths: list[int]) -> str:
    name = _variant_named(dims, depths)
    return f"widths {dims} and depths {depths}" + (f" ({name})" if name else "")


def infer_spec(ckpt: Checkpoint) -> dict[str, Any]:
    """The MODEL.SPEC of a checkpoint: stored in it, or a named variant whose shapes it matches."""
    if ckpt.spec:
        return dict(ckpt.spec)
    dims, depths = _stage_shapes(ckpt.state_dict)
    name = _variant_named(dims, depths)
    if name:
        return model_spec(name).to_dict()
    raise UserError(
        f"cannot tell the architecture of {ckpt.source!r} (widths {dims}, depths {depths}); "
        "give its experiment file (--cfg) so MODEL.SPEC is known"
    )


def model_from_checkpoint(
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    spec: Mapping[str, Any] | CvtSpec | None = None,
    act: str | None = None,
) -> tuple[ConvolutionalVisionTransformer, Checkpoint]:
    """Build the model a checkpoint was saved from (spec, class count, activation) and load it strictly.

    `source` is anything `read_checkpoint` reads (a file, a folder, a published tag, ``hf-hub:org/repo``)."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    if ckpt.num_classes is None:
        raise UserError(f"checkpoint {ckpt.source!r} has no classifier head; build the model yourself and load it with backbone_only=True")
    model = create_network(spec if spec is not None else infer_spec(ckpt), num_classes=ckpt.num_classes)
    load_checkpoint(model, ckpt, act=act)
    return model, ckpt


def create_model(
    name_or_spec: str | Mapping[str, Any] | CvtSpec = "cvt-13",
    pretrained: bool | str | os.PathLike = False,
    num_classes: int | None = None,
    *,
    act: str | None = None,
    **kwargs: Any,
) -> ConvolutionalVisionTransformer:
    """Build a CvT, optionally with weights: ``create_model('cvt-21-384-22k', pretrained=True)``.

    Args:
        name_or_spec: an architecture (``'cvt-13'``), a published tag (``'cvt-13-384-22k'``, see
            ``list_models(pretrained=True)``), a MODEL.SPEC dict or a :class:`CvtSpec`.
        pretrained: True for the weights the tag names; or a file, a folder, another tag or
            ``'hf-hub:org/repo[@revision]'``.
        num_classes: head size; default the weights' (1000 without weights). Another count than the
            weights' keeps their backbone and starts a fresh head (fine-tuning).
        act: 'quick_gelu' or 'gelu'; default the weights' own (see `choose_activation`), else QuickGELU.
        kwargs: passed to `cvt.models.create_model` (drop_path_rate, grad_checkpointing, in_chans, global_pool, spec fields).
    """
    if pretrained is False or pretrained is None:
        return create_network(name_or_spec, 1000 if num_classes is None else num_classes, act=act or "quick_gelu", **kwargs)
    if pretrained is True:
        if not isinstance(name_or_spec, str):
            raise UserError("pretrained=True needs a published tag as the name; or pass the weights as pretrained=PATH")
        source: str | os.PathLike = name_or_spec
    else:
        source = pretrained
    ckpt = read_checkpoint(source)
    classes = ckpt.num_classes if num_classes is None else num_classes
    model = create_network(name_or_spec, 1000 if classes is None else classes, **kwargs)
    new_head = ckpt.num_classes is not None and ckpt.num_classes != model.num_classes
    load_checkpoint(model, ckpt, backbone_only=new_head, act=act)
    published = find_published(source) if isinstance(source, str) else None
    if published is not None:  # as timm.create_model sets it: timm.data.resolve_model_data_config reads it
        model.pretrained_cfg = model.default_cfg = timm_pretrained_cfg(published)
    return model


def checkpoint_config(ckpt: Checkpoint, cfg_file: str | os.PathLike | None = None) -> CfgNode | None:
    """The config that says how a checkpoint's images are preprocessed: `cfg_file` when given, else
    the one the project's training checkpoints carry, else the test transform an export carries; None
    when nothing says."""
    if cfg_file:
        return load_config(cfg_file)
    if isinstance(ckpt.extra.get("config"), str):
        return config_from_yaml_text(ckpt.extra["config"], f"the config stored in {ckpt.source}")
    if ckpt.eval_settings:
        return config_from_settings(ckpt.eval_settings)
    return None


def eval_config(ckpt: Checkpoint, cfg_file: str | os.PathLike | None = None) -> CfgNode:
    """`checkpoint_config`, else for an ImageNet-sized head the release's test transform at 224
    (`IMAGENET_EVAL`'s, logged); a `UserError` for any other head, whose preprocessing nothing says."""
    cfg = checkpoint_config(ckpt, cfg_file)
    if cfg is not None:
        return cfg
    if ckpt.num_classes != IMAGENET_CLASSES:
        raise UserError(
            f"{ckpt.source} does not say how its images were preprocessed (size, normalisation); "
            "give its experiment file with --cfg"
        )
    log.info(
        "%s does not say how its images were preprocessed: using the release's ImageNet test transform "
        "(bicubic resize to 256, centre crop 224); give --cfg to change it", ckpt.source,
    )
    return config_from_settings(IMAGENET_EVAL.eval_settings())


def model_for_config(
    ckpt: Checkpoint, cfg: CfgNode | None, cfg_file: str | os.PathLike | None
) -> tuple[ConvolutionalVisionTransformer, Checkpoint]:
    """`model_from_checkpoint` as `cfg` says to run it: with its MODEL.SPEC when it is the user's
    experiment file (`cfg_file`; a config the checkpoint itself carries adds nothing), and with its
    MODEL.ACTIVATION unless that is 'auto'."""
    spec = spec_from_config(cfg) if cfg is not None and cfg_file else None
    return model_from_checkpoint(ckpt, spec=spec, act=asked_activation(cfg) if cfg is not None else None)

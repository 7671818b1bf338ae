"""Optimizer with the release's weight-decay exemptions and layer-wise rate decay, the learning-rate
scaling, and timm's schedules: per epoch for TRAIN, per optimizer step for FINETUNE."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from yacs.config import CfgNode

from ..config import OPTIMIZERS, finetune_decay_steps, finetune_warmup_steps
from ..errors import UserError

__all__ = [
    "OptimizerSettings",
    "build_optimizer",
    "build_scheduler",
    "build_step_scheduler",
    "layer_depths",
    "no_decay_names",
    "param_groups",
    "scaled_lr",
]

log = logging.getLogger(__name__)

# TRAIN.WITHOUT_WD_LIST entries that name a kind of module rather than a piece of a parameter name.
# Matching by type keeps the release's meaning although some of our names differ from its
# ('norm1'/'norm2' are LayerNorms, the projections' BatchNorms are '...conv_proj_q.bn').
_NORM_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "bn": (nn.modules.batchnorm._BatchNorm,),
    "ln": (nn.LayerNorm,),
    "gn": (nn.GroupNorm,),
}


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def no_decay_names(model: nn.Module, without_wd_list: Iterable[str]) -> set[str]:
    """Names of the trainable parameters that get no weight decay.

    Always the model's `no_weight_decay()` (the cls tokens). Then per entry of TRAIN.WITHOUT_WD_LIST:
    'bn', 'ln', 'gn' every parameter of BatchNorm / LayerNorm / GroupNorm modules, 'bias' every bias,
    'dw' the weights of depthwise convolutions, and any other entry every parameter whose name
    contains it.
    """
    entries = set(without_wd_list)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{param_name}" if module_name else param_name
            exempt = (
                full in skip
                or any(isinstance(module, _NORM_TYPES[e]) for e in entries & _NORM_TYPES.keys())
                or ("bias" in entries and param_name == "bias")
                or ("dw" in entries and param_name == "weight" and _is_depthwise(module))
                or any(e in full for e in entries - _NORM_TYPES.keys() - {"bias", "dw"})
            )
            if exempt:
                names.add(full)
    return names


def layer_depths(model: nn.Module) -> dict[str, int]:
    """How many layers before the head each parameter of a CvT sits: the final norm and the head 0,
    the last block 1, ..., each stage's patch embedding (with its cls token) one more than the
    stage's first block."""
    order: list[str] = []  # layer name prefixes, input to output
    for i, stage in enumerate(model.stages):  # type: ignore[attr-defined]
        order.append(f"stage{i}.")
        order += [f"stage{i}.blocks.{j}." for j in range(len(stage.blocks))]
    depths: dict[str, int] = {}
    for name, _ in model.named_parameters():
        # The deepest matching prefix: a block's name also starts with its stage's.
        index = max((k for k, prefix in enumerate(order) if name.startswith(prefix)), default=len(order))
        depths[name] = len(order) - index
    return depths


def param_groups(
    model: nn.Module, weight_decay: float, without_wd_list: Iterable[str], lr_scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups.

    Without `lr_scales`: two groups, decayed parameters and the exempt ones with weight_decay 0.
    With them (parameter name -> factor): one group per (factor, decayed or not), in the model's
    parameter order, each with its `lr_scale`, which timm's schedulers multiply the rate by.
    """
    exempt = no_decay_names(model, without_wd_list)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    if lr_scales is None:
        groups = {(1.0, True): {"params": [], "weight_decay": weight_decay}, (1.0, False): {"params": [], "weight_decay": 0.0}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0 if lr_scales is None else float(lr_scales[name])
        decayed = name not in exempt
        group = groups.setdefault((scale, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer the config asks for: TRAIN's keys, or FINETUNE's when fine-tuning."""

    name: str  # lower case, one of OPTIMIZERS
    key: str  # the config key that named it, for messages
    momentum: float
    nesterov: bool
    weight_decay: float
    without_wd_list: tuple[str, ...]
    layer_decay: float  # 1.0: off
    extra: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: CfgNode) -> OptimizerSettings:
        common = {"without_wd_list": tuple(cfg.TRAIN.WITHOUT_WD_LIST), "extra": dict(cfg.TRAIN.OPTIMIZER_ARGS)}
        if cfg.FINETUNE.FINETUNE:
            ft = cfg.FINETUNE
            # Plain momentum, as ViT fine-tunes (flax's Momentum optimizer).
            return cls(name=ft.OPTIMIZER.lower(), key="FINETUNE.OPTIMIZER", momentum=float(ft.MOMENTUM), nesterov=False,
                       weight_decay=float(ft.WD), layer_decay=float(ft.LAYER_DECAY), **common)
        train = cfg.TRAIN
        return cls(name=train.OPTIMIZER.lower(), key="TRAIN.OPTIMIZER", momentum=float(train.MOMENTUM),
                   nesterov=bool(train.NESTEROV), weight_decay=float(train.WD), layer_decay=1.0, **common)


def scaled_lr(cfg: CfgNode, world_size: int) -> float:
    """TRAIN.LR is per process and per batch: with SCALE_LR it grows with the effective batch."""
    if not cfg.TRAIN.SCALE_LR:
        return float(cfg.TRAIN.LR)
    return float(cfg.TRAIN.LR) * world_size * int(cfg.TRAIN.ACCUM_STEPS)


def build_optimizer(cfg: CfgNode, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of `OptimizerSettings.from_config` ('sgd', 'adam', 'adamW'; any case) over the
    trainable parameters' `param_groups`, at learning rate `lr` (times each group's `lr_scale`).

    TRAIN.OPTIMIZER_ARGS (e.g. betas, eps) are passed through. AdamW uses torch's fused kernel on
    CUDA and CPU, the faster one on both (benchmarks/RESULTS.md).
    """
    opt = OptimizerSettings.from_config(cfg)
    scales = None
    if opt.layer_decay < 1:
        scales = {name: opt.layer_decay**depth for name, depth in layer_depths(model).items()}
    groups = param_groups(model, opt.weight_decay, opt.without_wd_list, scales)
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if not any(group["params"] for group in groups):
        raise UserError("no parameter is left to train: FINETUNE.FROZEN_LAYERS freezes them all; leave the head out of it")
    extra = dict(opt.extra)
    try:
        if opt.name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0, **extra)
        if opt.name == "adam":
            return torch.optim.Adam(groups, lr=lr, **extra)
        if opt.name == "adamw":
            if "foreach" not in extra:  # torch refuses fused and foreach together
                extra.setdefault("fused", device.type in ("cuda", "cpu"))
            return torch.optim.AdamW(groups, lr=lr, **extra)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"TRAIN.OPTIMIZER_ARGS {extra} do not suit {opt.key} {opt.name}: {e}") from None
    raise UserError(f"{opt.key}={opt.name!r} is not one of {', '.join(OPTIMIZERS)}")


# TRAIN.LR_SCHEDULER.ARGS keys named as the release's timm (its argparse names), where
# create_scheduler_v2's keywords differ.
_TIMM_ARG_NAMES = {"lr_cycle_mul": "cycle_mul", "lr_cycle_limit": "cycle_limit"}


def build_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> Scheduler:
    """timm's scheduler from TRAIN.LR_SCHEDULER.ARGS over TRAIN.END_EPOCH epochs, stepped per epoch.

    Call `scheduler.step(epoch)` before the first epoch and `scheduler.step(epoch + 1)` after each,
    as the release does; the learning rate is then a function of the epoch alone, which is what
    makes resuming exact.
    """
    # TRAIN.LR_SCHEDULER.METHOD is 'timm', as validated: the shape is TRAIN.LR_SCHEDULER.ARGS.sched.
    kwargs = {_TIMM_ARG_NAMES.get(k, k): v for k, v in dict(cfg.TRAIN.LR_SCHEDULER.ARGS).items()}
    kwargs["noise"] = list(kwargs["noise"]) or None  # timm: None is no noise
    try:
        with warnings.catch_warnings():
            # timm's plateau deprecation says a resume restarts the plateau logic: checkpoint.pth here
            # keeps its counters and decayed rates (`cvt.training.state`).
            warnings.filterwarnings("ignore", "PlateauLRScheduler is deprecated", FutureWarning)
            # The run length is TRAIN.END_EPOCH, as in the release.
            scheduler, _ = create_scheduler_v2(optimizer, num_epochs=int(cfg.TRAIN.END_EPOCH), step_on_epochs=True,
                                               noise_seed=int(cfg.SEED), **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"TRAIN.LR_SCHEDULER.ARGS: {e}; use timm's scheduler names and argument names") from None
    return scheduler


def build_step_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> Scheduler:
    """The fine-tuning schedule over FINETUNE.STEPS optimizer steps, a timm scheduler stepped per update.

    Call `scheduler.step_update(n)` before update n, counted from 1 as ViT and BiT count: a linear
    warmup from 0 reaches FINETUNE.BASE_LR at update WARMUP_STEPS, then 'cosine' and 'linear' decay
    to 0 at update STEPS (ViT), and 'step' divides by 1/DECAY_RATE after each of DECAY_STEPS updates
    (BiT). The rate is a function of n alone, which makes resuming exact.
    """
    ft = cfg.FINETUNE
    total, warmup = int(ft.STEPS), finetune_warmup_steps(cfg)
    common: dict[str, Any] = {"warmup_t": warmup, "warmup_lr_init": 0.0, "t_in_epochs": False}
    kind = ft.LR_SCHEDULER.DECAY_TYPE
    if kind == "step":
        # timm counts a decay once t + 1 reaches it: update s + 1 is the first at the lower rate.
        return MultiStepLRScheduler(optimizer, decay_t=[s + 2 for s in finetune_decay_steps(cfg)],
                                    decay_rate=float(ft.LR_SCHEDULER.DECAY_RATE), warmup_prefix=False, **common)
    # The decay starts where the warmup ends, as ViT's: progress = (n - warmup) / (total - warmup).
    decay = {"t_initial": total - warmup, "lr_min": 0.0, "warmup_prefix": True, "cycle_limit": 1}
    if kind == "cosine":
        return CosineLRScheduler(optimizer, **decay, **common)
    return PolyLRScheduler(optimizer, power=1.0, **decay, **common)  # 'linear', as validated

"""Optimizer with the release's weight-decay exemptions, the learning-rate scaling, and timm's schedule."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from yacs.config import CfgNode

from ..config import OPTIMIZERS
from ..errors import UserError

__all__ = ["build_optimizer", "build_scheduler", "no_decay_names", "param_groups", "scaled_lr"]

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


def param_groups(model: nn.Module, weight_decay: float, without_wd_list: Iterable[str]) -> list[dict]:
    """Two optimizer groups: decayed parameters, and the exempt ones with weight_decay 0."""
    exempt = no_decay_names(model, without_wd_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def scaled_lr(cfg: CfgNode, world_size: int) -> float:
    """TRAIN.LR is per process and per batch: with SCALE_LR it grows with the effective batch."""
    if not cfg.TRAIN.SCALE_LR:
        return float(cfg.TRAIN.LR)
    return float(cfg.TRAIN.LR) * world_size * int(cfg.TRAIN.ACCUM_STEPS)


def build_optimizer(cfg: CfgNode, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """TRAIN.OPTIMIZER ('sgd', 'adam', 'adamW'; any case) over `param_groups`, at learning rate `lr`.

    TRAIN.OPTIMIZER_ARGS (e.g. betas, eps) are passed through. AdamW uses torch's fused kernel on
    CUDA and CPU, the faster one on both (benchmarks/RESULTS.md).
    """
    groups = param_groups(model, float(cfg.TRAIN.WD), cfg.TRAIN.WITHOUT_WD_LIST)
    extra = dict(cfg.TRAIN.OPTIMIZER_ARGS)
    name = cfg.TRAIN.OPTIMIZER.lower()
    try:
        if name == "sgd":
            return torch.optim.SGD(
                groups, lr=lr, momentum=cfg.TRAIN.MOMENTUM, nesterov=cfg.TRAIN.NESTEROV, **extra
            )
        if name == "adam":
            return torch.optim.Adam(groups, lr=lr, **extra)
        if name == "adamw":
            if "foreach" not in extra:  # torch refuses fused and foreach together
                extra.setdefault("fused", device.type in ("cuda", "cpu"))
            return torch.optim.AdamW(groups, lr=lr, **extra)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"TRAIN.OPTIMIZER_ARGS {extra} do not suit {cfg.TRAIN.OPTIMIZER}: {e}") from None
    raise UserError(f"TRAIN.OPTIMIZER={cfg.TRAIN.OPTIMIZER!r} is not one of {', '.join(OPTIMIZERS)}")


# The release feeds TRAIN.LR_SCHEDULER.ARGS to timm's argparse-based factory, whose names differ
# from create_scheduler_v2's keywords in places; these are the renamed ones.
_TIMM_ARG_NAMES = {
    "lr_noise": "noise",
    "lr_noise_pct": "noise_pct",
    "lr_noise_std": "noise_std",
    "noise_seed": "noise_seed",
    "seed": "noise_seed",
    "lr_cycle_mul": "cycle_mul",
    "lr_cycle_decay": "cycle_decay",
    "lr_cycle_limit": "cycle_limit",
    "lr_k_decay": "k_decay",
}


def build_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> Scheduler:
    """timm's scheduler from TRAIN.LR_SCHEDULER.ARGS over TRAIN.END_EPOCH epochs, stepped per epoch.

    Call `scheduler.step(epoch)` before the first epoch and `scheduler.step(epoch + 1)` after each,
    as the release does; the learning rate is then a function of the epoch alone, which is what
    makes resuming exact.
    """
    # TRAIN.LR_SCHEDULER.METHOD is 'timm', as validated: the shape is TRAIN.LR_SCHEDULER.ARGS.sched.
    kwargs = {_TIMM_ARG_NAMES.get(k, k): v for k, v in dict(cfg.TRAIN.LR_SCHEDULER.ARGS).items()}
    kwargs.pop("epochs", None)  # the run length is TRAIN.END_EPOCH, as in the release
    try:
        scheduler, _ = create_scheduler_v2(optimizer, num_epochs=int(cfg.TRAIN.END_EPOCH), step_on_epochs=True, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"TRAIN.LR_SCHEDULER.ARGS: {e}; use timm's scheduler names and argument names") from None
    return scheduler

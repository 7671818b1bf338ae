"""The resumable training checkpoint (`checkpoint.pth`), random number generator states, metrics.jsonl.

The checkpoint format is the one docs/ARCHITECTURE.md defines: `model`, `optimizer`, `scheduler`,
`scaler`, `ema`, `epoch` (epochs completed), `best_top1`, `class_names`, `spec`, `act`, `config`,
`rng`. Everything in it is tensors and plain containers, so it loads with `weights_only=True`
(through `cvt.weights.read.read_checkpoint`) and no file can run code.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.scheduler import PlateauLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from yacs.config import CfgNode

from ..config import spec_from_config
from ..errors import UserError
from ..files import atomic_torch_save, atomic_write_text
from ..models.cvt import ConvolutionalVisionTransformer
from ..weights.load import load_checkpoint
from ..weights.read import Checkpoint, read_checkpoint
from .distributed import all_gather

__all__ = [
    "ResumeState",
    "capture_rng",
    "read_training",
    "restore_rng",
    "restore_training",
    "save_training",
    "truncate_metrics",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------------


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved optimizer state, computed with this run's kernels: `fused` / `foreach` were chosen
    for the device (and torch) the checkpoint was written with, and a run resumed elsewhere keeps
    this run's choice. Set before loading, so the step counters land where the
    chosen kernel wants them."""
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    if len(saved["param_groups"]) != len(kernels):
        raise UserError(
            f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this run's "
            f"{len(kernels)} (TRAIN.WITHOUT_WD_LIST or TRAIN.OPTIMIZER changed?); start a new run"
        )
    groups = [{**saved_group, **kernel} for saved_group, kernel in zip(saved["param_groups"], kernels)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def _local_rng() -> dict[str, Any]:
    """This process's generators: Python, NumPy (timm's Mixup draws from it), torch CPU and CUDA."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (the current one)
    return state


def capture_rng() -> list[dict[str, Any]]:
    """Every rank's generator states, indexed by rank (a collective; rank 0 saves them)."""
    return [_to_cpu(state) for state in all_gather(_local_rng())]


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if "cuda" in out:
        out["cuda"] = out["cuda"].cpu()
    return out


def restore_rng(states: Sequence[dict[str, Any]] | None, rank: int) -> bool:
    """Put this rank's generators back as saved; False when the checkpoint has none for this rank."""
    if not states or rank >= len(states):
        return False
    state = states[rank]
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["name"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, (list, tuple)):  # an earlier format: every visible GPU's state
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda_state = cuda_state[index] if index < len(cuda_state) else None
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)  # into this rank's device, whichever index it has
    return True


def _as_tuple(value: Any) -> Any:
    # random.setstate wants tuples all the way down; a serialiser may hand back lists.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------------------------------
# Saving and restoring
# --------------------------------------------------------------------------------------------------


def save_training(
    path: str | os.PathLike,
    *,
    model: ConvolutionalVisionTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None,
    epoch: int,
    best_top1: float | None,
    class_names: Sequence[str],
    cfg: CfgNode,
    rng: list[dict[str, Any]],
) -> None:
    """Write checkpoint.pth atomically: the old file stays whole until the new one is on disk.

    `model` is the bare network (not a DDP or compiled wrapper), so the keys are the official ones.
    `epoch` counts the epochs completed; resuming starts at that epoch.
    """
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "epoch": epoch,
            "best_top1": best_top1,
            "class_names": list(class_names),
            "spec": spec_from_config(cfg).to_dict(),
            "act": model.act,
            "config": cfg.dump(),
            "rng": rng,
        },
        path,
    )


@dataclass
class ResumeState:
    epoch: int  # the epoch to start at (= epochs completed)
    best_top1: float | None
    rng: list[dict[str, Any]] | None


def read_training(path: Path) -> Checkpoint:
    """Read a checkpoint.pth to resume from; anything else is a UserError saying what to do."""
    hint = "delete it, or set TRAIN.AUTO_RESUME False to start afresh (or NAME / OUTPUT_DIR for another folder)"
    try:
        ckpt = read_checkpoint(path)
    except UserError as e:
        raise UserError(f"cannot resume: {e}; {hint}") from None
    if ckpt.format != "cvt":
        raise UserError(f"cannot resume from {str(path)!r}: it is a {ckpt.format} file, not a training checkpoint.pth; {hint}")
    return ckpt


def restore_training(
    ckpt: Checkpoint,
    cfg: CfgNode,
    class_names: Sequence[str],
    *,
    model: ConvolutionalVisionTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None,
) -> ResumeState:
    """Load a training checkpoint's state into freshly built objects.

    The learning-rate schedule is rebuilt from the config rather than loaded: timm's epoch-stepped
    schedules are functions of the epoch, so a resumed run may change TRAIN.END_EPOCH or the number
    of processes. Only the plateau schedule carries memory of its own, and that is restored.
    """
    extra = ckpt.extra
    where = f"{ckpt.source!r}"
    fix = "set TRAIN.AUTO_RESUME False or pick another NAME / OUTPUT_DIR to start a new run"
    spec = spec_from_config(cfg).to_dict()
    if ckpt.spec is not None and dict(ckpt.spec) != spec:
        changed = sorted(k for k in spec if ckpt.spec.get(k) != spec[k])
        raise UserError(f"cannot resume from {where}: it was trained with another MODEL.SPEC (differs in {', '.join(changed)}); {fix}")
    if ckpt.class_names is not None and list(ckpt.class_names) != list(class_names):
        raise UserError(f"cannot resume from {where}: its {len(ckpt.class_names)} class names differ from the training folder's {len(class_names)}; {fix}")

    load_checkpoint(model, ckpt)
    load_optimizer_state(optimizer, extra["optimizer"])
    if isinstance(scheduler, PlateauLRScheduler) and extra.get("scheduler"):
        scheduler.load_state_dict(extra["scheduler"])
    if extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    if ema is not None:
        ema.module.set_activation(model.act)  # the EMA copy was made before the checkpoint set it
        if extra.get("ema") is not None:
            ema.module.load_state_dict(extra["ema"])
        else:  # EMA switched on while resuming: start the average from the resumed weights
            ema.module.load_state_dict(model.state_dict())
    return ResumeState(epoch=int(extra["epoch"]), best_top1=extra.get("best_top1"), rng=extra.get("rng"))


# --------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------


def truncate_metrics(path: Path, start_epoch: int) -> None:
    """Keep only the records of epochs before `start_epoch`, so the epochs about to be (re)run appear
    exactly once; a torn last line from a crash is dropped with them. Rewritten atomically."""
    if not path.exists():
        return
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] < start_epoch:
            kept.append(json.dumps(record) + "\n")
    atomic_write_text(path, "".join(kept))

"""The resumable training checkpoint (`checkpoint.pth`), random number generator states, metrics.jsonl.

The checkpoint format is the one docs/ARCHITECTURE.md defines: `model`, `optimizer`, `scheduler`,
`scaler`, `ema`, `epoch` (epochs completed), `best_top1`, `class_names`, `spec`, `act`, `config`,
`rng`. Everything in it is tensors and plain containers, so it loads with `weights_only=True`
(through `cvt.weights.read.read_checkpoint`) and no file can run code.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from timm.data import Mixup
from timm.scheduler import PlateauLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from ..config import is_number, settings_from_yaml_text, spec_from_config
from ..data.transforms import eval_transform_settings
from ..errors import UserError, short_list
from ..files import append_jsonl, atomic_torch_save, atomic_write_text
from ..models.cvt import ConvolutionalVisionTransformer
from ..weights.export import save_official, save_safetensors
from ..weights.load import load_checkpoint
from ..weights.read import Checkpoint, read_checkpoint
from .distributed import DistEnv, all_gather, all_reduce_sum
from .loop import BadFileLog, EpochResult, LoopSettings, TrainModes, train_one_epoch
from .session import StopSignals, TrainingInterrupted

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "METRICS",
    "MODEL_BEST",
    "MODEL_BEST_PREDICT",
    "ResumeState",
    "capture_rng",
    "read_training",
    "restore_rng",
    "restore_training",
    "save_training",
    "truncate_metrics",
]

log = logging.getLogger(__name__)

# Files of the run folder that both the epoch and the step loops write.
CHECKPOINT = "checkpoint.pth"
METRICS = "metrics.jsonl"
MODEL_BEST = "model_best.pth"
# The same weights with what `cvt predict` needs and the release's layout cannot hold: class names,
# activation, spec and test transform.
MODEL_BEST_PREDICT = "model_best.safetensors"
START_AFRESH = (
    "to start afresh instead, set TRAIN.AUTO_RESUME False TRAIN.EARLIER_RESULTS move (keeps the earlier "
    "results in a subfolder), or give the run another NAME / OUTPUT_DIR"
)
# TRAIN.CHECKPOINT is resumed whatever TRAIN.AUTO_RESUME says, so START_AFRESH would not help there.
FIX_TRAIN_CHECKPOINT = (
    "point TRAIN.CHECKPOINT at a run's checkpoint.pth that fits this run, or clear it (TRAIN.CHECKPOINT '') "
    "to train without it"
)


def resume_hint(cfg: CfgNode) -> str:
    """What to do when the checkpoint this run resumes from cannot serve it."""
    return FIX_TRAIN_CHECKPOINT if cfg.TRAIN.CHECKPOINT else START_AFRESH


# --------------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------------


# Optimizer settings whose change the saved state cannot follow: amsgrad adds a state tensor.
_STATE_LAYOUT_SETTINGS = ("amsgrad",)
_KERNEL_SETTINGS = ("fused", "foreach")  # how the step is computed, not what it computes


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], source: str = "the checkpoint",
                         optimizer_key: str = "TRAIN.OPTIMIZER", hint: str = START_AFRESH) -> list[str]:
    """The saved optimizer state (moments, step counts) under this run's settings.

    Every setting of this run's groups (weight decay, betas, momentum, ...: what the config says)
    replaces the saved one, so a resumed run trains as configured; returns the settings that changed,
    as 'name old -> new'. A state that cannot serve this optimizer (another kind, other parameter
    groups) is a UserError. The kernels (`fused` / `foreach`) are chosen for this run's device, and set
    before loading, so the step counters land where the chosen kernel wants them. `optimizer_key`: the
    key that chose the optimizer, for the messages (FINETUNE.OPTIMIZER in a step run)."""
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise UserError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's "
            f"{len(optimizer.param_groups)} (TRAIN.WITHOUT_WD_LIST or {optimizer_key} changed?); {hint}"
        )
    groups, changes = [], []
    for index, (saved_group, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        settings = {k for k in group if k not in ("params", "initial_lr")}
        saved_settings = {k for k in saved_group if k not in ("params", "initial_lr")}
        if settings != saved_settings or any(saved_group[k] != group[k] for k in _STATE_LAYOUT_SETTINGS if k in settings):
            differing = sorted((settings ^ saved_settings) | {k for k in _STATE_LAYOUT_SETTINGS if k in settings})
            raise UserError(
                f"cannot resume from {source}: its optimizer state does not suit {optimizer_key} "
                f"{type(optimizer).__name__} (settings {short_list(differing)} differ: {optimizer_key} or "
                f"TRAIN.OPTIMIZER_ARGS changed?); {hint}"
            )
        if len(saved_group["params"]) != len(group["params"]):
            raise UserError(
                f"cannot resume from {source}: its optimizer's parameter group {index} holds "
                f"{len(saved_group['params'])} parameters, this run's {len(group['params'])} "
                f"(TRAIN.WITHOUT_WD_LIST changed?); {hint}"
            )
        for key in sorted(settings - {"lr", *_KERNEL_SETTINGS}):
            change = f"{key} {saved_group[key]} -> {group[key]}"
            if saved_group[key] != group[key] and change not in changes:
                changes.append(change)
        groups.append({**saved_group, **{k: group[k] for k in (*settings, "initial_lr") if k in group}})
    optimizer.load_state_dict({**saved, "param_groups": groups})
    return changes


# The settings the optimizer and the schedule read, per kind of run (epoch run, step run). The applied
# ones take effect on resume (the optimizer's from `load_optimizer_state`, the schedule rebuilt from the
# config); a refused one, with why: it cannot change without breaking the saved state.
_STATE_OWNER = "it decides which saved optimizer state belongs to which weight"
_RESUME_APPLIED = {
    False: ("TRAIN.OPTIMIZER", "TRAIN.LR", "TRAIN.SCALE_LR", "TRAIN.ACCUM_STEPS", "TRAIN.WD", "TRAIN.MOMENTUM",
            "TRAIN.NESTEROV", "TRAIN.OPTIMIZER_ARGS", "TRAIN.END_EPOCH", "TRAIN.LR_SCHEDULER"),
    True: ("FINETUNE.OPTIMIZER", "FINETUNE.BASE_LR", "FINETUNE.MOMENTUM", "FINETUNE.WD", "FINETUNE.CLIP_GRAD_NORM",
           "FINETUNE.STEPS", "FINETUNE.WARMUP_STEPS", "FINETUNE.LR_SCHEDULER", "TRAIN.OPTIMIZER_ARGS", "TRAIN.ACCUM_STEPS"),
}
_RESUME_REFUSED = {
    False: {"TRAIN.WITHOUT_WD_LIST": _STATE_OWNER},
    True: {
        "TRAIN.WITHOUT_WD_LIST": _STATE_OWNER,
        "FINETUNE.FROZEN_LAYERS": _STATE_OWNER,
        "FINETUNE.LINEAR_PROBE": _STATE_OWNER,
        "FINETUNE.LAYER_DECAY": _STATE_OWNER,
        "FINETUNE.BATCH_SIZE": "the steps done so far, and the data position they reached, count batches of that size",
    },
}


def _config_changes(ckpt: Checkpoint, cfg: CfgNode, keys: Sequence[str]) -> list[str]:
    """'KEY old -> new' for each of `keys` the checkpoint's stored config sets otherwise."""
    text = ckpt.extra.get("config")
    if not isinstance(text, str):
        return []
    saved = settings_from_yaml_text(text, f"the config stored in {ckpt.source}")
    changes = []
    for key in keys:
        old: Any = saved
        new: Any = cfg
        for part in key.split("."):
            old = old.get(part) if isinstance(old, dict) else None
            new = new[part]
        new = new if not isinstance(new, CfgNode) else _plain(new)
        if old is not None and _plain(old) != _plain(new):
            changes.append(f"{key} {old} -> {new}")
    return changes


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(map(_plain, value)) if isinstance(value, (list, tuple)) else value


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
    step: int | None = None,
) -> None:
    """Write checkpoint.pth atomically: the old file stays whole until the new one is on disk.

    `model` is the bare network (not a DDP or compiled wrapper), so the keys are the official ones.
    `epoch` counts the epochs completed; resuming starts at that epoch. A step-based (fine-tuning)
    run saves `step`, the optimizer steps completed, instead, and resumes at that step.
    """
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler_state(scheduler),
            "scaler": scaler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "epoch": epoch,
            "best_top1": best_top1,
            "class_names": list(class_names),
            "spec": spec_from_config(cfg).to_dict(),
            "act": model.act,
            "config": cfg.dump(),
            "rng": rng,
            **({"step": step} if step is not None else {}),
        },
        path,
    )


# What the plateau schedule remembers beyond timm's state_dict (which keeps only the best metric):
# torch's ReduceLROnPlateau counters. The rates it decayed to are the optimizer groups' `lr`.
_PLATEAU_COUNTERS = ("best", "last_epoch", "num_bad_epochs", "cooldown_counter")


def scheduler_state(scheduler: Scheduler) -> dict[str, Any]:
    """The schedule's state for checkpoint.pth; for the plateau schedule with everything its resume needs
    (`restore_plateau`)."""
    state = scheduler.state_dict()
    if isinstance(scheduler, PlateauLRScheduler):
        plateau = scheduler.lr_scheduler
        state["plateau"] = {
            **{key: getattr(plateau, key) for key in _PLATEAU_COUNTERS},
            "restore_lr": scheduler.restore_lr,  # the rates before this epoch's LR noise, if any
        }
    return state


def restore_plateau(scheduler: PlateauLRScheduler, saved: dict[str, Any], saved_groups: Sequence[dict[str, Any]]) -> None:
    """Put the plateau schedule's memory back: its counters and the rates it decayed to (from the saved
    optimizer groups, which `load_optimizer_state` set to this run's configured rate). A changed base rate
    (TRAIN.LR) keeps the decay reached: the rates scale by new / old base. A checkpoint from before the
    counters were saved gives the best metric and the rates; another schedule's (TRAIN.LR_SCHEDULER
    changed on resume) nothing: the plateau schedule starts afresh at the configured rate."""
    memory = saved.get("plateau")
    groups = scheduler.optimizer.param_groups
    if not isinstance(memory, dict) and "best" not in saved:
        # The configured rate, where an uninterrupted plateau run is after its warmup (a warmup not over
        # sets its own when the loop steps the schedule), not the warmup's first rate the groups hold.
        for group in groups:
            group["lr"] = group["initial_lr"] * group.get("lr_scale", 1.0)
        return
    if not isinstance(memory, dict):
        memory = {"best": saved["best"]}
    plateau = scheduler.lr_scheduler
    for key in _PLATEAU_COUNTERS:
        if key in memory:
            setattr(plateau, key, memory[key])
    # Exactly 1.0 when the base rate is unchanged, so the rates come back bit for bit.
    scales = [group["initial_lr"] / old.get("initial_lr", group["initial_lr"]) for group, old in zip(groups, saved_groups)]
    for group, old, scale in zip(groups, saved_groups, scales):
        group["lr"] = old["lr"] * scale
    if memory.get("restore_lr") is not None:
        scheduler.restore_lr = [lr * scale for lr, scale in zip(memory["restore_lr"], scales)]


@dataclass
class ResumeState:
    epoch: int  # the epoch to start at (= epochs completed)
    best_top1: float | None
    rng: list[dict[str, Any]] | None
    step: int | None = None  # a step-based run's optimizer steps completed; None for epoch runs


def read_training(path: Path, hint: str = START_AFRESH) -> Checkpoint:
    """Read a checkpoint.pth to resume from; anything else is a UserError ending in `hint` (`resume_hint`)."""
    try:
        ckpt = read_checkpoint(path)
    except UserError as e:
        raise UserError(f"cannot resume: {e}; {hint}") from None
    if ckpt.format != "cvt":
        raise UserError(f"cannot resume from {str(path)!r}: it is a {ckpt.format} file, not a training checkpoint.pth; {hint}")
    problem = _resume_field_problem(ckpt.extra)
    if problem:
        raise UserError(f"cannot resume from {str(path)!r}: its {problem}; {hint}")
    return ckpt


def _resume_field_problem(extra: dict[str, Any]) -> str | None:
    """What is wrong with the fields a resume reads, as '<field> is ...', or None."""
    epoch, best, optimizer = extra.get("epoch"), extra.get("best_top1"), extra.get("optimizer")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return f"'epoch' is {epoch!r}, not a count of epochs"
    step = extra.get("step", 0)  # only step runs save one
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"'step' is {step!r}, not a count of optimizer steps"
    if best is not None and not is_number(best):
        return f"'best_top1' is {type(best).__name__}, not a number"
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list) \
            or not isinstance(optimizer.get("state"), dict) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"]):
        return "'optimizer' is missing or not an optimizer state (state, param_groups)"
    for field_name in ("scheduler", "scaler"):
        if extra.get(field_name) is not None and not isinstance(extra[field_name], dict):
            return f"{field_name!r} is a {type(extra[field_name]).__name__}, not a state dict"
    plateau = extra["scheduler"].get("plateau") if isinstance(extra.get("scheduler"), dict) else None
    if plateau is not None and not (isinstance(plateau, dict) and all(is_number(plateau.get(k)) for k in _PLATEAU_COUNTERS)
                                    and (plateau.get("restore_lr") is None or _is_numbers(plateau["restore_lr"]))):
        return "'scheduler' holds a 'plateau' state that is not its counters and rates"
    if extra.get("ema") is not None and not (isinstance(extra["ema"], dict) and all(isinstance(v, torch.Tensor) for v in extra["ema"].values())):
        return "'ema' is not a state dict of tensors"
    if extra.get("rng") is not None and not isinstance(extra["rng"], list):
        return f"'rng' is a {type(extra['rng']).__name__}, not a list of generator states"
    return None


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(map(is_number, value))


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
    of processes. Only the plateau schedule carries memory of its own, and that is restored
    (`restore_plateau`): a resumed run decays its rate at the same epochs as an uninterrupted one.
    """
    extra = ckpt.extra
    where = f"{ckpt.source!r}"
    fix = resume_hint(cfg)
    spec = spec_from_config(cfg).to_dict()
    if ckpt.spec is not None and dict(ckpt.spec) != spec:
        changed = sorted(k for k in spec if ckpt.spec.get(k) != spec[k])
        raise UserError(f"cannot resume from {where}: it was trained with another MODEL.SPEC (differs in {', '.join(changed)}); {fix}")
    if ckpt.class_names is not None and list(ckpt.class_names) != list(class_names):
        raise UserError(f"cannot resume from {where}: its {len(ckpt.class_names)} class names differ from the training folder's {len(class_names)}; {fix}")

    step_based = bool(cfg.FINETUNE.FINETUNE)
    if ("step" in extra) != step_based:
        written, wanted = ("a step-based (FINETUNE.FINETUNE)", "an epoch") if "step" in extra else ("an epoch", "a step-based")
        raise UserError(f"cannot resume from {where}: it was written by {written} run and this is {wanted} run; "
                        f"set FINETUNE.FINETUNE as it was, or {fix}")
    for key, why in _RESUME_REFUSED[step_based].items():
        refused = _config_changes(ckpt, cfg, [key])
        if refused:
            raise UserError(f"cannot resume from {where} with another {refused[0]}: {why}; set {key} as it was, or {fix}")
    load_checkpoint(model, ckpt)
    optimizer_key = "FINETUNE.OPTIMIZER" if step_based else "TRAIN.OPTIMIZER"
    changes = _config_changes(ckpt, cfg, _RESUME_APPLIED[step_based]) + load_optimizer_state(
        optimizer, extra["optimizer"], where, optimizer_key, fix)
    if changes:
        log.warning("resuming with changed settings, applied from now on: %s", "; ".join(changes))
    if isinstance(scheduler, PlateauLRScheduler) and extra.get("scheduler"):
        restore_plateau(scheduler, extra["scheduler"], extra["optimizer"]["param_groups"])
    if extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    if ema is not None:
        ema.module.set_activation(model.act)  # the EMA copy was made before the checkpoint set it
        if extra.get("ema") is not None:
            ema.module.load_state_dict(extra["ema"])
        else:  # EMA switched on while resuming: start the average from the resumed weights
            ema.module.load_state_dict(model.state_dict())
    step = int(extra["step"]) if "step" in extra else None
    return ResumeState(epoch=int(extra["epoch"]), best_top1=extra.get("best_top1"), rng=extra.get("rng"), step=step)


# --------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------


def truncate_metrics(path: Path, start_epoch: int, key: str = "epoch") -> None:
    """Keep only the records of epochs before `start_epoch`, so the epochs about to be (re)run appear
    exactly once; a torn last line from a crash is dropped with them. Rewritten atomically.
    `key` 'step' does the same for a step-based run's records (kept: step < `start_epoch`)."""
    if not path.exists():
        return
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get(key), int) and record[key] < start_epoch:
            kept.append(json.dumps(record) + "\n")
    atomic_write_text(path, "".join(kept))


# --------------------------------------------------------------------------------------------------
# A run in memory
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What one training run holds from set-up to finish."""

    cfg: CfgNode
    env: DistEnv
    folder: Path
    settings: LoopSettings
    train_loader: DataLoader
    val_loader: DataLoader
    classes: list[str]
    first_val_image: str
    model: ConvolutionalVisionTransformer
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    criterion: torch.nn.Module
    start_epoch: int
    start_step: int = 0  # a fine-tuning run's optimizer steps already done
    set_train_mode: TrainModes = TrainModes(frozen=(), train_mode=True)
    best_top1: float | None = None
    bad_train: BadFileLog = field(default_factory=BadFileLog)
    bad_val: BadFileLog = field(default_factory=BadFileLog)
    last_record: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / CHECKPOINT

    @property
    def end_epoch(self) -> int:
        return int(self.cfg.TRAIN.END_EPOCH)

    def how_to_resume(self) -> str:
        if self.cfg.TRAIN.AUTO_RESUME and not self.cfg.TRAIN.CHECKPOINT:
            return "run the same command again"
        return "run the same command with TRAIN.AUTO_RESUME True" + (" TRAIN.CHECKPOINT ''" if self.cfg.TRAIN.CHECKPOINT else "")

    def train_pass(self, model: torch.nn.Module, stop: StopSignals, *, epoch: int, **options: Any) -> EpochResult:
        """`train_one_epoch` over this run's loader, optimizer, scaler, EMA, mixup and bad-file log, under
        autograd's anomaly mode when TRAIN.DETECT_ANOMALY asks for it; `options` go to it as given."""
        with torch.autograd.set_detect_anomaly(bool(self.cfg.TRAIN.DETECT_ANOMALY)):
            return train_one_epoch(
                model, self.train_loader, self.criterion, self.optimizer, self.settings,
                epoch=epoch, scaler=self.scaler, ema=self.ema, mixup=self.mixup, stop_requested=stop.requested,
                bad_files=self.bad_train, world_size=self.env.world_size, **options,
            )

    def save(self, epochs_completed: int, step: int | None = None) -> None:
        """checkpoint.pth after `epochs_completed` epochs, or `step` optimizer steps of a fine-tuning
        run (a collective: every rank takes part)."""
        rng = capture_rng()
        if self.env.is_main:
            save_training(
                self.checkpoint_path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, ema=self.ema, epoch=epochs_completed, best_top1=self.best_top1,
                class_names=self.classes, cfg=self.cfg, rng=rng, step=step,
            )

    @contextlib.contextmanager
    def recording(self, first: int, key: str) -> Iterator[SummaryWriter | None]:
        """Around a run's loop: metrics.jsonl keeps only the records before `first` (its `key`,
        'epoch' or 'step'), so those about to be (re)run appear once, and TensorBoard drops the events
        a crashed run logged from `first` on; yields the writer (rank 0 with TENSORBOARD, else None)."""
        writer = None
        if self.env.is_main:
            truncate_metrics(self.folder / METRICS, first, key=key)
            if self.cfg.TENSORBOARD:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=first)
        try:
            yield writer
        finally:
            if writer is not None:
                writer.close()

    def update_best(self, val: dict[str, float] | None) -> bool:
        """Whether `val` (None: not evaluated) is the best top-1 so far; if so it becomes best_top1."""
        is_best = val is not None and (self.best_top1 is None or val["top1"] > self.best_top1)
        if is_best:
            self.best_top1 = val["top1"]
        return is_best

    def stop_if_requested(self, stop: StopSignals, more_left: bool, stopped: str) -> None:
        """After a saved stretch: when any rank was asked to stop and there is more to train, log
        `stopped` and how to resume on every rank, and raise (a collective: every rank takes part)."""
        stop_flag = torch.tensor([float(stop.requested() and more_left)], device=self.env.device)
        if all_reduce_sum(stop_flag).item():
            log.warning("%s", stopped)
            log.warning("to resume: %s", self.how_to_resume())
            raise TrainingInterrupted(stop.signum or signal.SIGINT, self.checkpoint_path)

    def stop_mid_stretch(self, stop: StopSignals, save: Callable[[], None], discarded: str, saved: str) -> None:
        """A stretch (epoch, or steps between evaluations) cut short: `save` its progress, or under
        DETERMINISTIC keep the last checkpoint so a resume stays bit-exact; say how to resume; raise."""
        if self.cfg.DETERMINISTIC:
            log.warning("%s", discarded)
        else:
            save()
            log.warning("%s", saved)
        log.warning("to resume: %s", self.how_to_resume())
        checkpoint = self.checkpoint_path if self.checkpoint_path.exists() else None
        raise TrainingInterrupted(stop.signum or signal.SIGINT, checkpoint)

    def publish(self, record: dict[str, Any], is_best: bool, writer: SummaryWriter | None, snapshot: str) -> None:
        """Rank 0 writes an evaluation's results: the metrics.jsonl `record` and its TensorBoard scalars
        (at its 'epoch' or 'step'), model_best.pth when `is_best`, and `snapshot` under
        TRAIN.SAVE_ALL_MODELS. Call before saving the checkpoint: a crash in between redoes this stretch
        and its resume drops the record, so each is in the file exactly once; and model_best.pth (with
        model_best.safetensors, the same weights for `cvt predict`) is never older than the best_top1 the
        checkpoint records."""
        if not self.env.is_main:
            return
        append_jsonl(self.folder / METRICS, record)
        counter = "step" if "step" in record else "epoch"
        if writer is not None:
            for key, value in record.items():
                if key != counter and value is not None:
                    writer.add_scalar(key, value, record[counter])
            writer.flush()
        if is_best:
            save_official(self.model, self.folder / MODEL_BEST)
            save_safetensors(self.model, self.folder / MODEL_BEST_PREDICT, self.classes, eval_transform_settings(self.cfg))
        if self.cfg.TRAIN.SAVE_ALL_MODELS:
            save_official(self.model, self.folder / snapshot)


def results_record(counter: dict[str, int], result: EpochResult, val: dict[str, float] | None,
                   ema_val: dict[str, float] | None) -> dict[str, Any]:
    """One metrics.jsonl line: `counter` ({'epoch': n} or {'step': n}), the training figures of the
    stretch since the last record, and the evaluation's (None where the stretch was not evaluated)."""
    record: dict[str, Any] = {
        **counter,
        "lr": result.lr,
        "train_loss": result.loss,
        "val_loss": val["loss"] if val else None,
        "val_top1": val["top1"] if val else None,
        "val_top5": val["top5"] if val else None,
        "images_per_sec": round(result.images_per_sec, 2),
        "time_s" if "step" in counter else "epoch_time_s": round(result.time_s, 3),
    }
    if result.skipped_steps:
        record["skipped_steps"] = result.skipped_steps
    if result.overflow_steps is not None:
        record["scaler_skipped_steps"] = result.overflow_steps
    if ema_val:
        record.update(val_loss_ema=ema_val["loss"], val_top1_ema=ema_val["top1"], val_top5_ema=ema_val["top5"])
    return record

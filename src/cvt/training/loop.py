"""One training epoch and one evaluation pass: plain functions over a model, a loader and an optimizer."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn
from tqdm import tqdm
from yacs.config import CfgNode

from ..data.labels import RealLabels
from ..errors import UserError
from .distributed import all_gather, all_reduce_sum, broadcast_buffers, is_main_process

__all__ = [
    "BadFileLog",
    "TrainModes",
    "EpochResult",
    "EpochTally",
    "LoopSettings",
    "build_criterion",
    "evaluate",
    "evaluate_with_ema",
    "train_one_epoch",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """What the config says about how to run the steps, resolved for one device."""

    device: torch.device
    amp_dtype: torch.dtype | None  # training autocast; None: off
    channels_last: bool
    accum_steps: int
    clip_grad_norm: float
    nonfinite_loss: str  # 'stop' | 'skip'
    print_freq: int
    eval_amp_dtype: torch.dtype | None = None  # evaluation autocast; None: float32, as the release tests
    # The keys that set the rate and the clip in this kind of run, for messages.
    lr_key: str = "TRAIN.LR"
    clip_key: str = "TRAIN.CLIP_GRAD_NORM"

    @classmethod
    def from_config(cls, cfg: CfgNode, device: torch.device) -> LoopSettings:
        section = "FINETUNE" if cfg.FINETUNE.FINETUNE else "TRAIN"
        return cls(
            device=device,
            amp_dtype=autocast_dtype(cfg, device),
            channels_last=cfg.AMP.MEMORY_FORMAT == "nhwc",
            accum_steps=int(cfg.TRAIN.ACCUM_STEPS),
            clip_grad_norm=float(cfg[section].CLIP_GRAD_NORM),
            nonfinite_loss=cfg.TRAIN.NONFINITE_LOSS,
            print_freq=int(cfg.PRINT_FREQ),
            eval_amp_dtype=eval_autocast_dtype(cfg, device),
            lr_key="FINETUNE.BASE_LR" if section == "FINETUNE" else "TRAIN.LR",
            clip_key=f"{section}.CLIP_GRAD_NORM",
        )

    @property
    def uses_grad_scaler(self) -> bool:
        """float16 needs loss scaling against gradient underflow; bfloat16 has float32's range."""
        return self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def eval_autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.eval_amp_dtype, enabled=self.eval_amp_dtype is not None)

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return images, targets.to(self.device, non_blocking=True)


def autocast_dtype(cfg: CfgNode, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype AMP.ENABLED / AMP.DTYPE ask for on `device`, or None for float32."""
    return _amp_dtype(cfg.AMP.DTYPE, device) if cfg.AMP.ENABLED else None


def eval_autocast_dtype(cfg: CfgNode, device: torch.device) -> torch.dtype | None:
    """The evaluation autocast dtype: None (float32, as the release tests) unless TEST.AMP."""
    return _amp_dtype(cfg.AMP.DTYPE, device) if cfg.TEST.AMP else None


def _amp_dtype(wanted: str, device: torch.device) -> torch.dtype:
    """AMP.DTYPE on `device`. 'auto' is the release's float16 (with a gradient scaler) on CUDA and
    bfloat16 on the CPU, whose autocast has no fast float16 path."""
    if device.type != "cuda":
        if wanted == "float16":
            raise UserError("AMP.DTYPE float16 needs a CUDA GPU; on the CPU use bfloat16 (or 'auto')")
        return torch.bfloat16
    return torch.bfloat16 if wanted == "bfloat16" else torch.float16


def build_criterion(cfg: CfgNode, mixup: Mixup | None) -> nn.Module:
    """The training loss the release picks: soft-target CE under mixup (its targets carry the label
    smoothing), label-smoothing CE when LOSS.LABEL_SMOOTHING > 0, else plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.LOSS.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=float(cfg.LOSS.LABEL_SMOOTHING))
    return nn.CrossEntropyLoss()


class BadFileLog:
    """Reports the files the loader skipped: each distinct file once, by name for the first few,
    then only a running count (a bad training file comes round again every epoch)."""

    def __init__(self, show: int = 10) -> None:
        self.show = show
        self.paths: set[str] = set()

    @property
    def count(self) -> int:
        return len(self.paths)

    def count_over_ranks(self) -> int:
        """Distinct files skipped on any rank (a collective): each rank saw its own share, and a file
        is one file whichever ranks met it."""
        return len(set().union(*all_gather(self.paths)))

    def add(self, bad_files: Iterable[tuple[str, str]]) -> None:
        for path, reason in bad_files:
            if str(path) in self.paths:
                continue
            self.paths.add(str(path))
            if self.count <= self.show:
                log.warning("skipped unreadable file %s (%s)", path, reason)
            elif self.count == self.show + 1 or self.count % 1000 == 0:
                log.warning("%d unreadable files skipped so far (only the first %d are named)", self.count, self.show)


@dataclass
class EpochResult:
    lr: float  # the learning rate the epoch started with
    loss: float  # mean training loss per image over all ranks (skipped steps left out)
    images: int  # images trained on, all ranks
    time_s: float
    steps: int  # optimizer steps taken
    skipped_steps: int  # steps dropped for a non-finite loss
    overflow_steps: int | None  # steps the float16 gradient scaler skipped on overflow; None: no scaler
    interrupted: bool  # a stop was requested; the epoch ended early

    @property
    def images_per_sec(self) -> float:
        return self.images / self.time_s if self.time_s > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TrainModes:
    """Puts a model in its fine-tuning mode: train mode (or eval mode everywhere when not
    `train_mode`), with the frozen modules always in eval mode."""

    frozen: tuple[nn.Module, ...]
    train_mode: bool

    def __call__(self, model: nn.Module) -> None:
        model.train(self.train_mode)
        for module in self.frozen:
            module.eval()


class EpochTally:
    """The running sums of one epoch, kept on the device so a step costs no host sync: the loss of
    the optimizer step being accumulated (its micro-batches), and of the steps taken so far."""

    def __init__(self, device: torch.device, counts_overflows: bool = False) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.images = 0
        self.steps = 0
        self.skipped = 0
        self.group_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.group_images = 0
        self.group_nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # Steps the gradient scaler skipped, on the device; None without a scaler.
        self.overflows = torch.zeros((), dtype=torch.long, device=device) if counts_overflows else None
        self.start = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, batch: int) -> None:
        self.group_loss_sum += loss.detach().double() * batch
        self.group_images += batch
        self.group_nonfinite |= ~torch.isfinite(loss.detach())

    def end_step(self, taken: bool, overflow: torch.Tensor | None = None) -> None:
        """Close the optimizer step: its loss counts if it was taken, not if it was skipped for a
        non-finite loss. `overflow` (a device bool) says the gradient scaler skipped it."""
        if overflow is not None and self.overflows is not None:
            self.overflows += overflow
        if taken:
            self.loss_sum += self.group_loss_sum
            self.images += self.group_images
        else:
            self.skipped += 1
        self.steps += 1
        self.group_loss_sum.zero_()
        self.group_nonfinite.zero_()
        self.group_images = 0

    def progress(self, world_size: int) -> tuple[float, float]:
        """(mean loss so far, images per second over all ranks): a host sync, for the progress line."""
        elapsed = time.perf_counter() - self.start
        mean_loss = self.loss_sum.item() / max(self.images, 1)
        return mean_loss, self.images * world_size / elapsed if elapsed > 0 else 0.0

    def result(self, lr: float, interrupted: bool, world_size: int = 1) -> EpochResult:
        """The epoch's totals over all ranks (a collective, and the epoch's one host sync)."""
        sums = [self.loss_sum, torch.tensor(float(self.images), dtype=torch.float64, device=self.device)]
        if self.overflows is not None:
            sums.append(self.overflows.double())
        totals = all_reduce_sum(torch.stack(sums)).tolist()
        _sync(self.device)
        total_loss, total_images = totals[:2]
        return EpochResult(
            lr=lr,
            loss=total_loss / total_images if total_images else math.nan,
            images=int(total_images),
            time_s=time.perf_counter() - self.start,
            steps=self.steps,
            skipped_steps=self.skipped,
            # Every rank's scaler saw the same all-reduced gradients and skipped the same steps.
            overflow_steps=round(totals[2] / world_size) if self.overflows is not None else None,
            interrupted=interrupted,
        )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    epoch: int,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None = None,
    mixup: Mixup | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    bad_files: BadFileLog | None = None,
    world_size: int = 1,
    set_train_mode: Callable[[nn.Module], object] = nn.Module.train,
    before_step: Callable[[int], None] | None = None,
    label: str = "",
    first_step: int | None = None,
) -> EpochResult:
    """Train `model` for one pass over `loader`.

    Every ACCUM_STEPS batches make one optimizer step (DDP synchronises gradients only on the last
    of them). After each step the ranks agree, in one small all-reduce, on whether any saw a
    non-finite loss and whether any was asked to stop, so they all take the same decision.
    `set_train_mode` puts the model in its training mode (fine-tuning keeps frozen parts in eval
    mode); `before_step(k)` runs before the pass's k-th optimizer step (from 0), where a step-based
    schedule sets the rate. `label` names the pass in the progress and log output (default 'epoch N').
    `first_step`: in a step run, the optimizer steps done before this pass's first, so that messages
    name the run's step (and `epoch`, the data pass) rather than an epoch's.
    """
    set_train_mode(model)
    bad_files = bad_files or BadFileLog()
    num_batches = len(loader)  # type: ignore[arg-type]
    no_sync = getattr(model, "no_sync", None)  # present on DistributedDataParallel only
    lr = optimizer.param_groups[-1]["lr"]  # the last group's: the head's under layer-wise decay
    params = [p for group in optimizer.param_groups for p in group["params"]]  # what clipping clips
    label = label or f"epoch {epoch}"
    progress = _Progress(label, num_batches, settings.print_freq, world_size)
    _sync(settings.device)
    tally = EpochTally(settings.device, counts_overflows=scaler.is_enabled())
    interrupted = False
    optimizer.zero_grad(set_to_none=True)
    for index, (images, targets, skipped_files) in enumerate(loader):
        bad_files.add(skipped_files)
        first_of_group = index - index % settings.accum_steps
        group_size = min(settings.accum_steps, num_batches - first_of_group)
        last_in_group = index == first_of_group + group_size - 1
        sync_context = no_sync() if no_sync is not None and not last_in_group else contextlib.nullcontext()
        with sync_context:
            loss = _forward_backward(model, criterion, images, targets, settings, scaler, mixup, group_size)
        tally.add_micro_batch(loss, images.shape[0])
        progress.batch_done()
        if not last_in_group:
            continue
        # One collective per optimizer step carries both decisions every rank must share, and its
        # `.tolist()` is the step's one host sync. The stop flag is filled on the device: copying a
        # Python value there (torch.tensor) would be a second, synchronous, copy on CUDA.
        stop = torch.full((), float(stop_requested()), device=settings.device)
        flags = torch.stack([tally.group_nonfinite.float(), stop])
        nonfinite_ranks, stop_ranks = all_reduce_sum(flags).tolist()
        overflow = None
        if nonfinite_ranks:
            where = (f"epoch {epoch}, step {tally.steps}" if first_step is None
                     else f"step {first_step + tally.steps + 1} (data pass {epoch})")
            _nonfinite_step(settings, where, tally, index)
        else:
            if before_step is not None:
                before_step(tally.steps)
            overflow = _optimizer_step(model, optimizer, params, settings, scaler, ema)
        tally.end_step(taken=not nonfinite_ranks, overflow=overflow)
        optimizer.zero_grad(set_to_none=True)
        progress.step_done(tally, optimizer.param_groups[-1]["lr"], index)
        if stop_ranks:
            interrupted = True
            break
    progress.close()
    result = tally.result(lr, interrupted, world_size)
    if result.overflow_steps:
        log.info("%s: the float16 gradient scaler skipped %d of %d optimizer steps (gradient overflow; "
                 "the scale was lowered)", label, result.overflow_steps, result.steps)
    return result


def _forward_backward(
    model: nn.Module, criterion: nn.Module, images: torch.Tensor, targets: torch.Tensor,
    settings: LoopSettings, scaler: torch.amp.GradScaler, mixup: Mixup | None, group_size: int,
) -> torch.Tensor:
    """One micro-batch's forward and backward; returns its (float32) loss."""
    images, targets = settings.to_device(images, targets)
    if mixup is not None:
        images, targets = mixup(images, targets)
    with settings.autocast():
        output = model(images)
        loss = criterion(output, targets)
    loss = loss.float()
    # Mean over the group: `group_size` micro-batches of one size give the full batch's gradient.
    scaler.scale(loss / group_size).backward()
    return loss


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], settings: LoopSettings,
    scaler: torch.amp.GradScaler, ema: ModelEmaV3 | None,
) -> torch.Tensor | None:
    """Clip, step and update; returns whether the gradient scaler skipped the step (a device bool,
    read without a host sync: the scaler lowers its scale exactly when it skips), or None without one."""
    scale_before = scaler._get_scale_async().clone() if scaler.is_enabled() else None
    if settings.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update(unwrap_model(model))
    return None if scale_before is None else scaler._get_scale_async() < scale_before


def _nonfinite_step(settings: LoopSettings, where: str, tally: EpochTally, index: int) -> None:
    """A rank saw a non-finite loss at `where` ('epoch E, step k' or 'step N (data pass P)'): stop the
    run, or skip the step (TRAIN.NONFINITE_LOSS)."""
    if settings.nonfinite_loss == "stop":
        raise UserError(
            f"non-finite loss at {where} (batch {index}); stopped, and the last checkpoint is kept as it "
            f"was; lower {settings.lr_key}, set {settings.clip_key}, or set TRAIN.NONFINITE_LOSS skip"
        )
    log.warning("non-finite loss at %s: step skipped (%d in this pass)", where, tally.skipped + 1)


class _Progress:
    """The epoch's progress on rank 0: a tqdm bar on a terminal, else a log line with the rate and the
    epoch's ETA every PRINT_FREQ steps, and after any step that ends QUIET_LIMIT_S seconds or more
    after the last line, so a slow epoch is never silent for long."""

    QUIET_LIMIT_S = 5.0

    def __init__(self, label: str, num_batches: int, print_freq: int, world_size: int) -> None:
        self.label, self.num_batches, self.print_freq, self.world_size = label, num_batches, print_freq, world_size
        self.is_main = is_main_process()
        self.show_bar = self.is_main and sys.stdout.isatty()
        self.bar = tqdm(total=num_batches, desc=label, leave=False, dynamic_ncols=True, disable=not self.show_bar)
        self.start = self.last_line = time.perf_counter()

    def batch_done(self) -> None:
        self.bar.update(1)

    def step_done(self, tally: EpochTally, lr: float, index: int) -> None:
        now = time.perf_counter()
        due = self.is_main and (
            tally.steps % self.print_freq == 0 or index == self.num_batches - 1 or now - self.last_line >= self.QUIET_LIMIT_S
        )
        if not due:  # the loss so far is a host sync: read only when shown (tqdm moves the bar itself)
            return
        mean_loss, rate = tally.progress(self.world_size)
        self.last_line = now
        if self.show_bar:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            return
        done = index + 1
        eta_s = (now - self.start) / done * (self.num_batches - done)
        log.info("%s [%d/%d] loss %.4f lr %.3e %.0f img/s, ETA %d:%02d",
                 self.label, done, self.num_batches, mean_loss, lr, rate, eta_s // 60, eta_s % 60)

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    settings: LoopSettings,
    *,
    bad_files: BadFileLog | None = None,
    valid_labels: Sequence[int] | None = None,
    real_labels: RealLabels | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of `model` over `loader`.

    `valid_labels` (TEST.VALID_LABELS): only those logit columns, in index order, before loss and
    accuracy, as the release. `real_labels` (TEST.REAL_LABELS): the loader's targets are sample indices
    into it, and ImageNet-ReaL top-1/top-5 (`real_top1`, `real_top5`) are added, counted like the rest.

    Every rank sums its per-image losses and correct counts; the sums are all-reduced and divided
    once. The correct counts are integers, so top-1 and top-5 do not depend on how the images were
    split over ranks and batches; the loss is a float64 sum of float32 values, whose 29 spare bits
    make its order practically irrelevant (any difference is at the 1e-15 level). Pass the bare model,
    not a DDP wrapper: ranks may hold different numbers of batches, and a collective inside DDP's
    forward would then wait forever.
    """
    model.eval()
    bad_files = bad_files or BadFileLog()
    columns = None if valid_labels is None else torch.tensor(list(valid_labels), device=settings.device)
    real = None if real_labels is None else real_labels.to(settings.device)
    # loss sum, top-1 correct, top-5 correct, images; ReaL top-1, top-5, images with ReaL labels
    sums = torch.zeros(7, dtype=torch.float64, device=settings.device)
    for images, targets, skipped_files in loader:
        bad_files.add(skipped_files)
        if images.shape[0] == 0:  # every file of this batch was unreadable
            continue
        images, targets = settings.to_device(images, targets)
        samples = targets
        if real is not None:
            targets = real.targets[samples]
        with settings.eval_autocast():
            output = model(images)
        output = output.float()
        if columns is not None:
            output = output.index_select(1, columns)
        losses = F.cross_entropy(output, targets, reduction="none")
        k = min(5, output.shape[1])
        top = output.topk(k, dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        sums[0] += losses.double().sum()
        sums[1] += hits[:, :1].sum()
        sums[2] += hits.sum()
        sums[3] += targets.shape[0]
        if real is not None:
            sums[4:] += real.hits(top, samples)
    loss_sum, top1, top5, count, real_top1, real_top5, real_count = all_reduce_sum(sums).tolist()
    if count == 0:
        raise UserError("evaluation saw no readable image; check the test split's folder and files")
    metrics = {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss_sum / count, "images": int(count)}
    if real is not None:
        metrics.update(real_top1=100.0 * real_top1 / max(real_count, 1), real_top5=100.0 * real_top5 / max(real_count, 1),
                       real_images=int(real_count))
    return metrics


def evaluate_with_ema(
    model: nn.Module, ema: ModelEmaV3 | None, loader: Iterable, settings: LoopSettings, *, bad_files: BadFileLog,
) -> tuple[dict[str, float], dict[str, float] | None]:
    """(metrics of `model`, metrics of the EMA weights or None) during training: every rank first takes
    rank 0's BatchNorm statistics, so all ranks evaluate the same network."""
    broadcast_buffers(model)
    if ema is not None:
        broadcast_buffers(ema.module)
    val = evaluate(model, loader, settings, bad_files=bad_files)
    ema_val = evaluate(ema.module, loader, settings, bad_files=bad_files) if ema is not None else None
    return val, ema_val

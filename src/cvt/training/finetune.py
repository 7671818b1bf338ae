"""Fine-tuning as the paper transfers CvT (ViT's protocol): FINETUNE.FINETUNE trains for FINETUNE.STEPS
optimizer steps instead of epochs.

* The batch FINETUNE.BATCH_SIZE and the rate FINETUNE.BASE_LR are global: the batch is split over the
  processes and TRAIN.ACCUM_STEPS, and the rate is never scaled.
* The schedule (`build_step_scheduler`) is set before every optimizer step from the step number alone.
* Every FINETUNE.EVAL_EVERY steps, and after the last, the run evaluates, appends one line to
  metrics.jsonl (keyed by `step`), writes TensorBoard scalars at that step, keeps model_best.pth and
  saves checkpoint.pth with the steps completed.
* The data is one stream of passes over the training set, each pass's order a function of SEED and
  the pass (the loader's `set_window`); a step is ACCUM_STEPS batches, and a pass ends with its last
  whole step. Training between two evaluations starts the loader at its position in the stream,
  with worker seeds a function of that position, so a run resumed from checkpoint.pth sees the same
  batches as one that never stopped; under DETERMINISTIC it equals it bit for bit.
* FROZEN_LAYERS (or LINEAR_PROBE: all but the head) freezes parameters and keeps those modules in eval
  mode, so their BatchNorm statistics stay as loaded; TRAIN_MODE False runs the whole network in eval
  mode while it trains.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn
from yacs.config import CfgNode

from ..errors import UserError
from .loop import EpochResult, evaluate_with_ema
from .session import StopSignals
from .state import TrainingRun, results_record

if TYPE_CHECKING:  # TensorBoard loads only when a run writes events (TrainingRun.recording)
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["freeze_layers", "frozen_prefixes", "run_steps"]

log = logging.getLogger("cvt")


# --------------------------------------------------------------------------------------------------
# Set-up: frozen layers, train modes
# --------------------------------------------------------------------------------------------------


def frozen_prefixes(cfg: CfgNode, model: nn.Module) -> list[str]:
    """FINETUNE.FROZEN_LAYERS, or under LINEAR_PROBE every top-level part of the model but the head."""
    if cfg.FINETUNE.LINEAR_PROBE:
        return [name for name, _ in model.named_children() if name != "head"]
    return list(cfg.FINETUNE.FROZEN_LAYERS)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def freeze_layers(model: nn.Module, prefixes: list[str]) -> list[nn.Module]:
    """Stop the gradients of every parameter under `prefixes` (module or parameter names, matched at
    dots: 'stage1' covers 'stage1.blocks.0.mlp.fc1.weight', not 'stage10'); returns the modules under
    them, which `TrainModes` keeps in eval mode."""
    modules = [m for name, m in model.named_modules() if name and any(_under(name, p) for p in prefixes)]
    params = [p for name, p in model.named_parameters() if any(_under(name, q) for q in prefixes)]
    names = [name for name, _ in model.named_modules() if name] + [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            tops = ", ".join(name for name, _ in model.named_children())
            raise UserError(f"FINETUNE.FROZEN_LAYERS: {prefix!r} names no part of the model; names start with {tops}")
    for param in params:
        param.requires_grad_(False)
    if prefixes:
        log.info("frozen: %s (%d parameter tensors, %.2fM values)", ", ".join(prefixes), len(params),
                 sum(p.numel() for p in params) / 1e6)
    return modules


# --------------------------------------------------------------------------------------------------
# The step loop
# --------------------------------------------------------------------------------------------------


def run_steps(run: TrainingRun, stop: StopSignals, train_model: nn.Module, eval_model: nn.Module) -> None:
    """Steps start_step .. FINETUNE.STEPS: train, evaluate every EVAL_EVERY steps, record, save."""
    total, every = int(run.cfg.FINETUNE.STEPS), int(run.cfg.FINETUNE.EVAL_EVERY)
    step = run.start_step
    if step >= total:
        log.info("all %d steps (FINETUNE.STEPS) are done already; raise FINETUNE.STEPS to train on", total)
    steps_per_pass = _steps_per_pass(run)
    with run.recording(step + 1, key="step") as writer:
        while step < total:
            end = min(total, (step // every + 1) * every)
            result = _train_steps(run, train_model, step, end, steps_per_pass, stop)
            step += result.steps
            if result.interrupted:
                reached = step
                run.stop_mid_stretch(
                    stop, lambda: run.save(0, step=reached),
                    discarded=f"interrupted at step {step}: the steps since the last checkpoint are discarded (DETERMINISTIC)",
                    saved=f"interrupted at step {step}: saved; a resume continues from there",
                )
            val, ema_val = evaluate_with_ema(eval_model, run.ema, run.val_loader, run.settings, bad_files=run.bad_val)
            is_best = run.update_best(val)
            _record(run, step, total, result, val, ema_val, is_best, writer)
            run.save(0, step=step)
            run.stop_if_requested(stop, step < total, f"stopped after step {step}; a resume continues from there")


def _steps_per_pass(run: TrainingRun) -> int:
    run.train_loader.set_epoch(0)  # the whole pass, to count its batches
    batches, accum = len(run.train_loader), run.settings.accum_steps
    if batches < accum:
        raise UserError(
            f"one pass over the training set gives each process {batches} batch(es), fewer than one optimizer "
            f"step's {accum} (TRAIN.ACCUM_STEPS); lower FINETUNE.BATCH_SIZE or TRAIN.ACCUM_STEPS"
        )
    return batches // accum


def _train_steps(run: TrainingRun, train_model: nn.Module, start: int, end: int, steps_per_pass: int,
                 stop: StopSignals) -> EpochResult:
    """Optimizer steps start .. end - 1 (across passes where they span several), as one result."""
    accum = run.settings.accum_steps
    parts: list[EpochResult] = []
    step = start
    while step < end:
        data_pass, offset = divmod(step, steps_per_pass)
        count = min(end - step, steps_per_pass - offset)
        run.train_loader.set_window(data_pass, offset * accum, count * accum)

        def set_rate(k: int, first: int = step) -> None:
            run.scheduler.step_update(first + k + 1)  # the schedule counts updates from 1

        part = run.train_pass(
            train_model, stop, epoch=data_pass, set_train_mode=run.set_train_mode, before_step=set_rate,
            label=f"steps {step + 1}-{step + count} of {run.cfg.FINETUNE.STEPS}", first_step=step,
        )
        parts.append(part)
        step += part.steps
        if part.interrupted:
            break
    images = sum(p.images for p in parts)
    return EpochResult(
        lr=run.optimizer.param_groups[-1]["lr"],  # the last step's (the head's under layer-wise decay)
        loss=sum(p.loss * p.images for p in parts) / images if images else float("nan"),
        images=images, time_s=sum(p.time_s for p in parts), steps=step - start,
        skipped_steps=sum(p.skipped_steps for p in parts),
        overflow_steps=_total_overflows(parts),
        interrupted=any(p.interrupted for p in parts),
    )


def _total_overflows(parts: list[EpochResult]) -> int | None:
    counts = [p.overflow_steps for p in parts if p.overflow_steps is not None]
    return sum(counts) if counts else None


def _record(run: TrainingRun, step: int, total: int, result: EpochResult, val: dict[str, float],
            ema_val: dict[str, float] | None, is_best: bool, writer: SummaryWriter | None) -> None:
    """The evaluation's log line, metrics.jsonl record, TensorBoard scalars, and model_best.pth."""
    record = results_record({"step": step}, result, val, ema_val)
    run.last_record = record
    log.info("step %d/%d: train loss %.4f, val top-1 %.2f, top-5 %.2f, loss %.4f, %.0f img/s, %.1f s",
             step, total, result.loss, val["top1"], val["top5"], val["loss"], result.images_per_sec, result.time_s)
    run.publish(record, is_best, writer, snapshot=f"model_step{step}.pth")

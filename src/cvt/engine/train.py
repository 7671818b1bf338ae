"""`train(cfg)` and `test(cfg)`: the release's tools/train.py and tools/test.py, on one code path for one
process or many (torchrun).

Run folder (`cvt.config.output_dir(cfg)`), written by rank 0:

* ``config.yaml``: the full config of the run; ``log.txt``: the log; ``tensorboard/``: event files;
* ``metrics.jsonl``: one JSON object per epoch, each epoch exactly once even across crash and resume;
* ``checkpoint.pth``: everything needed to resume, after every epoch (docs/ARCHITECTURE.md);
* ``model_best.pth`` (best val top-1) and ``final_state.pth``: plain official-layout state dicts;
* ``test_metrics.json``: written by `test`.

Resume: with TRAIN.AUTO_RESUME a run continues from its folder's checkpoint.pth (or from
TRAIN.CHECKPOINT when set) at the first epoch not completed, restoring weights, optimizer, scaler,
EMA, best top-1 and every rank's random number generators. With DETERMINISTIC the resumed run's
weights equal an uninterrupted run's, bit for bit.

Signals: SIGINT or SIGTERM lets the current optimizer step finish, then every rank stops at that same
step. The run saves checkpoint.pth with the interrupted epoch marked not completed, holding the
weights reached mid-epoch, so a resume redoes that epoch from them; under DETERMINISTIC the partial
epoch is discarded instead and the checkpoint of the last completed epoch is kept, so the resumed
run stays bit-exact. Then `TrainingInterrupted` (a KeyboardInterrupt: the CLI exits 130) is raised.
A second signal aborts at once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from ..config import output_dir, save_config
from ..data import build_loader, build_mixup, check_same_classes
from ..errors import UserError
from ..interop.checkpoint import load_checkpoint, read_checkpoint, save_official
from ..io import append_jsonl, atomic_write_text, ensure_folder
from ..models.cvt import ConvolutionalVisionTransformer, create_model
from .checkpoint import capture_rng, read_training, restore_rng, restore_training, save_training, truncate_metrics
from .distributed import DistEnv, all_reduce_sum, barrier, broadcast_buffers, init_distributed
from .loop import BadFileLog, EpochResult, LoopSettings, build_criterion, evaluate, train_one_epoch
from .optim import build_optimizer, build_scheduler, scaled_lr

__all__ = ["TrainingInterrupted", "build_model", "test", "train"]

log = logging.getLogger("cvt")

CHECKPOINT = "checkpoint.pth"
MODEL_BEST = "model_best.pth"
FINAL_STATE = "final_state.pth"
METRICS = "metrics.jsonl"
TEST_METRICS = "test_metrics.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint.

    A KeyboardInterrupt, so the CLI's Ctrl-C handling (exit code 130) covers it.
    """

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume from {checkpoint}")


# --------------------------------------------------------------------------------------------------
# Process set-up
# --------------------------------------------------------------------------------------------------


class _StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second one
    aborts immediately. Installed only in the main thread (Python delivers signals only there).

    Under torchrun a Ctrl-C reaches every worker twice, from the terminal and forwarded by the agent,
    so there repeats are ignored: the agent itself escalates to SIGKILL after its shutdown timeout.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._repeat_aborts = "TORCHELASTIC_RUN_ID" not in os.environ

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if self._repeat_aborts:
                raise KeyboardInterrupt
            return
        self.signum = signum
        log.warning(
            "%s received: stopping after the current step%s", signal.Signals(signum).name,
            " (send it again to abort now)" if self._repeat_aborts else "",
        )

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _run_logging(folder: Path | None, is_main: bool) -> Iterator[None]:
    """Log to `folder`/log.txt and to the console on rank 0; other ranks report warnings only."""
    logger = logging.getLogger("cvt")
    previous_level = logger.level
    handlers: list[logging.Handler] = []
    if is_main:
        logger.setLevel(logging.INFO)
        if not logger.hasHandlers():  # called as a library: nobody prints to the console yet
            handlers.append(logging.StreamHandler())
        if folder is not None:
            ensure_folder(folder)
            file_handler = logging.FileHandler(folder / "log.txt", encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            handlers.append(file_handler)
    else:
        logger.setLevel(logging.WARNING)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous_level)


@contextlib.contextmanager
def _reproducibility(cfg: CfgNode, rank: int) -> Iterator[None]:
    """Seed every generator from SEED (offset by rank, so ranks augment and drop differently) and set
    the cuDNN / deterministic-algorithm switches; the process-wide switches are restored afterwards."""
    seed = int(cfg.SEED) + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.enabled,
    )
    if cfg.DETERMINISTIC:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = bool(cfg.CUDNN.BENCHMARK)
        torch.backends.cudnn.deterministic = bool(cfg.CUDNN.DETERMINISTIC)
    torch.backends.cudnn.enabled = bool(cfg.CUDNN.ENABLED)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled = previous[1:]


def build_model(cfg: CfgNode) -> ConvolutionalVisionTransformer:
    """The network MODEL.SPEC, MODEL.NUM_CLASSES and MODEL.ACTIVATION describe."""
    return create_model(
        dict(cfg.MODEL.SPEC),
        num_classes=int(cfg.MODEL.NUM_CLASSES),
        act=cfg.MODEL.ACTIVATION,
        grad_checkpointing=bool(cfg.TRAIN.GRAD_CHECKPOINTING),
    )


def _check_num_classes(cfg: CfgNode, classes: list[str], folder: Path) -> None:
    if len(classes) != cfg.MODEL.NUM_CLASSES:
        raise UserError(
            f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but {folder} has {len(classes)} class folders; "
            f"set MODEL.NUM_CLASSES {len(classes)}"
        )


def _load_pretrained(cfg: CfgNode, model: ConvolutionalVisionTransformer) -> None:
    """MODEL.PRETRAINED into `model`: the layers MODEL.PRETRAINED_LAYERS names ('*' = all), with the
    head left freshly initialised when the file's class count differs (fine-tuning)."""
    ckpt = read_checkpoint(cfg.MODEL.PRETRAINED)
    layers = list(cfg.MODEL.PRETRAINED_LAYERS)
    new_head = ckpt.num_classes is not None and ckpt.num_classes != model.num_classes
    if new_head:
        log.info(
            "pretrained %s has %d classes, the model %d: its head is dropped and a new one trained",
            ckpt.source, ckpt.num_classes, model.num_classes,
        )
    load_checkpoint(model, ckpt, backbone_only=new_head, layers=None if "*" in layers else layers)
    log.info("loaded pretrained weights from %s (layers: %s)", ckpt.source, ", ".join(layers))


def _resume_path(cfg: CfgNode, folder: Path) -> Path | None:
    """TRAIN.CHECKPOINT when set (it must exist), else the run folder's checkpoint.pth under
    TRAIN.AUTO_RESUME when there is one, else None (a fresh start)."""
    if cfg.TRAIN.CHECKPOINT:
        path = Path(cfg.TRAIN.CHECKPOINT)
        if not path.is_file():
            raise UserError(f"TRAIN.CHECKPOINT {str(path)!r} does not exist; fix the path or clear the key to start afresh")
        return path
    path = folder / CHECKPOINT
    return path if cfg.TRAIN.AUTO_RESUME and path.is_file() else None


def _wrap(model: torch.nn.Module, cfg: CfgNode, env: DistEnv) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model to train, model to evaluate). Training goes through DDP with several processes;
    evaluation uses the bare model because ranks may hold different numbers of test batches."""
    train_model: torch.nn.Module = model
    if env.distributed:
        train_model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.TRAIN.COMPILE:
        return torch.compile(train_model), torch.compile(model)
    return train_model, model


def _epoch_record(epoch: int, lr: float, result: EpochResult, val: dict[str, float] | None,
                  ema_val: dict[str, float] | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "epoch": epoch,
        "lr": lr,
        "train_loss": result.loss,
        "val_loss": val["loss"] if val else None,
        "val_top1": val["top1"] if val else None,
        "val_top5": val["top5"] if val else None,
        "images_per_sec": round(result.images_per_sec, 2),
        "epoch_time_s": round(result.time_s, 3),
    }
    if result.skipped_steps:
        record["skipped_steps"] = result.skipped_steps
    if ema_val:
        record.update(val_loss_ema=ema_val["loss"], val_top1_ema=ema_val["top1"], val_top5_ema=ema_val["top5"])
    return record


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def train(cfg: CfgNode) -> dict[str, Any]:
    """Train (or fine-tune, or resume) the experiment `cfg` describes; see the module docstring.

    Returns output_dir, checkpoint, model_best, final_state, best_top1 and the last epoch's metrics.
    Raises UserError for a mistake in the config or data, TrainingInterrupted on SIGINT/SIGTERM.
    """
    folder = output_dir(cfg)
    env = init_distributed(float(cfg.DIST_TIMEOUT_S), cfg.DIST_BACKEND)
    with _run_logging(folder if env.is_main else None, env.is_main), _reproducibility(cfg, env.rank), \
            _StopSignals() as stop:
        return _train(cfg, env, folder, stop)


def _train(cfg: CfgNode, env: DistEnv, folder: Path, stop: _StopSignals) -> dict[str, Any]:
    device = env.device
    settings = LoopSettings.from_config(cfg, device)
    if env.is_main:
        save_config(cfg, folder / "config.yaml")
        log.info("run folder %s; %d process(es) on %s", folder, env.world_size, device)

    train_loader, train_set = build_loader(cfg, "train", rank=env.rank, world_size=env.world_size)
    val_loader, val_set = build_loader(cfg, "test", rank=env.rank, world_size=env.world_size)
    check_same_classes(train_set, val_set)
    classes = list(train_set.classes)
    _check_num_classes(cfg, classes, train_set.split_dir)

    with torch.random.fork_rng(devices=[]):
        # The same initial weights on every rank: DDP would copy rank 0's later anyway, but the EMA
        # copies the model before that.
        torch.default_generator.manual_seed(int(cfg.SEED))  # the CPU generator only: CUDA's stays per rank
        model = build_model(cfg)
    resume_from = _resume_path(cfg, folder)
    if cfg.MODEL.PRETRAINED and resume_from is None:
        _load_pretrained(cfg, model)
    model.to(device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format)
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    lr = scaled_lr(cfg, env.world_size)
    optimizer = build_optimizer(cfg, model, lr, device)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.uses_grad_scaler)
    ema = ModelEmaV3(model, decay=float(cfg.TRAIN.EMA.DECAY)) if cfg.TRAIN.EMA.ENABLED else None
    mixup = build_mixup(cfg, len(classes))
    criterion = build_criterion(cfg, mixup)
    log.info(
        "optimizer %s, lr %.3g (TRAIN.LR %.3g x %d processes x %d accumulation steps%s), batch %d per step",
        cfg.TRAIN.OPTIMIZER, lr, cfg.TRAIN.LR, env.world_size, settings.accum_steps,
        "" if cfg.TRAIN.SCALE_LR else ", SCALE_LR off: not scaled",
        cfg.TRAIN.BATCH_SIZE_PER_GPU * env.world_size * settings.accum_steps,
    )

    start_epoch, best_top1 = int(cfg.TRAIN.BEGIN_EPOCH), None
    if resume_from is not None:
        state = restore_training(
            read_training(resume_from), cfg, classes,
            model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema,
        )
        start_epoch, best_top1 = state.epoch, state.best_top1
        if not restore_rng(state.rng, env.rank):
            log.warning("%s holds no generator state for rank %d: continuing with fresh seeds", resume_from, env.rank)
        log.info("resumed from %s at epoch %d (best top-1 so far %s)", resume_from, start_epoch,
                 "-" if best_top1 is None else f"{best_top1:.2f}")
    end_epoch = int(cfg.TRAIN.END_EPOCH)
    if start_epoch >= end_epoch:
        log.info("all %d epochs (TRAIN.END_EPOCH) are done already; raise TRAIN.END_EPOCH to train on", end_epoch)
    if env.is_main:
        truncate_metrics(folder / METRICS, start_epoch)
    scheduler.step(start_epoch)
    train_model, eval_model = _wrap(model, cfg, env)

    writer = None
    if cfg.TENSORBOARD and env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events of epochs a crashed run logged past its last checkpoint.
        writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_epoch)
    bad_train, bad_val = BadFileLog(), BadFileLog()
    checkpoint_path = folder / CHECKPOINT
    how_to_resume = (
        "run the same command again" if cfg.TRAIN.AUTO_RESUME and not cfg.TRAIN.CHECKPOINT
        else "run the same command with TRAIN.AUTO_RESUME True"
        + (" TRAIN.CHECKPOINT ''" if cfg.TRAIN.CHECKPOINT else "")
    )
    record: dict[str, Any] = {}

    def save(epochs_completed: int) -> None:
        rng = capture_rng()  # a collective: every rank takes part
        if env.is_main:
            save_training(
                checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema,
                epoch=epochs_completed, best_top1=best_top1, class_names=classes, cfg=cfg, rng=rng,
            )

    try:
        for epoch in range(start_epoch, end_epoch):
            train_loader.set_epoch(epoch)  # the epoch's order and worker seeds: resumes see the same data
            epoch_lr = optimizer.param_groups[0]["lr"]
            with torch.autograd.set_detect_anomaly(bool(cfg.TRAIN.DETECT_ANOMALY)):
                result = train_one_epoch(
                    train_model, train_loader, criterion, optimizer, settings,
                    epoch=epoch, scaler=scaler, ema=ema, mixup=mixup,
                    stop_requested=stop.requested, bad_files=bad_train, world_size=env.world_size,
                )
            if result.interrupted:
                if cfg.DETERMINISTIC:
                    log.warning("epoch %d interrupted: its partial progress is discarded (DETERMINISTIC)", epoch)
                else:
                    save(epoch)
                    log.warning("epoch %d interrupted: saved its progress; a resume redoes epoch %d", epoch, epoch)
                log.warning("to resume: %s", how_to_resume)
                raise TrainingInterrupted(stop.signum or signal.SIGINT, checkpoint_path if checkpoint_path.exists() else None)

            due = epoch >= cfg.TRAIN.EVAL_BEGIN_EPOCH and ((epoch + 1) % cfg.TRAIN.EVAL_EVERY == 0 or epoch + 1 == end_epoch)
            if due:
                broadcast_buffers(eval_model)
                if ema is not None:
                    broadcast_buffers(ema.module)
            val = evaluate(eval_model, val_loader, settings, bad_files=bad_val) if due else None
            ema_val = evaluate(ema.module, val_loader, settings, bad_files=bad_val) if due and ema is not None else None
            is_best = val is not None and (best_top1 is None or val["top1"] > best_top1)
            if is_best:
                best_top1 = val["top1"]
            scheduler.step(epoch + 1, val["top1"] if val else None)

            record = _epoch_record(epoch, epoch_lr, result, val, ema_val)
            log.info(
                "epoch %d: train loss %.4f, val top-1 %s, top-5 %s, loss %s, %.0f img/s, %.1f s",
                epoch, result.loss, *(f"{val[k]:.2f}" if val else "-" for k in ("top1", "top5")),
                f"{val['loss']:.4f}" if val else "-", result.images_per_sec, result.time_s,
            )
            if env.is_main:
                # The record goes first: a crash before the checkpoint is saved redoes this epoch, and
                # the resume drops the record, so each epoch is in the file exactly once.
                append_jsonl(folder / METRICS, record)
                if writer is not None:
                    for key, value in record.items():
                        if key != "epoch" and value is not None:
                            writer.add_scalar(key, value, epoch)
                    writer.flush()
                # Before the checkpoint, which records best_top1: model_best.pth is never older.
                if is_best:
                    save_official(model, folder / MODEL_BEST)
                if cfg.TRAIN.SAVE_ALL_MODELS:
                    save_official(model, folder / f"model_{epoch}.pth")
            save(epoch + 1)

            # After the last epoch only final_state.pth is left to write: finish instead of stopping.
            stop_flag = torch.tensor([float(stop.requested() and epoch + 1 < end_epoch)], device=device)
            if all_reduce_sum(stop_flag).item():
                log.warning("stopped after epoch %d; a resume continues at epoch %d", epoch, epoch + 1)
                log.warning("to resume: %s", how_to_resume)
                raise TrainingInterrupted(stop.signum or signal.SIGINT, checkpoint_path)
    finally:
        if writer is not None:
            writer.close()

    final_path = folder / FINAL_STATE
    if env.is_main:
        save_official(model, final_path)
    barrier()
    skipped = [report.count_over_ranks() for report in (bad_train, bad_val)]
    if any(skipped):
        log.warning("unreadable files skipped: %d in training, %d in evaluation", *skipped)
    best_path = folder / MODEL_BEST
    weights = best_path if best_path.exists() else final_path
    log.info("done: best val top-1 %s", f"{best_top1:.2f}%" if best_top1 is not None else "n/a")
    log.info("checkpoint: %s", checkpoint_path)
    log.info("try it: cvt predict --cfg %s --weights %s %s", folder / "config.yaml", weights, val_set.samples[0][0])
    return {
        "output_dir": str(folder),
        "checkpoint": str(checkpoint_path),
        "model_best": str(best_path) if best_path.exists() else None,
        "final_state": str(final_path),
        "best_top1": best_top1,
        "metrics": record,
    }


# --------------------------------------------------------------------------------------------------
# test
# --------------------------------------------------------------------------------------------------


def test(cfg: CfgNode) -> dict[str, Any]:
    """Evaluate TEST.MODEL_FILE (default: the run folder's final_state.pth) on DATASET.TEST_SET.

    Prints top-1, top-5 and loss and writes test_metrics.json in the run folder. The numbers are
    the same for any number of processes.
    """
    folder = output_dir(cfg)
    env = init_distributed(float(cfg.DIST_TIMEOUT_S), cfg.DIST_BACKEND)
    with _run_logging(folder if env.is_main else None, env.is_main), _reproducibility(cfg, env.rank):
        return _test(cfg, env, folder)


def _test(cfg: CfgNode, env: DistEnv, folder: Path) -> dict[str, Any]:
    model_file = Path(cfg.TEST.MODEL_FILE) if cfg.TEST.MODEL_FILE else folder / FINAL_STATE
    if not cfg.TEST.MODEL_FILE and not model_file.exists():
        raise UserError(f"TEST.MODEL_FILE is not set and {model_file} does not exist; set TEST.MODEL_FILE to the weights to test")
    ckpt = read_checkpoint(model_file)
    if ckpt.num_classes is not None and ckpt.num_classes != cfg.MODEL.NUM_CLASSES:
        raise UserError(
            f"{model_file} has a {ckpt.num_classes}-class head but MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}; "
            f"set MODEL.NUM_CLASSES {ckpt.num_classes} (and test on a folder with those classes)"
        )
    # A checkpoint that knows its classes maps its outputs by name; build_loader checks the folders match.
    loader, dataset = build_loader(cfg, "test", rank=env.rank, world_size=env.world_size, class_names=ckpt.class_names)
    _check_num_classes(cfg, list(dataset.classes), dataset.split_dir)

    model = build_model(cfg)
    load_checkpoint(model, ckpt)
    settings = LoopSettings.from_config(cfg, env.device)
    model.to(env.device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format)
    bad_files = BadFileLog()
    start = time.perf_counter()
    metrics = evaluate(model, loader, settings, bad_files=bad_files)
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "model_file": str(model_file),
        "split": str(dataset.split_dir),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "images": metrics["images"],
        "skipped_files": bad_files.count_over_ranks(),
        "processes": env.world_size,
        "time_s": round(elapsed, 3),
    }
    if env.is_main:
        atomic_write_text(folder / TEST_METRICS, json.dumps(result, indent=2) + "\n")
        log.info(
            "test %s on %s: top-1 %.3f%%, top-5 %.3f%%, loss %.4f (%d images)",
            model_file, dataset.split_dir, result["top1"], result["top5"], result["loss"], result["images"],
        )
    result["output_dir"] = str(folder)
    return result

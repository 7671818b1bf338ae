"""`train(cfg)` and `test(cfg)`: the release's tools/train.py and tools/test.py, on one code path for one
process or many (torchrun).

Run folder (`cvt.config.output_dir(cfg)`), written by rank 0:

* ``config.yaml``: the full config of the run, MODEL.ACTIVATION resolved ('auto': the one the model runs
  once weights are loaded); ``log.txt``: the log; ``tensorboard/``: event files;
* ``metrics.jsonl``: one JSON object per epoch, each epoch exactly once even across crash and resume;
* ``checkpoint.pth``: everything needed to resume, after every epoch (docs/ARCHITECTURE.md);
* ``model_best.pth`` (best val top-1) and ``final_state.pth``: plain official-layout state dicts;
* ``model_best.safetensors``: model_best.pth's weights with class names, activation, spec and test
  transform, for ``cvt predict``;
* ``test_metrics.json``: written by `test`.

With FINETUNE.FINETUNE the run trains for FINETUNE.STEPS optimizer steps instead of epochs, evaluating
and saving every FINETUNE.EVAL_EVERY steps (`cvt.training.finetune`); resume and signals work alike.

Resume: with TRAIN.AUTO_RESUME a run continues from its folder's checkpoint.pth (or from
TRAIN.CHECKPOINT when set) at the first epoch not completed, restoring weights, optimizer, scaler,
EMA, best top-1 and every rank's random number generators. With DETERMINISTIC the resumed run's
weights equal an uninterrupted run's, bit for bit.

A fresh start never destroys an earlier run's results: in a folder that holds them with nothing to
resume from (or with TRAIN.CHECKPOINT naming another run's checkpoint), TRAIN.EARLIER_RESULTS says
whether to refuse (the default), move them into a subfolder, or overwrite them. A lock (`.lock`) keeps a second run out of a folder in use.

Signals: SIGINT, SIGTERM or SIGHUP lets the current optimizer step finish, then every rank stops at that same
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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from ..config import asked_activation, output_dir, save_config
from ..data import (
    ImageFolderDataset,
    build_loader,
    build_mixup,
    check_dataset_folders,
    check_same_classes,
    resolve_dataset_root,
    test_output_size,
    train_batch_per_process,
    train_output_size,
)
from ..data.labels import REAL_LABELS_FILE, RealLabels, read_valid_labels
from ..errors import UserError
from ..files import atomic_write_text
from ..models.cvt import ConvolutionalVisionTransformer, create_model
from ..weights.export import save_official
from ..weights.load import load_checkpoint
from ..weights.read import read_checkpoint
from .distributed import DistEnv, barrier, init_distributed
from .loop import BadFileLog, EpochResult, LoopSettings, TrainModes, build_criterion, evaluate, evaluate_with_ema
from .optim import build_optimizer, build_scheduler, scaled_lr
from .session import LOCK_FILE, StopSignals, TrainingInterrupted, cpu_threads, lock_run_folder, reproducibility, run_logging
from .finetune import freeze_layers, frozen_prefixes, run_steps
from .optim import build_step_scheduler
from .state import (
    CHECKPOINT,
    METRICS,
    MODEL_BEST,
    MODEL_BEST_PREDICT,
    TrainingRun,
    read_training,
    resume_hint,
    results_record,
    restore_rng,
    restore_training,
)

if TYPE_CHECKING:  # TensorBoard loads only when a run writes events (TrainingRun.recording)
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TrainingInterrupted", "build_model", "test", "train"]

log = logging.getLogger("cvt")

FINAL_STATE = "final_state.pth"
TEST_METRICS = "test_metrics.json"


def build_model(cfg: CfgNode) -> ConvolutionalVisionTransformer:
    """The network MODEL.SPEC, MODEL.NUM_CLASSES and MODEL.ACTIVATION describe (QuickGELU for 'auto',
    until weights loaded say otherwise)."""
    return create_model(
        dict(cfg.MODEL.SPEC),
        num_classes=int(cfg.MODEL.NUM_CLASSES),
        act=asked_activation(cfg) or "quick_gelu",
        grad_checkpointing=bool(cfg.TRAIN.GRAD_CHECKPOINTING),
    )


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
    with lock_run_folder(folder) if env.is_main else contextlib.nullcontext() as took_over:
        resume_from = _resume_path(cfg, folder)
        check_dataset_folders(cfg)  # a mistyped DATASET.ROOT must not move the earlier results aside first
        moved = _keep_earlier_results(cfg, folder, resume_from, env.is_main)  # before log.txt opens: it may move
        with run_logging(folder if env.is_main else None, env.is_main), reproducibility(cfg, env.rank), \
                StopSignals() as stop:
            for line in (took_over, moved):
                if line:
                    log.warning("%s", line)
            batch = train_batch_per_process(cfg, env.world_size)
            run = _set_up(cfg, env, folder, resume_from, batch)
            with cpu_threads(int(cfg.CPU_THREADS), run.model, train_output_size(cfg), batch, env.device):
                if resume_from is not None:
                    _resume(run, resume_from)
                if env.is_main:  # after the resume, which may refuse this config: config.yaml is what applies
                    save_config(_with_activation(cfg, run.model.act), folder / "config.yaml")
                if cfg.FINETUNE.FINETUNE:
                    run_steps(run, stop, *_wrap(run.model, cfg, env))
                else:
                    _run_epochs(run, stop)
                return _finish(run)


def _with_activation(cfg: CfgNode, act: str) -> CfgNode:
    """`cfg` with MODEL.ACTIVATION `act`, the activation the model runs once its weights are loaded:
    'auto' resolves to the loaded file's own, which model_best.pth and final_state.pth (plain state
    dicts) do not record, so the run folder's config.yaml must, for `cvt test` and `cvt predict` to run
    the function the model was trained with."""
    resolved = cfg.clone()
    resolved.defrost()
    resolved.MODEL.ACTIVATION = act
    resolved.freeze()
    return resolved


def _keep_earlier_results(cfg: CfgNode, folder: Path, resume_from: Path | None, is_main: bool) -> str | None:
    """A run that does not continue this folder's own checkpoint.pth (a fresh start, or a resume from
    another run's TRAIN.CHECKPOINT) in a folder holding an earlier run's results: refuse, move them
    aside or overwrite them, as TRAIN.EARLIER_RESULTS says; returns the line to log."""
    found = [name for name in (METRICS, MODEL_BEST, FINAL_STATE, CHECKPOINT) if (folder / name).exists()]
    continues_here = resume_from is not None and resume_from.resolve() == (folder / CHECKPOINT).resolve()
    if continues_here or not found:
        return None
    action, listed = cfg.TRAIN.EARLIER_RESULTS, ", ".join(found)
    if action == "overwrite":
        return f"starting afresh over the earlier results in {folder} ({listed}): TRAIN.EARLIER_RESULTS overwrite"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder / f"earlier-{stamp}"
    if action == "refuse":
        why = (f"TRAIN.CHECKPOINT resumes another run's checkpoint ({resume_from})" if resume_from is not None
               else "TRAIN.AUTO_RESUME is off" if cfg.TRAIN.AUTO_RESUME is False else f"there is no {CHECKPOINT} to resume from")
        raise UserError(
            f"{folder} holds an earlier run's results ({listed}) and {why}, so this run would replace them; "
            f"set TRAIN.EARLIER_RESULTS move to keep them (in {aside.name}/ there), TRAIN.EARLIER_RESULTS "
            "overwrite to discard them, or give this run another NAME / OUTPUT_DIR"
        )
    if is_main:
        for n in range(1, 1000):  # two moves within one second get distinct folders
            if not aside.exists():
                break
            aside = folder / f"earlier-{stamp}-{n}"
        aside.mkdir()
        for entry in sorted(folder.iterdir()):
            if entry.name != LOCK_FILE and not entry.name.startswith("earlier-"):
                entry.rename(aside / entry.name)
    return f"moved the earlier run's results in {folder} to {aside}/ (TRAIN.EARLIER_RESULTS move)"


def _set_up(cfg: CfgNode, env: DistEnv, folder: Path, resume_from: Path | None, batch: int) -> TrainingRun:
    """The run folder's config, the data (`batch` images per process and step), and the model with its
    optimizer, schedule, EMA and loss."""
    settings = LoopSettings.from_config(cfg, env.device)
    if env.is_main:
        log.info("run folder %s; %d process(es) on %s", folder, env.world_size, env.device)
    finetune = bool(cfg.FINETUNE.FINETUNE)
    train_loader, train_set = build_loader(cfg, "train", rank=env.rank, world_size=env.world_size, batch_size=batch)
    val_loader, val_set = build_loader(cfg, "test", rank=env.rank, world_size=env.world_size)
    check_same_classes(train_set, val_set)
    classes = list(train_set.classes)
    _check_num_classes(cfg, classes, train_set.split_dir)

    model = _initial_model(cfg, with_pretrained=resume_from is None)
    modes = TrainModes(frozen=(), train_mode=True)
    if finetune:
        modes = TrainModes(tuple(freeze_layers(model, frozen_prefixes(cfg, model))), bool(cfg.FINETUNE.TRAIN_MODE))
    model.to(env.device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format)
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    lr = float(cfg.FINETUNE.BASE_LR) if finetune else scaled_lr(cfg, env.world_size)
    optimizer = build_optimizer(cfg, model, lr, env.device)
    mixup = build_mixup(cfg, len(classes), batch)
    if finetune:
        log.info(
            "fine-tuning %d steps: optimizer %s, lr %.3g (FINETUNE.BASE_LR, global), batch %d = %d per process "
            "x %d processes x %d accumulation steps", cfg.FINETUNE.STEPS, cfg.FINETUNE.OPTIMIZER, lr,
            cfg.FINETUNE.BATCH_SIZE, batch, env.world_size, settings.accum_steps,
        )
    else:
        log.info(
            "optimizer %s, lr %.3g (TRAIN.LR %.3g x %d processes x %d accumulation steps%s), batch %d per step",
            cfg.TRAIN.OPTIMIZER, lr, cfg.TRAIN.LR, env.world_size, settings.accum_steps,
            "" if cfg.TRAIN.SCALE_LR else ", SCALE_LR off: not scaled",
            batch * env.world_size * settings.accum_steps,
        )
    return TrainingRun(
        cfg=cfg, env=env, folder=folder, settings=settings,
        train_loader=train_loader, val_loader=val_loader, classes=classes, first_val_image=val_set.samples[0][0],
        model=model, optimizer=optimizer,
        scheduler=build_step_scheduler(cfg, optimizer) if finetune else build_scheduler(cfg, optimizer),
        scaler=torch.amp.GradScaler(env.device.type, enabled=settings.uses_grad_scaler),
        ema=ModelEmaV3(model, decay=float(cfg.TRAIN.EMA.DECAY)) if cfg.TRAIN.EMA.ENABLED else None,
        mixup=mixup, criterion=build_criterion(cfg, mixup), start_epoch=int(cfg.TRAIN.BEGIN_EPOCH),
        set_train_mode=modes,
    )


def _initial_model(cfg: CfgNode, with_pretrained: bool) -> ConvolutionalVisionTransformer:
    with torch.random.fork_rng(devices=[]):
        # The same initial weights on every rank: DDP would copy rank 0's later anyway, but the EMA
        # copies the model before that.
        torch.default_generator.manual_seed(int(cfg.SEED))  # the CPU generator only: CUDA's stays per rank
        model = build_model(cfg)
    if cfg.MODEL.PRETRAINED and with_pretrained:
        if cfg.MODEL.INIT_WEIGHTS:
            load_pretrained(cfg, model)
        else:  # the release's model builder loads MODEL.PRETRAINED only under MODEL.INIT_WEIGHTS
            log.warning("MODEL.PRETRAINED %s not loaded: MODEL.INIT_WEIGHTS is false", cfg.MODEL.PRETRAINED)
    return model


def _check_num_classes(cfg: CfgNode, classes: list[str], folder: Path) -> None:
    if len(classes) != cfg.MODEL.NUM_CLASSES:
        raise UserError(
            f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but {folder} has {len(classes)} class folders; "
            f"set MODEL.NUM_CLASSES {len(classes)}"
        )


def load_pretrained(cfg: CfgNode, model: ConvolutionalVisionTransformer) -> None:
    """MODEL.PRETRAINED (a file, a folder, a published tag or hf-hub:org/repo) into `model`: the layers
    MODEL.PRETRAINED_LAYERS names ('*' = all), with the head left freshly initialised when the file's
    class count differs (fine-tuning), and the activation MODEL.ACTIVATION chooses."""
    layers = list(cfg.MODEL.PRETRAINED_LAYERS)
    parts = [name for name, _ in model.named_children()]
    unknown = [name for name in layers if name != "*" and name not in parts]
    if unknown:  # the release loads nothing for such a name, silently: a typo would train from scratch
        raise UserError(f"MODEL.PRETRAINED_LAYERS: {unknown[0]!r} names no part of the model; the parts are "
                        f"{', '.join(parts)}, or '*' for all")
    ckpt = read_checkpoint(cfg.MODEL.PRETRAINED)
    new_head = ckpt.num_classes is not None and ckpt.num_classes != model.num_classes
    load_checkpoint(model, ckpt, backbone_only=new_head, layers=None if "*" in layers else layers, act=asked_activation(cfg))
    if not new_head or "*" not in layers:  # load_checkpoint announces the new head itself
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
    if path.exists() and not path.is_file():  # found now, not when the first epoch's save fails
        raise UserError(f"{path} is not a file (a folder?), but the run saves its checkpoint there; move it away")
    return path if cfg.TRAIN.AUTO_RESUME and path.is_file() else None


def _resume(run: TrainingRun, resume_from: Path) -> None:
    """Weights, optimizer, scaler, EMA, best top-1 and this rank's generators from `resume_from`."""
    state = restore_training(
        read_training(resume_from, resume_hint(run.cfg)), run.cfg, run.classes,
        model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler, ema=run.ema,
    )
    run.start_epoch, run.start_step, run.best_top1 = state.epoch, state.step or 0, state.best_top1
    if not restore_rng(state.rng, run.env.rank):
        log.warning("%s holds no generator state for rank %d: continuing with fresh seeds", resume_from, run.env.rank)
    log.info("resumed from %s at %s %d (best top-1 so far %s)", resume_from, *(
        ("step", run.start_step) if state.step is not None else ("epoch", run.start_epoch)),
        "-" if run.best_top1 is None else f"{run.best_top1:.2f}")


def _wrap(model: torch.nn.Module, cfg: CfgNode, env: DistEnv) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model to train, model to evaluate). Training goes through DDP with several processes;
    evaluation uses the bare model because ranks may hold different numbers of test batches."""
    train_model: torch.nn.Module = model
    if env.distributed:
        train_model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.TRAIN.COMPILE:
        # Static shapes: a recompile per new shape (a last partial batch) instead of symbolic sizes,
        # with which inductor (torch 2.14) fails on a training graph whose image size became symbolic
        # (a second run at another size in the same process).
        mode = cfg.TRAIN.COMPILE_MODE
        return torch.compile(train_model, dynamic=False, mode=mode), torch.compile(model, dynamic=False, mode=mode)
    return train_model, model


def _run_epochs(run: TrainingRun, stop: StopSignals) -> None:
    """Epochs start_epoch .. END_EPOCH - 1: train, evaluate when due, record, save; stop on request."""
    if run.start_epoch >= run.end_epoch:
        log.info("all %d epochs (TRAIN.END_EPOCH) are done already; raise TRAIN.END_EPOCH to train on", run.end_epoch)
    run.scheduler.step(run.start_epoch)
    train_model, eval_model = _wrap(run.model, run.cfg, run.env)
    with run.recording(run.start_epoch, key="epoch") as writer:
        for epoch in range(run.start_epoch, run.end_epoch):
            result = _train_epoch(run, train_model, epoch, stop)
            if result.interrupted:
                run.stop_mid_stretch(
                    stop, lambda: run.save(epoch),
                    discarded=f"epoch {epoch} interrupted: its partial progress is discarded (DETERMINISTIC)",
                    saved=f"epoch {epoch} interrupted: saved its progress; a resume redoes epoch {epoch}",
                )
            val, ema_val = _evaluate_epoch(run, eval_model, epoch)
            is_best = run.update_best(val)
            run.scheduler.step(epoch + 1, val["top1"] if val else None)
            _record_epoch(run, epoch, result, val, ema_val, is_best, writer)
            run.save(epoch + 1)
            # After the last epoch only final_state.pth is left to write: finish instead of stopping.
            run.stop_if_requested(stop, epoch + 1 < run.end_epoch,
                                  f"stopped after epoch {epoch}; a resume continues at epoch {epoch + 1}")


def _train_epoch(run: TrainingRun, train_model: torch.nn.Module, epoch: int, stop: StopSignals) -> EpochResult:
    run.train_loader.set_epoch(epoch)  # the epoch's order and worker seeds: resumes see the same data
    return run.train_pass(train_model, stop, epoch=epoch)


def _evaluate_epoch(
    run: TrainingRun, eval_model: torch.nn.Module, epoch: int
) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """(val metrics, EMA val metrics) when this epoch is due for evaluation, else (None, None)."""
    cfg = run.cfg
    due = epoch >= cfg.TRAIN.EVAL_BEGIN_EPOCH and ((epoch + 1) % cfg.TRAIN.EVAL_EVERY == 0 or epoch + 1 == run.end_epoch)
    if not due:
        return None, None
    return evaluate_with_ema(eval_model, run.ema, run.val_loader, run.settings, bad_files=run.bad_val)


def _record_epoch(
    run: TrainingRun, epoch: int, result: EpochResult, val: dict[str, float] | None,
    ema_val: dict[str, float] | None, is_best: bool, writer: SummaryWriter | None,
) -> None:
    """The epoch's log line, metrics.jsonl record, TensorBoard scalars, and model_best.pth."""
    run.last_record = record = results_record({"epoch": epoch}, result, val, ema_val)
    log.info(
        "epoch %d: train loss %.4f, val top-1 %s, top-5 %s, loss %s, %.0f img/s, %.1f s",
        epoch, result.loss, *(f"{val[k]:.2f}" if val else "-" for k in ("top1", "top5")),
        f"{val['loss']:.4f}" if val else "-", result.images_per_sec, result.time_s,
    )
    run.publish(record, is_best, writer, snapshot=f"model_{epoch}.pth")


def _finish(run: TrainingRun) -> dict[str, Any]:
    """final_state.pth, the skipped-file counts, and where everything is."""
    folder = run.folder
    final_path = folder / FINAL_STATE
    if run.env.is_main:
        save_official(run.model, final_path)
    barrier()
    skipped = [report.count_over_ranks() for report in (run.bad_train, run.bad_val)]
    if any(skipped):
        log.warning("unreadable files skipped: %d in training, %d in evaluation", *skipped)
    best_path = folder / MODEL_BEST
    log.info("done: best val top-1 %s", f"{run.best_top1:.2f}%" if run.best_top1 is not None else "n/a")
    log.info("checkpoint: %s", run.checkpoint_path)
    if Path(run.first_val_image).is_file():  # not for datasets held in batch files (CIFAR)
        # Files that carry the class names, activation and transform, so the command needs no --cfg and
        # prints names: the best weights, else (nothing evaluated) the final ones, which checkpoint.pth holds.
        weights = folder / MODEL_BEST_PREDICT if (folder / MODEL_BEST_PREDICT).exists() else run.checkpoint_path
        log.info("try it: cvt predict --weights %s %s", weights, run.first_val_image)
    return {
        "output_dir": str(folder),
        "checkpoint": str(run.checkpoint_path),
        "model_best": str(best_path) if best_path.exists() else None,
        "final_state": str(final_path),
        "best_top1": run.best_top1,
        "metrics": run.last_record,
    }


# --------------------------------------------------------------------------------------------------
# test
# --------------------------------------------------------------------------------------------------


def test(cfg: CfgNode) -> dict[str, Any]:
    """Evaluate TEST.MODEL_FILE (default, as the release: the run folder's model_best.pth; also a
    published tag or hf-hub:org/repo) on DATASET.TEST_SET.

    Prints top-1, top-5 and loss and writes test_metrics.json in the run folder. The numbers are
    the same for any number of processes.
    """
    folder = output_dir(cfg)
    env = init_distributed(float(cfg.DIST_TIMEOUT_S), cfg.DIST_BACKEND)
    with run_logging(folder if env.is_main else None, env.is_main), reproducibility(cfg, env.rank):
        return _test(cfg, env, folder)


def _test_data(
    cfg: CfgNode, env: DistEnv, class_names: list[str] | None
) -> tuple[DataLoader, ImageFolderDataset, list[int] | None, RealLabels | None]:
    """The test loader and dataset, with TEST.VALID_LABELS (the class subset the folder holds) and
    TEST.REAL_LABELS (ImageNet-ReaL labels of its images, the loader's targets then being sample indices)."""
    valid_labels = read_valid_labels(cfg.TEST.VALID_LABELS, cfg.MODEL.NUM_CLASSES) if cfg.TEST.VALID_LABELS else None
    if class_names is not None and valid_labels is not None:
        class_names = [class_names[i] for i in valid_labels]
    # A checkpoint that knows its classes maps its outputs by name; build_loader checks the folders match.
    loader, dataset = build_loader(cfg, "test", rank=env.rank, world_size=env.world_size, class_names=class_names,
                                   index_targets=cfg.TEST.REAL_LABELS)
    if valid_labels is None:
        _check_num_classes(cfg, list(dataset.classes), dataset.split_dir)
    elif len(dataset.classes) != len(valid_labels):
        raise UserError(
            f"TEST.VALID_LABELS names {len(valid_labels)} classes but {dataset.split_dir} has {len(dataset.classes)} "
            "class folders; test on a folder holding exactly those classes, in index order"
        )
    real_labels = None
    if cfg.TEST.REAL_LABELS:
        real_labels = RealLabels.read(resolve_dataset_root(cfg) / REAL_LABELS_FILE, dataset.samples)
    return loader, dataset, valid_labels, real_labels


def _test(cfg: CfgNode, env: DistEnv, folder: Path) -> dict[str, Any]:
    # Unset: the run's best weights, or with TEST.USE_EMA its checkpoint's (the last epoch's) EMA weights.
    model_file = cfg.TEST.MODEL_FILE or folder / (CHECKPOINT if cfg.TEST.USE_EMA else MODEL_BEST)
    if not cfg.TEST.MODEL_FILE and not Path(model_file).exists():
        raise UserError(f"TEST.MODEL_FILE is not set and {model_file} does not exist; set TEST.MODEL_FILE to the weights to test")
    # The dataset's folder before the weights: a published tag may download a gigabyte (or fail offline)
    # only for the test to stop at a mistyped DATASET.ROOT.
    resolve_dataset_root(cfg)
    log.info("testing %s", model_file)
    ckpt = read_checkpoint(model_file, use_ema=cfg.TEST.USE_EMA)
    if ckpt.num_classes is not None and ckpt.num_classes != cfg.MODEL.NUM_CLASSES:
        raise UserError(
            f"{model_file} has a {ckpt.num_classes}-class head but MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}; "
            f"set MODEL.NUM_CLASSES {ckpt.num_classes} (and test on a folder with those classes)"
        )
    # A checkpoint that knows its class folders maps its outputs by name; build_loader checks the folders
    # match. A Hugging Face config's id2label holds display names ('tench, Tinca tinca', not the
    # folder n01440764): those follow the sorted folders by index, as the release tests.
    folder_names = None if ckpt.format == "huggingface" else ckpt.class_names
    loader, dataset, valid_labels, real_labels = _test_data(cfg, env, folder_names)

    model = build_model(cfg)
    load_checkpoint(model, ckpt, act=asked_activation(cfg))
    settings = LoopSettings.from_config(cfg, env.device)
    model.to(env.device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format)
    bad_files = BadFileLog()
    with cpu_threads(int(cfg.CPU_THREADS), model, test_output_size(cfg), int(cfg.TEST.BATCH_SIZE_PER_GPU), env.device):
        start = time.perf_counter()
        metrics = evaluate(model, loader, settings, bad_files=bad_files, valid_labels=valid_labels, real_labels=real_labels)
        elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "model_file": str(model_file),
        "use_ema": bool(cfg.TEST.USE_EMA),
        "split": str(dataset.split_dir),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        **{key: metrics[key] for key in ("real_top1", "real_top5", "real_images") if key in metrics},
        "images": metrics["images"],
        "skipped_files": bad_files.count_over_ranks(),
        "processes": env.world_size,
        "time_s": round(elapsed, 3),
    }
    if env.is_main:
        atomic_write_text(folder / TEST_METRICS, json.dumps(result, indent=2) + "\n")
        log.info(
            "test %s on %s: top-1 %.3f%%, top-5 %.3f%%, loss %.4f (%d images)",
            ckpt.source, dataset.split_dir, result["top1"], result["top5"], result["loss"], result["images"],
        )
        if real_labels is not None:
            log.info("ImageNet-ReaL: top-1 %.3f%%, top-5 %.3f%% (%d images with ReaL labels)",
                     result["real_top1"], result["real_top5"], result["real_images"])
    result["output_dir"] = str(folder)
    return result

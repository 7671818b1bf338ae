"""Experiment configuration: the release's yacs keys (same names, meanings and defaults) plus ours.

`load_config` builds a frozen, validated node from the defaults, an experiment file (with the release's
`BASE` inheritance) and trailing `KEY VALUE` overrides. It is stricter than the release where strictness
catches mistakes (every unknown key is an error, with the nearest valid key suggested; nothing but
TRAIN.OPTIMIZER_ARGS accepts new keys) and more liberal where yacs refuses harmless input (an int where
a float is expected, a list where a tuple is, 'true'/'false' strings for booleans).
"""
from __future__ import annotations

import ast
import codecs
import difflib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode

from .errors import UserError
from .files import atomic_write_text
from .models.spec import ACTIVATIONS, CvtSpec
from .models.zoo import IMAGENET_MEAN, IMAGENET_STD, find_published

__all__ = [
    "asked_activation",
    "config_value",
    "finetune_decay_steps",
    "finetune_warmup_steps",
    "get_defaults",
    "load_config",
    "validate_config",
    "resolve_config_path",
    "list_experiments",
    "output_dir",
    "save_config",
    "config_from_settings",
    "config_from_yaml_text",
    "settings_from_yaml_text",
    "settings_as_opts",
    "spec_from_config",
]

COMMAND_LINE = "the command line"

log = logging.getLogger(__name__)

# The one home of every name list and limit a key accepts: validation below and the code that acts on
# the key both read them from here.
MEMORY_FORMATS = ("nchw", "nhwc")
AMP_DTYPES = ("auto", "bfloat16", "float16")
DIST_BACKENDS = ("nccl", "gloo")  # for CUDA; CPU processes always use gloo
OPTIMIZERS = ("sgd", "adam", "adamw")  # compared case-insensitively: the release writes 'adamW'
SAMPLERS = ("default", "repeated_aug")
# MODEL.ACTIVATION: "auto" defers to the weights loaded (cvt.weights.load.choose_activation).
ACTIVATION_CHOICES = ("auto", *ACTIVATIONS)
NONFINITE_LOSS_ACTIONS = ("stop", "skip")
# torch.compile's modes: 'reduce-overhead' and 'max-autotune' replay CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
BAD_FILE_POLICIES = ("skip", "stop")
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup modes
LOSSES = ("softmax",)  # the release's only loss
LR_SCHEDULER_METHODS = ("timm",)
# TRAIN.LR_SCHEDULER.ARGS.sched: timm's schedules that the ARGS keys fully drive ('multistep' would decay
# at milestones no key sets; 'none' leaves nothing to step).
TRAIN_LR_SCHEDULES = ("cosine", "tanh", "step", "plateau", "poly")
# FINETUNE.LR_SCHEDULER.DECAY_TYPE: BiT's staircase ('step'), ViT's 'cosine' and 'linear'.
FINETUNE_DECAY_TYPES = ("step", "cosine", "linear")
# FINETUNE.LR_SCHEDULER.DECAY_STEPS left empty: boundaries at these fractions of FINETUNE.STEPS, BiT's
# 3000/6000/9000 of 10,000 steps.
FINETUNE_DECAY_FRACTIONS = (0.3, 0.6, 0.9)
# DATASET.DATASET names read in their published on-disk formats (cvt.data.downstream); any other name
# is a folder dataset, ROOT/<split>/<class>/<image>.
DOWNSTREAM_DATASETS = ("cifar10", "cifar100", "pets", "flowers102")
EARLIER_RESULTS_ACTIONS = ("refuse", "move", "overwrite")
# Experiment files nest a few levels; these limits stop a crafted file (5,000 levels, an alias bomb)
# long before it costs a RecursionError or gigabytes.
MAX_YAML_DEPTH = 100
MAX_YAML_NODES = 100_000  # after expanding aliases
# PIL's integer resampling codes, as the release's config stores interpolation, and their names.
PIL_INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# AUG.TIMM_AUG.INTERPOLATION: timm's names ('random': bilinear or bicubic, drawn per image).
TIMM_INTERPOLATIONS = (*PIL_INTERPOLATIONS.values(), "random")
# AUG.TIMM_AUG.AUTO_AUGMENT: the policies timm's create_transform knows, the first '-' section of the value
# ('rand-m9-mstd0.5-inc1' is RandAugment); empty: none.
AUTO_AUGMENT_POLICIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")
# AUG.TIMM_AUG.RE_MODE: what random erasing fills with (timm): zeros, a random colour, per-pixel noise.
RANDOM_ERASING_MODES = ("const", "rand", "pixel")
# Keys holding a file or folder path: a leading '~' is expanded when the config is loaded.
PATH_KEYS = ("OUTPUT_DIR", "DATASET.ROOT", "DATASET.CLASS_MAP", "MODEL.PRETRAINED", "TEST.MODEL_FILE",
             "TEST.VALID_LABELS", "TRAIN.CHECKPOINT")
# PIL's own default limit: about 89 megapixels, far above any training image.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Keys accepted so that the release's files load, but without effect here, with why. A value other than
# the default logs one warning naming the key. A key that gains a meaning leaves this table.
_NOT_READ_BY_THE_RELEASE = "the release does not read it either"
_TSV = "the release's TSV data format is unpublished; this project reads image folders"
KEYS_WITHOUT_EFFECT: dict[str, str] = {
    "DATA_DIR": _NOT_READ_BY_THE_RELEASE,
    "GPUS": "the processes come from torchrun (run.sh -g)",
    "MULTIPROCESSING_DISTRIBUTED": "the processes come from torchrun (run.sh -g)",
    "LOG_DIR": "the log is written to the run folder",
    "RANK": "the rank comes from torchrun (the release overwrites it too)",
    "VERBOSE": "it only made the release log every initialised tensor",
    "MODEL_SUMMARY": "`cvt info` reports parameters and multiply-adds",
    "MODEL.NAME": "the one model built is CvT ('cls_cvt')",
    "DATASET.DATA_FORMAT": _TSV,
    "DATASET.LABELMAP": _TSV,
    "DATASET.TRAIN_TSV_LIST": _TSV,
    "DATASET.TEST_TSV_LIST": _TSV,
    "DATASET.TARGET_SIZE": _NOT_READ_BY_THE_RELEASE,
    "AUG.DROPBLOCK_LAYERS": _NOT_READ_BY_THE_RELEASE,
    "AUG.DROPBLOCK_KEEP_PROB": _NOT_READ_BY_THE_RELEASE,
    "AUG.DROPBLOCK_BLOCK_SIZE": _NOT_READ_BY_THE_RELEASE,
    "AUG.MIXCUT_AND_MIXUP": _NOT_READ_BY_THE_RELEASE,
    "AUG.TIMM_AUG.RE_SPLIT": "the release passes it to timm without augmentation splits, where it changes nothing",
    "TRAIN.LR_SCHEDULER.ARGS.cooldown_epochs": "the run ends at TRAIN.END_EPOCH: timm only adds it to the epoch "
                                               "count it suggests, which the release ignores too",
    "TRAIN.GAMMA1": _NOT_READ_BY_THE_RELEASE,
    "TRAIN.GAMMA2": _NOT_READ_BY_THE_RELEASE,
    "DEBUG.DEBUG": _NOT_READ_BY_THE_RELEASE,
}


def get_defaults() -> CfgNode:
    """A fresh, unfrozen node holding every key with its default value."""
    cfg = CfgNode()

    # ---- the release's top-level keys ----
    cfg.BASE = [""]  # experiment files merged before this one, relative to this file's folder
    cfg.NAME = ""  # experiment name; load_config sets it to the file's stem when a file leaves it empty
    cfg.DATA_DIR = ""
    cfg.DIST_BACKEND = "nccl"
    cfg.GPUS = (0,)
    cfg.MULTIPROCESSING_DISTRIBUTED = True
    cfg.OUTPUT_DIR = ""
    cfg.LOG_DIR = ""
    cfg.WORKERS = 4
    cfg.PRINT_FREQ = 20
    cfg.VERBOSE = True
    cfg.PIN_MEMORY = True
    cfg.RANK = 0
    cfg.MODEL_SUMMARY = False
    # ---- ours ----
    # Seed of every random number generator (Python, NumPy, torch, the data loader workers).
    cfg.SEED = 0
    # Seeded, deterministic algorithms only: a resumed run then equals an uninterrupted one, bit for bit,
    # at some cost in speed.
    cfg.DETERMINISTIC = False
    # Timeout of distributed collectives in seconds, so a dead rank ends the run with an error instead
    # of leaving the others waiting forever.
    cfg.DIST_TIMEOUT_S = 600
    # Write TensorBoard event files beside the logs.
    cfg.TENSORBOARD = True
    # Intra-op threads of a training or test process on the CPU; 0 chooses: 1 for models as small as
    # the digits demo, else the cores this process may use (benchmarks/RESULTS.md, "CPU threads under
    # competition"). DataLoader workers always compute with 1 (torch sets it).
    cfg.CPU_THREADS = 0

    # The release's fine-tuning keys (its code was never published). FINETUNE.FINETUNE true trains by
    # optimizer steps with the protocol below (ViT's fine-tuning, BiT's schedule; docs/CONFIG.md)
    # instead of by epochs with the TRAIN keys.
    cfg.FINETUNE = CfgNode()
    cfg.FINETUNE.FINETUNE = False
    cfg.FINETUNE.USE_TRAIN_AUG = False
    cfg.FINETUNE.BASE_LR = 0.003  # the global rate: never scaled by processes or accumulation
    cfg.FINETUNE.BATCH_SIZE = 512  # the global batch, split over processes and TRAIN.ACCUM_STEPS
    cfg.FINETUNE.EVAL_EVERY = 3000  # optimizer steps between evaluations; the last step is evaluated
    # True: the trainable parts run in train mode (dropout, drop path, BatchNorm batch statistics);
    # False: the whole network runs in eval mode while it trains. Frozen parts are always in eval mode.
    cfg.FINETUNE.TRAIN_MODE = True
    # Module name prefixes ('stage0', 'stage1.blocks.0') whose parameters and BatchNorm statistics stay
    # as loaded.
    cfg.FINETUNE.FROZEN_LAYERS = []
    cfg.FINETUNE.LR_SCHEDULER = CfgNode()
    cfg.FINETUNE.LR_SCHEDULER.DECAY_TYPE = "step"
    # ---- ours ----
    # 'step' divides the rate by 1/DECAY_RATE after each of DECAY_STEPS optimizer steps; empty (the
    # default): at 30%, 60% and 90% of FINETUNE.STEPS, BiT's proportions (3000/6000/9000 of 10,000).
    # 'cosine' and 'linear' decay to 0 at FINETUNE.STEPS.
    cfg.FINETUNE.LR_SCHEDULER.DECAY_STEPS = []
    cfg.FINETUNE.LR_SCHEDULER.DECAY_RATE = 0.1
    cfg.FINETUNE.STEPS = 10000  # optimizer steps of the whole run
    # Linear warmup from 0 over the first steps; -1: 5% of FINETUNE.STEPS (ViT's 500 of 10,000).
    cfg.FINETUNE.WARMUP_STEPS = -1
    cfg.FINETUNE.OPTIMIZER = "sgd"  # one of OPTIMIZERS; SGD with momentum as ViT fine-tunes
    cfg.FINETUNE.MOMENTUM = 0.9  # SGD's momentum (plain, not Nesterov, as ViT)
    cfg.FINETUNE.WD = 0.0  # ViT fine-tunes without weight decay
    cfg.FINETUNE.CLIP_GRAD_NORM = 1.0  # global gradient norm clip, as ViT; 0 turns it off
    # Linear probing: everything but the head frozen (and in eval mode).
    cfg.FINETUNE.LINEAR_PROBE = False
    # Layer-wise rate decay: a layer k steps before the head trains at BASE_LR x LAYER_DECAY**k
    # (1.0: off). The layers, input to output: each stage's patch embedding (with its cls token) and
    # each of its blocks; the final norm and the head are step 0.
    cfg.FINETUNE.LAYER_DECAY = 1.0

    cfg.AMP = CfgNode()
    cfg.AMP.ENABLED = False
    cfg.AMP.MEMORY_FORMAT = "nchw"
    # Ours: the autocast dtype. 'auto' is the release's float16 with a gradient scaler on CUDA, and
    # bfloat16 on the CPU; 'bfloat16' has float32's range and needs no scaler.
    cfg.AMP.DTYPE = "auto"

    cfg.CUDNN = CfgNode()
    cfg.CUDNN.BENCHMARK = True
    cfg.CUDNN.DETERMINISTIC = False
    cfg.CUDNN.ENABLED = True

    cfg.MODEL = CfgNode()
    cfg.MODEL.NAME = "cls_cvt"
    cfg.MODEL.INIT_WEIGHTS = True
    cfg.MODEL.PRETRAINED = ""
    cfg.MODEL.PRETRAINED_LAYERS = ["*"]
    cfg.MODEL.NUM_CLASSES = 1000
    # Every architecture key explicitly, so a misspelt one is caught; the defaults are CvT-13.
    cfg.MODEL.SPEC = CfgNode(CvtSpec().to_dict())
    # Ours: the MLP activation. 'auto': the one the weights loaded (MODEL.PRETRAINED, TEST.MODEL_FILE, a
    # resumed checkpoint) were trained with, QuickGELU without weights; 'quick_gelu' as the release
    # trained its checkpoints; 'gelu' as transformers trains (docs/CONFIG.md, "Activation").
    cfg.MODEL.ACTIVATION = "auto"

    cfg.LOSS = CfgNode()
    cfg.LOSS.LABEL_SMOOTHING = 0.0
    cfg.LOSS.LOSS = "softmax"

    cfg.DATASET = CfgNode()
    cfg.DATASET.ROOT = ""
    cfg.DATASET.DATASET = "imagenet"
    cfg.DATASET.TRAIN_SET = "train"
    cfg.DATASET.TEST_SET = "val"
    cfg.DATASET.DATA_FORMAT = "jpg"
    cfg.DATASET.LABELMAP = ""
    cfg.DATASET.TRAIN_TSV_LIST = []
    cfg.DATASET.TEST_TSV_LIST = []
    cfg.DATASET.SAMPLER = "default"
    # Ours: a class map (timm's convention: a text file, one class folder name a line, line number =
    # class index) instead of sorted folder names, for train and test; relative paths may be in ROOT.
    cfg.DATASET.CLASS_MAP = ""
    cfg.DATASET.TARGET_SIZE = -1
    # Ours: what to do with an unreadable or corrupt image: 'skip' it (counted and logged) or 'stop'.
    cfg.DATASET.BAD_FILES = "skip"
    # Ours: images with more pixels are refused as decompression bombs (PIL's own default limit).
    cfg.DATASET.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS

    cfg.INPUT = CfgNode()
    cfg.INPUT.MEAN = list(IMAGENET_MEAN)
    cfg.INPUT.STD = list(IMAGENET_STD)

    cfg.AUG = CfgNode()
    cfg.AUG.SCALE = (0.08, 1.0)
    cfg.AUG.RATIO = (3.0 / 4.0, 4.0 / 3.0)
    cfg.AUG.COLOR_JITTER = [0.4, 0.4, 0.4, 0.1, 0.0]
    cfg.AUG.GRAY_SCALE = 0.0
    cfg.AUG.GAUSSIAN_BLUR = 0.0
    cfg.AUG.DROPBLOCK_LAYERS = [3, 4]
    cfg.AUG.DROPBLOCK_KEEP_PROB = 1.0
    cfg.AUG.DROPBLOCK_BLOCK_SIZE = 7
    cfg.AUG.MIXUP_PROB = 0.0
    cfg.AUG.MIXUP = 0.0
    cfg.AUG.MIXCUT = 0.0
    cfg.AUG.MIXCUT_MINMAX = []
    cfg.AUG.MIXUP_SWITCH_PROB = 0.5
    cfg.AUG.MIXUP_MODE = "batch"
    cfg.AUG.MIXCUT_AND_MIXUP = False
    cfg.AUG.INTERPOLATION = 2
    cfg.AUG.TIMM_AUG = CfgNode()
    cfg.AUG.TIMM_AUG.USE_LOADER = False
    cfg.AUG.TIMM_AUG.USE_TRANSFORM = False
    cfg.AUG.TIMM_AUG.RE_COUNT = 1
    cfg.AUG.TIMM_AUG.RE_MODE = "pixel"
    cfg.AUG.TIMM_AUG.RE_SPLIT = False
    cfg.AUG.TIMM_AUG.RE_PROB = 0.0
    cfg.AUG.TIMM_AUG.AUTO_AUGMENT = ""
    cfg.AUG.TIMM_AUG.HFLIP = 0.5
    cfg.AUG.TIMM_AUG.VFLIP = 0.0
    cfg.AUG.TIMM_AUG.COLOR_JITTER = 0.4
    cfg.AUG.TIMM_AUG.INTERPOLATION = "bicubic"

    cfg.TRAIN = CfgNode()
    cfg.TRAIN.AUTO_RESUME = True
    # Ours: a fresh start in a run folder that holds an earlier run's results (metrics.jsonl,
    # model_best.pth, final_state.pth) but nothing to resume: 'refuse' (one line), 'move' them into
    # a subfolder earlier-<date-time>/, or 'overwrite' them.
    cfg.TRAIN.EARLIER_RESULTS = "refuse"
    cfg.TRAIN.CHECKPOINT = ""
    cfg.TRAIN.LR_SCHEDULER = CfgNode()
    cfg.TRAIN.LR_SCHEDULER.METHOD = "timm"
    # timm's scheduler arguments, lower-case as timm names them, each explicit so a typo is caught.
    cfg.TRAIN.LR_SCHEDULER.ARGS = CfgNode()
    cfg.TRAIN.LR_SCHEDULER.ARGS.sched = "cosine"
    cfg.TRAIN.LR_SCHEDULER.ARGS.warmup_epochs = 5
    cfg.TRAIN.LR_SCHEDULER.ARGS.warmup_lr = 1e-6
    cfg.TRAIN.LR_SCHEDULER.ARGS.min_lr = 1e-5
    cfg.TRAIN.LR_SCHEDULER.ARGS.cooldown_epochs = 10
    cfg.TRAIN.LR_SCHEDULER.ARGS.decay_rate = 0.1
    cfg.TRAIN.LR_SCHEDULER.ARGS.decay_epochs = 30
    cfg.TRAIN.LR_SCHEDULER.ARGS.patience_epochs = 10
    # Ours: timm's learning-rate noise (shaped by noise_pct and noise_std) from [start] or [start, end],
    # fractions of the run; [] none. Seeded with SEED.
    cfg.TRAIN.LR_SCHEDULER.ARGS.noise = []
    cfg.TRAIN.LR_SCHEDULER.ARGS.noise_pct = 0.67
    cfg.TRAIN.LR_SCHEDULER.ARGS.noise_std = 1.0
    cfg.TRAIN.LR_SCHEDULER.ARGS.lr_cycle_mul = 1.0
    cfg.TRAIN.LR_SCHEDULER.ARGS.lr_cycle_limit = 1
    cfg.TRAIN.SCALE_LR = True
    cfg.TRAIN.LR = 0.001
    cfg.TRAIN.OPTIMIZER = "sgd"
    # Free keyword arguments for the optimizer (e.g. betas, eps): the one node that accepts new keys.
    cfg.TRAIN.OPTIMIZER_ARGS = CfgNode(new_allowed=True)
    cfg.TRAIN.MOMENTUM = 0.9
    cfg.TRAIN.WD = 0.0001
    cfg.TRAIN.WITHOUT_WD_LIST = []
    cfg.TRAIN.NESTEROV = True
    cfg.TRAIN.GAMMA1 = 0.99
    cfg.TRAIN.GAMMA2 = 0.0
    cfg.TRAIN.BEGIN_EPOCH = 0
    cfg.TRAIN.END_EPOCH = 100
    cfg.TRAIN.IMAGE_SIZE = [224, 224]
    cfg.TRAIN.BATCH_SIZE_PER_GPU = 32
    cfg.TRAIN.SHUFFLE = True
    cfg.TRAIN.EVAL_BEGIN_EPOCH = 0
    cfg.TRAIN.DETECT_ANOMALY = False
    cfg.TRAIN.CLIP_GRAD_NORM = 0.0
    cfg.TRAIN.SAVE_ALL_MODELS = False
    # ---- ours ----
    # Gradient accumulation: optimizer steps every ACCUM_STEPS batches. The effective batch is
    # BATCH_SIZE_PER_GPU x processes x ACCUM_STEPS, and SCALE_LR multiplies LR by processes x ACCUM_STEPS.
    cfg.TRAIN.ACCUM_STEPS = 1
    # An exponential moving average of the weights, evaluated and saved beside the raw model.
    cfg.TRAIN.EMA = CfgNode()
    cfg.TRAIN.EMA.ENABLED = False
    cfg.TRAIN.EMA.DECAY = 0.9998
    # A NaN or infinite loss: 'stop' the run with an error, or 'skip' that step (counted and logged).
    cfg.TRAIN.NONFINITE_LOSS = "stop"
    # Recompute activations in the backward pass: less memory, about a third more compute.
    cfg.TRAIN.GRAD_CHECKPOINTING = False
    # Run the model through torch.compile, in this torch.compile mode.
    cfg.TRAIN.COMPILE = False
    cfg.TRAIN.COMPILE_MODE = "default"
    # Epochs between evaluations on the test set; the last epoch is always evaluated.
    cfg.TRAIN.EVAL_EVERY = 1

    cfg.TEST = CfgNode()
    cfg.TEST.BATCH_SIZE_PER_GPU = 32
    cfg.TEST.CENTER_CROP = True
    cfg.TEST.IMAGE_SIZE = [224, 224]
    cfg.TEST.INTERPOLATION = 2
    cfg.TEST.MODEL_FILE = ""
    cfg.TEST.REAL_LABELS = False
    cfg.TEST.VALID_LABELS = ""
    # Ours: evaluate (`cvt test` and during training) under autocast in AMP.DTYPE. Off: float32, as
    # the release tests, whatever AMP.ENABLED says.
    cfg.TEST.AMP = False
    # Ours: test the EMA weights a run's checkpoint.pth holds (TEST.MODEL_FILE; TRAIN.EMA.ENABLED), not its model's.
    cfg.TEST.USE_EMA = False

    cfg.DEBUG = CfgNode()
    cfg.DEBUG.DEBUG = False
    return cfg


# --------------------------------------------------------------------------------------------------
# Finding experiment files
# --------------------------------------------------------------------------------------------------


def list_experiments() -> dict[str, Path]:
    """The packaged experiment files by stem (the bare names `load_config` accepts), sorted."""
    found: dict[str, Path] = {}

    def walk(folder: Any) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir():
                walk(entry)
            elif entry.name.endswith(".yaml"):
                found.setdefault(entry.name[: -len(".yaml")], Path(str(entry)))

    walk(resources.files("cvt") / "experiments")
    return dict(sorted(found.items()))


def shared_bases() -> list[str]:
    """Packaged files that hold only keys shared by experiments (no MODEL section), such as the transfer
    protocol: material for other files' BASE, not experiments on their own."""
    return [
        stem for stem, path in list_experiments().items()
        if "MODEL" not in (yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    ]


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """An existing file wins; otherwise a packaged experiment's bare name, with or without `.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    experiments = list_experiments()
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    if len(path.parts) == 1 and stem in experiments:
        return experiments[stem]
    if path.is_dir():
        raise UserError(
            f"config file {str(name_or_path)!r} is a folder; give the path of a YAML file in it, or a packaged "
            "experiment name (`cvt list`)"
        )
    raise UserError(
        f"config file {str(name_or_path)!r} not found; give the path of a YAML file or a packaged "
        f"experiment name: {', '.join(experiments) or '(none packaged)'}"
    )


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def _dotted_keys(node: CfgNode, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, CfgNode):
            keys.extend(_dotted_keys(value, prefix + key + "."))
    return keys


def _unknown_key(full_key: str, source: str, root: CfgNode) -> UserError:
    candidates = _dotted_keys(root)
    by_lower = {key.lower(): key for key in candidates}
    # Case-insensitive first: 'train.lr' should point at 'TRAIN.LR' even though difflib sees no overlap.
    match = by_lower.get(full_key.lower())
    if match is None:
        close = difflib.get_close_matches(full_key.lower(), list(by_lower), n=1)
        match = by_lower[close[0]] if close else None
    hint = f"did you mean {match!r}?" if match else "see docs/CONFIG.md for the valid keys"
    return UserError(f"unknown config key {full_key!r} (from {source}); {hint}")


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
_PLURAL_TYPE_NAMES = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wrong_type(full_key: str, source: str, expected: str, value: Any) -> UserError:
    return UserError(f"config key {full_key!r} (from {source}) expects {expected}, got {value!r}; fix the value")


def _coerce_scalar(value: Any, kind: type) -> Any:
    """`value` as `kind`, or raise ValueError. Lenient only where no meaning can be lost."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
    elif kind is float:
        if is_number(value):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads '1e-5' (no dot) as a string; accept it as the number it plainly is.
            return float(value.strip())
    elif kind is str:
        if isinstance(value, str):
            return value
        if value is None:  # `KEY:` with nothing after it in YAML
            return ""
        if is_number(value):
            return str(value)
    raise ValueError(value)


def _coerce(value: Any, default: Any, full_key: str, source: str) -> Any:
    """`value` converted to the type of `default` (element-wise for lists), or a one-line UserError."""
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(full_key, source, "a list", value)
        kinds = {type(item) for item in default}
        items = list(value)
        if len(kinds) == 1:  # a typed list, e.g. IMAGE_SIZE of ints; empty defaults take anything
            kind = kinds.pop()
            try:
                items = [_coerce_scalar(item, kind) for item in items]
            except ValueError:
                raise _wrong_type(full_key, source, f"a list of {_PLURAL_TYPE_NAMES[kind]}", value) from None
        return type(default)(items)
    if isinstance(value, (list, tuple)):
        raise _wrong_type(full_key, source, _TYPE_NAMES[type(default)], value)
    try:
        return _coerce_scalar(value, type(default))
    except ValueError:
        raise _wrong_type(full_key, source, _TYPE_NAMES[type(default)], value) from None


def _free_value(value: Any, full_key: str, source: str) -> Any:
    """A value for a node that accepts new keys (TRAIN.OPTIMIZER_ARGS), kept as given.

    Tuples become lists, so a value set on the command line equals the same value read back from YAML.
    """
    if isinstance(value, Mapping):
        return CfgNode({str(k): _free_value(v, f"{full_key}.{k}", source) for k, v in value.items()}, new_allowed=True)
    if isinstance(value, (list, tuple)):
        return [_free_value(item, full_key, source) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _wrong_type(full_key, source, "a number, string, boolean or list", value)


def _merge(node: CfgNode, data: Mapping[Any, Any], source: str, root: CfgNode, prefix: str = "") -> None:
    for raw_key, value in data.items():
        key = str(raw_key)
        full_key = prefix + key
        if node.is_new_allowed():
            node[key] = _free_value(value, full_key, source)
            continue
        if key not in node:
            # Name the whole key the user wrote ('train.lr', not 'train') while the path is unambiguous.
            while isinstance(value, Mapping) and len(value) == 1:
                (nested, value), = value.items()
                full_key += f".{nested}"
            raise _unknown_key(full_key, source, root)
        current = node[key]
        if isinstance(current, CfgNode):
            if value is None:  # an empty section in YAML changes nothing
                continue
            if not isinstance(value, Mapping):
                raise _wrong_type(full_key, source, "a section of keys", value)
            _merge(current, value, source, root, full_key + ".")
        elif isinstance(value, Mapping):
            # Keys nested under a value: the first of them is the unknown key.
            nested = next(iter(value), "")
            raise _unknown_key(f"{full_key}.{nested}", source, root)
        else:
            node[key] = _coerce(value, current, full_key, source)


class _YamlLimitError(Exception):
    """A config file `_ConfigLoader` refuses; the message says why."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (YAML says a mapping's keys are unique; PyYAML
    silently keeps the last), nesting deeper than MAX_YAML_DEPTH, and aliases that expand to more
    than MAX_YAML_NODES nodes or refer to themselves."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _YamlLimitError(f"nested more than {MAX_YAML_DEPTH} levels deep (at line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in first_line:
                raise _YamlLimitError(f"duplicate key {key_node.value!r} at lines {first_line[key_node.value]} and {line}")
            first_line[key_node.value] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes `node` becomes once its aliases are copied out (memoised: linear time)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _YamlLimitError(f"an alias refers to itself (at line {node.start_mark.line + 1})")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    if size > MAX_YAML_NODES:
        raise _YamlLimitError(f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
    sizes[key] = size
    return size


def _decode_config(raw: bytes, source: str) -> str:
    """UTF-8 text, or a one-line error naming the encoding the file has instead."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"config file {source} is UTF-16 encoded (PowerShell's default); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"config file {source} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}; "
            "a binary file?); give a YAML file saved as UTF-8"
        ) from None
    if "\x00" in text:
        raise UserError(f"config file {source} holds NUL bytes (UTF-16 without a byte order mark, or a binary file); save it as UTF-8")
    return text


def _safe_yaml(text: str) -> Any:
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_line(error: Exception) -> str:
    """' at line N' where a YAML error knows its line, else ''."""
    mark = getattr(error, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark is not None else ""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read config file {str(path)!r}: {e.strerror}; check the path") from None
    text = _decode_config(raw, repr(str(path)))
    try:
        data = _safe_yaml(text)
    except _YamlLimitError as e:
        raise UserError(f"config file {str(path)!r}: {e}; fix the file") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"YAML syntax error in {str(path)!r}{_yaml_line(e)}: {problem}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of keys at the top, not {type(data).__name__}")
    return data


def _base_path(entry: str, including: Path) -> Path:
    """A BASE entry: a path relative to the including file's folder, else a packaged experiment's name."""
    candidate = including.parent / entry
    if candidate.is_file():
        return candidate
    stem = entry[: -len(".yaml")] if entry.endswith(".yaml") else entry
    packaged = list_experiments()
    if os.sep not in entry and "/" not in entry and stem in packaged:
        return packaged[stem]
    raise UserError(
        f"BASE file {entry!r} named in {str(including)!r} not found at {str(candidate)!r}; "
        "BASE paths are relative to the including file's folder"
    )


def _merge_file(cfg: CfgNode, path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Merge `path` into `cfg`, its BASE files first (recursively, as the release does); returns its data."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise UserError(f"BASE cycle: {cycle}; remove one of these BASE entries")
    data = _read_yaml(path)
    bases = data.pop("BASE", [""])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) or b is None for b in bases):
        raise _wrong_type("BASE", str(path), "a list of file paths", bases)
    for entry in bases:
        if entry:
            _merge_file(cfg, _base_path(entry, path), (*chain, path))
    _merge(cfg, data, str(path), cfg)
    return data


def _parse_overrides(opts: Sequence[str]) -> dict[str, Any]:
    """`KEY VALUE` pairs as a nested mapping; values decoded as yacs does (literal_eval, else the string)."""
    if len(opts) % 2:
        raise UserError(
            f"config overrides must be KEY VALUE pairs, got an odd number of tokens ({len(opts)}, the last "
            f"being {str(opts[-1])!r}); give a value after every key"
        )
    nested: dict[str, Any] = {}
    for key, raw in zip(opts[0::2], opts[1::2]):
        try:
            value = ast.literal_eval(raw) if isinstance(raw, str) else raw
        except (ValueError, SyntaxError):
            value = raw
        if key == "BASE":
            # Base files are merged before the file naming them, and the command line comes after all
            # files, so only an empty BASE (as a saved config replayed as overrides carries) makes sense.
            entries = value if isinstance(value, (list, tuple)) else [value]
            if any(entries):
                raise UserError("BASE cannot be set on the command line; put it in an experiment file")
            continue
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # 'A 1 A.B 2': the later key wins
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return nested


def load_config(cfg_file: str | os.PathLike | None, opts: Sequence[str] = (), *, warn: bool = True) -> CfgNode:
    """Defaults, then the experiment file (a path or a packaged name), then overrides; validated, frozen.

    With `warn`, each key of KEYS_WITHOUT_EFFECT set to a value other than its default logs a warning.
    """
    cfg = get_defaults()
    if cfg_file is not None:
        path = resolve_config_path(cfg_file)
        data = _merge_file(cfg, path)
        # The name comes from the file itself, never from a BASE file, so two experiments sharing a
        # base do not share a run folder.
        if not data.get("NAME"):
            cfg.NAME = path.stem
    _merge(cfg, _parse_overrides(opts), COMMAND_LINE, cfg)
    # Everything named by BASE is merged in now; the result stands alone, so a saved copy reloads
    # without the base files.
    cfg.BASE = [""]
    _expand_home(cfg)
    validate_config(cfg)
    if warn:
        _warn_keys_without_effect(cfg)
    cfg.freeze()
    return cfg


def _expand_home(cfg: CfgNode) -> None:
    """A leading '~' in PATH_KEYS means the home folder, as a shell would read it; no shell sees a value
    given in a file or quoted on the command line."""
    for dotted in PATH_KEYS:
        parent, _, leaf = dotted.rpartition(".")
        node = config_value(cfg, parent) if parent else cfg
        node[leaf] = os.path.expanduser(node[leaf])


def config_value(node: CfgNode, dotted: str) -> Any:
    """The value of a dotted key ('TEST.IMAGE_SIZE'), lists and tuples as plain lists."""
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


def _warn_keys_without_effect(cfg: CfgNode) -> None:
    defaults = get_defaults()
    for key, why in KEYS_WITHOUT_EFFECT.items():
        value = config_value(cfg, key)
        if value != config_value(defaults, key):
            log.warning("config key %s is %r but has no effect in this project: %s", key, value, why)


def load_test_config(cfg_file: str | os.PathLike | None, opts: Sequence[str] = (), model: str | None = None) -> CfgNode:
    """The config `cvt test` runs: with `model` (a published tag, hf-hub:org/repo, a file) as
    TEST.MODEL_FILE; a tag's packaged experiment (architecture, test transform) when no file is given."""
    if model is None:
        if not cfg_file:
            raise UserError("cvt test needs --cfg (the experiment file that defines the data and model), or --model TAG")
        return load_config(cfg_file, opts)
    if not cfg_file:
        published = find_published(model)
        if published is None:
            raise UserError(f"--model {model}: give --cfg (the experiment that defines its architecture); only the published tags have their own")
        cfg_file = published.experiment
    return load_config(cfg_file, [*opts, "TEST.MODEL_FILE", model])


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is invalid: it must be {requirement}")


def _require_choice(key: str, value: str, choices: Sequence[str], *, ignore_case: bool = False) -> None:
    given = value.lower() if ignore_case else value
    _require(given in choices, key, value, "one of " + ", ".join(repr(c) for c in choices))


def validate_config(cfg: CfgNode) -> None:
    """Refuse values no run could use, with one line naming the key; called by `load_config`."""
    _validate_finite(cfg)
    _validate_numbers(cfg)
    _validate_choices(cfg)
    _validate_model_and_sizes(cfg)


def _validate_finite(node: CfgNode, prefix: str = "") -> None:
    """No key takes inf or NaN (`1e400` reads as inf): they would fail only at the first step."""
    for key, value in node.items():
        if isinstance(value, CfgNode):
            _validate_finite(value, f"{prefix}{key}.")
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in items):
            _require(False, prefix + key, value, "a finite number")


def _validate_numbers(cfg: CfgNode) -> None:
    train, test, aug = cfg.TRAIN, cfg.TEST, cfg.AUG
    _require(train.LR > 0, "TRAIN.LR", train.LR, "positive")
    for key, value in (
        ("TRAIN.BATCH_SIZE_PER_GPU", train.BATCH_SIZE_PER_GPU),
        ("TEST.BATCH_SIZE_PER_GPU", test.BATCH_SIZE_PER_GPU),
        ("FINETUNE.BATCH_SIZE", cfg.FINETUNE.BATCH_SIZE),
        ("FINETUNE.EVAL_EVERY", cfg.FINETUNE.EVAL_EVERY),
        ("FINETUNE.STEPS", cfg.FINETUNE.STEPS),
        ("TRAIN.ACCUM_STEPS", train.ACCUM_STEPS),
        ("TRAIN.EVAL_EVERY", train.EVAL_EVERY),
        ("MODEL.NUM_CLASSES", cfg.MODEL.NUM_CLASSES),
        ("PRINT_FREQ", cfg.PRINT_FREQ),
        ("DIST_TIMEOUT_S", cfg.DIST_TIMEOUT_S),
        ("DATASET.MAX_IMAGE_PIXELS", cfg.DATASET.MAX_IMAGE_PIXELS),
    ):
        _require(value >= 1, key, value, ">= 1")
    _require(cfg.WORKERS >= 0, "WORKERS", cfg.WORKERS, ">= 0")
    _require(cfg.CPU_THREADS >= 0, "CPU_THREADS", cfg.CPU_THREADS, ">= 0 (0 chooses)")
    _require(0 <= cfg.SEED < 2**32, "SEED", cfg.SEED, "in [0, 2**32)")
    _require(train.BEGIN_EPOCH >= 0, "TRAIN.BEGIN_EPOCH", train.BEGIN_EPOCH, ">= 0")
    _require(
        train.END_EPOCH > train.BEGIN_EPOCH, "TRAIN.END_EPOCH", train.END_EPOCH,
        f"greater than TRAIN.BEGIN_EPOCH ({train.BEGIN_EPOCH})",
    )
    for key, value in (("TRAIN.WD", train.WD), ("TRAIN.CLIP_GRAD_NORM", train.CLIP_GRAD_NORM),
                       ("AUG.MIXUP", aug.MIXUP), ("AUG.MIXCUT", aug.MIXCUT),
                       ("AUG.TIMM_AUG.COLOR_JITTER", aug.TIMM_AUG.COLOR_JITTER)):
        _require(value >= 0, key, value, ">= 0")
    _require(0 < train.EMA.DECAY < 1, "TRAIN.EMA.DECAY", train.EMA.DECAY, "in (0, 1)")
    _validate_finetune(cfg.FINETUNE)
    _validate_train_schedule(cfg.TRAIN.LR_SCHEDULER.ARGS)
    _require(0 <= cfg.LOSS.LABEL_SMOOTHING < 1, "LOSS.LABEL_SMOOTHING", cfg.LOSS.LABEL_SMOOTHING, "in [0, 1)")
    for key, value in (
        ("AUG.MIXUP_PROB", aug.MIXUP_PROB),
        ("AUG.MIXUP_SWITCH_PROB", aug.MIXUP_SWITCH_PROB),
        ("AUG.GRAY_SCALE", aug.GRAY_SCALE),
        ("AUG.GAUSSIAN_BLUR", aug.GAUSSIAN_BLUR),
        ("AUG.DROPBLOCK_KEEP_PROB", aug.DROPBLOCK_KEEP_PROB),
        ("AUG.TIMM_AUG.RE_PROB", aug.TIMM_AUG.RE_PROB),
        ("AUG.TIMM_AUG.HFLIP", aug.TIMM_AUG.HFLIP),
        ("AUG.TIMM_AUG.VFLIP", aug.TIMM_AUG.VFLIP),
    ):
        _require(0 <= value <= 1, key, value, "a probability in [0, 1]")
    for key, values in (("INPUT.MEAN", cfg.INPUT.MEAN), ("INPUT.STD", cfg.INPUT.STD)):
        _require(len(values) == 3, key, values, "three numbers, one per colour channel")
    _require(all(s > 0 for s in cfg.INPUT.STD), "INPUT.STD", cfg.INPUT.STD, "positive")
    scale, ratio = aug.SCALE, aug.RATIO
    _require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "AUG.SCALE", scale, "(min, max) with 0 < min <= max <= 1")
    _require(len(ratio) == 2 and 0 < ratio[0] <= ratio[1], "AUG.RATIO", ratio, "(min, max) with 0 < min <= max")


def _validate_finetune(ft: CfgNode) -> None:
    _require(ft.BASE_LR > 0, "FINETUNE.BASE_LR", ft.BASE_LR, "positive")
    for key, value in (("FINETUNE.WD", ft.WD), ("FINETUNE.CLIP_GRAD_NORM", ft.CLIP_GRAD_NORM),
                       ("FINETUNE.MOMENTUM", ft.MOMENTUM)):
        _require(value >= 0, key, value, ">= 0")
    _require(ft.WARMUP_STEPS == -1 or 0 <= ft.WARMUP_STEPS < ft.STEPS, "FINETUNE.WARMUP_STEPS", ft.WARMUP_STEPS,
             f"in [0, FINETUNE.STEPS) = [0, {ft.STEPS}), or -1 for 5% of the steps")
    _require(0 < ft.LAYER_DECAY <= 1, "FINETUNE.LAYER_DECAY", ft.LAYER_DECAY, "in (0, 1] (1 turns it off)")
    sched = ft.LR_SCHEDULER
    _require(0 < sched.DECAY_RATE <= 1, "FINETUNE.LR_SCHEDULER.DECAY_RATE", sched.DECAY_RATE, "in (0, 1]")
    steps = list(sched.DECAY_STEPS)
    _require(
        sched.DECAY_TYPE != "step" or (all(0 < s < ft.STEPS for s in steps) and steps == sorted(set(steps))),
        "FINETUNE.LR_SCHEDULER.DECAY_STEPS", steps,
        f"increasing step numbers between 0 and FINETUNE.STEPS ({ft.STEPS}), e.g. {_fractions_of(ft.STEPS)}, "
        "or [] for those (30%, 60%, 90% of the steps)",
    )
    _require(all(isinstance(p, str) and p for p in ft.FROZEN_LAYERS), "FINETUNE.FROZEN_LAYERS",
             list(ft.FROZEN_LAYERS), "a list of module name prefixes such as ['stage0', 'stage1']")
    # Only the step-based run reads these: an epoch run would silently train every layer at one rate.
    defaults = get_defaults().FINETUNE
    for key in ("FROZEN_LAYERS", "LINEAR_PROBE", "LAYER_DECAY"):
        value, default = config_value(ft, key), config_value(defaults, key)
        _require(bool(ft.FINETUNE) or value == default, f"FINETUNE.{key}", value,
                 f"{default!r} (the default) unless FINETUNE.FINETUNE is true: only the step-based fine-tuning "
                 "reads it, an epoch run trains every layer; set FINETUNE.FINETUNE true")


def _validate_train_schedule(args: CfgNode) -> None:
    """timm's schedulers take these unchecked and fail, or silently misbehave, only once training runs
    (a 0 step length divides by zero after the first epoch)."""
    key = "TRAIN.LR_SCHEDULER.ARGS."
    _require_choice(key + "sched", args.sched, TRAIN_LR_SCHEDULES)
    _require(args.decay_epochs >= 1, key + "decay_epochs", args.decay_epochs, ">= 1 (epochs between the 'step' decays)")
    _require(args.lr_cycle_limit >= 1, key + "lr_cycle_limit", args.lr_cycle_limit, ">= 1")
    for name in ("warmup_epochs", "patience_epochs", "warmup_lr", "min_lr", "noise_pct", "noise_std"):
        _require(args[name] >= 0, key + name, args[name], ">= 0")
    for name in ("decay_rate", "lr_cycle_mul"):
        _require(args[name] > 0, key + name, args[name], "positive")
    if args.sched == "plateau":  # torch's ReduceLROnPlateau refuses a factor that would not reduce
        _require(args.decay_rate < 1, key + "decay_rate", args.decay_rate, "< 1 with sched 'plateau' (the factor a plateau multiplies the rate by)")
    noise = list(args.noise)
    _require(
        len(noise) <= 2 and all(is_number(n) and 0 <= n <= 1 for n in noise)
        and noise == sorted(set(noise)), key + "noise", noise,
        "[] (no noise), [start] or [start, end] with 0 <= start < end <= 1, fractions of the run",
    )


def _fractions_of(total: int) -> list[int]:
    return sorted({int(total * f) for f in FINETUNE_DECAY_FRACTIONS} - {0})


def finetune_warmup_steps(cfg: CfgNode) -> int:
    """FINETUNE.WARMUP_STEPS, or for -1 5% of FINETUNE.STEPS."""
    warmup = int(cfg.FINETUNE.WARMUP_STEPS)
    return warmup if warmup >= 0 else int(cfg.FINETUNE.STEPS) // 20


def finetune_decay_steps(cfg: CfgNode) -> list[int]:
    """The 'step' schedule's boundaries: FINETUNE.LR_SCHEDULER.DECAY_STEPS, or when it is empty 30%,
    60% and 90% of FINETUNE.STEPS (fewer for very short runs, where some coincide)."""
    return [int(s) for s in cfg.FINETUNE.LR_SCHEDULER.DECAY_STEPS] or _fractions_of(int(cfg.FINETUNE.STEPS))


def _validate_choices(cfg: CfgNode) -> None:
    _require(not (cfg.DATASET.CLASS_MAP and cfg.DATASET.DATASET in DOWNSTREAM_DATASETS), "DATASET.CLASS_MAP",
             cfg.DATASET.CLASS_MAP, f"empty for DATASET.DATASET {cfg.DATASET.DATASET!r}, whose classes and their order "
             "come from its published files (a class map applies to folder datasets)")
    _require(not (cfg.TEST.REAL_LABELS and cfg.TEST.VALID_LABELS), "TEST.REAL_LABELS", cfg.TEST.REAL_LABELS,
             "false when TEST.VALID_LABELS is set (ReaL labels index all 1000 ImageNet classes)")
    _require_choice("AMP.MEMORY_FORMAT", cfg.AMP.MEMORY_FORMAT, MEMORY_FORMATS)
    _require_choice("AMP.DTYPE", cfg.AMP.DTYPE, AMP_DTYPES)
    _require_choice("DIST_BACKEND", cfg.DIST_BACKEND, DIST_BACKENDS)
    _require_choice("TRAIN.OPTIMIZER", cfg.TRAIN.OPTIMIZER, OPTIMIZERS, ignore_case=True)
    _require_choice("DATASET.SAMPLER", cfg.DATASET.SAMPLER, SAMPLERS)
    _require_choice("MODEL.ACTIVATION", cfg.MODEL.ACTIVATION, ACTIVATION_CHOICES)
    _require_choice("TRAIN.EARLIER_RESULTS", cfg.TRAIN.EARLIER_RESULTS, EARLIER_RESULTS_ACTIONS)
    _require_choice("TRAIN.NONFINITE_LOSS", cfg.TRAIN.NONFINITE_LOSS, NONFINITE_LOSS_ACTIONS)
    _require_choice("TRAIN.COMPILE_MODE", cfg.TRAIN.COMPILE_MODE, COMPILE_MODES)
    # torch (pytorch#169545): a CUDA graph's next replay frees the gradient the last backward left in
    # the parameters, so accumulating into it fails on the second micro-batch.
    _require(not (cfg.TRAIN.COMPILE and cfg.TRAIN.COMPILE_MODE in CUDA_GRAPH_COMPILE_MODES and cfg.TRAIN.ACCUM_STEPS > 1),
             "TRAIN.COMPILE_MODE", cfg.TRAIN.COMPILE_MODE, "'default' or 'max-autotune-no-cudagraphs' with TRAIN.ACCUM_STEPS "
             f"{cfg.TRAIN.ACCUM_STEPS} (CUDA graphs lose the gradients being accumulated)")
    _require_choice("DATASET.BAD_FILES", cfg.DATASET.BAD_FILES, BAD_FILE_POLICIES)
    _require_choice("AUG.MIXUP_MODE", cfg.AUG.MIXUP_MODE, MIXUP_MODES)
    _require_choice("LOSS.LOSS", cfg.LOSS.LOSS, LOSSES)
    _require_choice("FINETUNE.OPTIMIZER", cfg.FINETUNE.OPTIMIZER, OPTIMIZERS, ignore_case=True)
    _require_choice("FINETUNE.LR_SCHEDULER.DECAY_TYPE", cfg.FINETUNE.LR_SCHEDULER.DECAY_TYPE, FINETUNE_DECAY_TYPES)
    _require_choice("TRAIN.LR_SCHEDULER.METHOD", cfg.TRAIN.LR_SCHEDULER.METHOD, LR_SCHEDULER_METHODS)
    timm_aug = cfg.AUG.TIMM_AUG
    _require_choice("AUG.TIMM_AUG.INTERPOLATION", timm_aug.INTERPOLATION, TIMM_INTERPOLATIONS)
    _require_choice("AUG.TIMM_AUG.RE_MODE", timm_aug.RE_MODE, RANDOM_ERASING_MODES)
    policy = timm_aug.AUTO_AUGMENT.split("-")[0]
    _require(
        not timm_aug.AUTO_AUGMENT or policy in AUTO_AUGMENT_POLICIES, "AUG.TIMM_AUG.AUTO_AUGMENT", timm_aug.AUTO_AUGMENT,
        "empty or a timm policy (" + ", ".join(repr(p) for p in AUTO_AUGMENT_POLICIES) + ") with its '-' options, "
        "e.g. 'rand-m9-mstd0.5-inc1'",
    )
    for key, value in (("AUG.INTERPOLATION", cfg.AUG.INTERPOLATION), ("TEST.INTERPOLATION", cfg.TEST.INTERPOLATION)):
        _require(value in PIL_INTERPOLATIONS, key, value, "a PIL resampling code 0-5 (2 bilinear, 3 bicubic)")
    _require(len(cfg.AUG.COLOR_JITTER) == 5, "AUG.COLOR_JITTER", list(cfg.AUG.COLOR_JITTER),
             "5 numbers (brightness, contrast, saturation, hue, probability), e.g. [0.4, 0.4, 0.4, 0.1, 0.0]")


def _validate_model_and_sizes(cfg: CfgNode) -> None:
    spec = spec_from_config(cfg)
    for name in ("ATTN_DROP_RATE", "DROP_RATE", "DROP_PATH_RATE"):
        rates = cfg.MODEL.SPEC[name]
        _require(all(0 <= r < 1 for r in rates), f"MODEL.SPEC.{name}", rates, "rates in [0, 1)")
    smallest = spec.min_input_size()
    for key, size in (("TRAIN.IMAGE_SIZE", cfg.TRAIN.IMAGE_SIZE), ("TEST.IMAGE_SIZE", cfg.TEST.IMAGE_SIZE)):
        _require(len(size) == 2, key, size, "[width, height], as in the release")
        _require(
            min(size) >= smallest, key, size,
            f"at least {smallest}x{smallest}, the smallest size the MODEL.SPEC strides allow",
        )


# --------------------------------------------------------------------------------------------------
# Using a loaded config
# --------------------------------------------------------------------------------------------------


def spec_from_config(cfg: CfgNode) -> CvtSpec:
    """The architecture in MODEL.SPEC (validated; raises UserError naming a bad key)."""
    return CvtSpec.from_dict(cfg.MODEL.SPEC)


def settings_as_opts(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Nested or dotted {key: value} settings as KEY VALUE overrides."""
    out: list[str] = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out += settings_as_opts(value, f"{prefix}{key}.")
        else:
            out += [f"{prefix}{key}", repr(value)]
    return out


def config_from_settings(settings: Mapping[str, Any]) -> CfgNode:
    """The defaults with `settings` ({'TEST.IMAGE_SIZE': [...], ...} or nested) applied, validated.

    Stored settings (a checkpoint's config) were warned about when their run loaded them: no warnings."""
    return load_config(None, settings_as_opts(settings), warn=False)


def settings_from_yaml_text(text: str, source: str) -> dict[str, Any]:
    """The nested {key: value} mapping of a stored config (YAML text, as `save_config` writes)."""
    try:
        data = _safe_yaml(text)
    except (yaml.YAMLError, _YamlLimitError) as e:
        problem = f"{getattr(e, 'problem', None) or e}{_yaml_line(e)}"
        raise UserError(f"{source} is not valid YAML ({problem}); give the experiment file with --cfg") from None
    if not isinstance(data, dict):
        raise UserError(f"{source} is not a mapping of config keys; give the experiment file with --cfg")
    return data


def config_from_yaml_text(text: str, source: str) -> CfgNode:
    """A stored config (YAML text, as `save_config` writes), validated as any experiment file is."""
    return config_from_settings(settings_from_yaml_text(text, source))


def asked_activation(cfg: CfgNode) -> str | None:
    """MODEL.ACTIVATION when set; None for 'auto' (the loaded weights decide)."""
    return None if cfg.MODEL.ACTIVATION == "auto" else cfg.MODEL.ACTIVATION


def output_dir(cfg: CfgNode) -> Path:
    """The run folder, as the release names it: OUTPUT_DIR/DATASET.DATASET/NAME."""
    if not cfg.NAME:
        raise UserError("NAME is empty because no experiment file was given; add `NAME <name>` to the overrides")
    return Path(cfg.OUTPUT_DIR) / cfg.DATASET.DATASET / cfg.NAME


def save_config(cfg: CfgNode, path: str | os.PathLike) -> None:
    """Write the full config as YAML (atomically); `load_config(path)` gives back an equal node."""
    atomic_write_text(path, cfg.dump())

"""Experiment configuration: the release's yacs keys (same names, meanings and defaults) plus ours.

`load_config` builds a frozen, validated node from the defaults, an experiment file (with the release's
`BASE` inheritance) and trailing `KEY VALUE` overrides. It is stricter than the release where strictness
catches mistakes (every unknown key is an error, with the nearest valid key suggested; nothing but
TRAIN.OPTIMIZER_ARGS accepts new keys) and more liberal where yacs refuses harmless input (an int where
a float is expected, a list where a tuple is, 'true'/'false' strings for booleans).
"""
from __future__ import annotations

import ast
import difflib
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

__all__ = [
    "get_defaults",
    "load_config",
    "validate_config",
    "resolve_config_path",
    "list_experiments",
    "output_dir",
    "save_config",
    "config_from_settings",
    "config_from_yaml_text",
    "settings_as_opts",
    "spec_from_config",
]

COMMAND_LINE = "the command line"

# The one home of every name list and limit a key accepts: validation below and the code that acts on
# the key both read them from here.
MEMORY_FORMATS = ("nchw", "nhwc")
AMP_DTYPES = ("auto", "bfloat16", "float16")
DIST_BACKENDS = ("nccl", "gloo")  # for CUDA; CPU processes always use gloo
OPTIMIZERS = ("sgd", "adam", "adamw")  # compared case-insensitively: the release writes 'adamW'
SAMPLERS = ("default", "repeated_aug")
NONFINITE_LOSS_ACTIONS = ("stop", "skip")
BAD_FILE_POLICIES = ("skip", "stop")
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup modes
LOSSES = ("softmax",)  # the release's only loss
LR_SCHEDULER_METHODS = ("timm",)
# PIL's integer resampling codes, as the release's config stores interpolation, and their names.
PIL_INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# PIL's own default limit: about 89 megapixels, far above any training image.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


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

    cfg.FINETUNE = CfgNode()
    cfg.FINETUNE.FINETUNE = False
    cfg.FINETUNE.USE_TRAIN_AUG = False
    cfg.FINETUNE.BASE_LR = 0.003
    cfg.FINETUNE.BATCH_SIZE = 512
    cfg.FINETUNE.EVAL_EVERY = 3000
    cfg.FINETUNE.TRAIN_MODE = True
    cfg.FINETUNE.FROZEN_LAYERS = []
    cfg.FINETUNE.LR_SCHEDULER = CfgNode()
    cfg.FINETUNE.LR_SCHEDULER.DECAY_TYPE = "step"

    cfg.AMP = CfgNode()
    cfg.AMP.ENABLED = False
    cfg.AMP.MEMORY_FORMAT = "nchw"
    # Ours: the autocast dtype. 'auto' means bfloat16 on CPU, and on CUDA bfloat16 where the GPU
    # supports it, else float16 with a gradient scaler.
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
    # Ours: the MLP activation. 'quick_gelu' as the published weights were trained; 'gelu' for weights
    # converted from Hugging Face, which were evaluated with exact GELU.
    cfg.MODEL.ACTIVATION = "quick_gelu"

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
    cfg.DATASET.TARGET_SIZE = -1
    # Ours: what to do with an unreadable or corrupt image: 'skip' it (counted and logged) or 'stop'.
    cfg.DATASET.BAD_FILES = "skip"
    # Ours: images with more pixels are refused as decompression bombs (PIL's own default limit).
    cfg.DATASET.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS

    cfg.INPUT = CfgNode()
    cfg.INPUT.MEAN = [0.485, 0.456, 0.406]
    cfg.INPUT.STD = [0.229, 0.224, 0.225]

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
    # Run the model through torch.compile.
    cfg.TRAIN.COMPILE = False
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


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """An existing file wins; otherwise a packaged experiment's bare name, with or without `.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    experiments = list_experiments()
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    if len(path.parts) == 1 and stem in experiments:
        return experiments[stem]
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads '1e-5' (no dot) as a string; accept it as the number it plainly is.
            return float(value.strip())
    elif kind is str:
        if isinstance(value, str):
            return value
        if value is None:  # `KEY:` with nothing after it in YAML
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config file {str(path)!r}: {e.strerror}; check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"YAML syntax error in {str(path)!r}{where}: {problem}; fix the file") from None
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


def load_config(cfg_file: str | os.PathLike | None, opts: Sequence[str] = ()) -> CfgNode:
    """Defaults, then the experiment file (a path or a packaged name), then overrides; validated, frozen."""
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
    validate_config(cfg)
    cfg.freeze()
    return cfg


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
    _validate_numbers(cfg)
    _validate_choices(cfg)
    _validate_model_and_sizes(cfg)


def _validate_numbers(cfg: CfgNode) -> None:
    train, test, aug = cfg.TRAIN, cfg.TEST, cfg.AUG
    _require(train.LR > 0, "TRAIN.LR", train.LR, "positive")
    for key, value in (
        ("TRAIN.BATCH_SIZE_PER_GPU", train.BATCH_SIZE_PER_GPU),
        ("TEST.BATCH_SIZE_PER_GPU", test.BATCH_SIZE_PER_GPU),
        ("FINETUNE.BATCH_SIZE", cfg.FINETUNE.BATCH_SIZE),
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
                       ("AUG.MIXUP", aug.MIXUP), ("AUG.MIXCUT", aug.MIXCUT)):
        _require(value >= 0, key, value, ">= 0")
    _require(0 < train.EMA.DECAY < 1, "TRAIN.EMA.DECAY", train.EMA.DECAY, "in (0, 1)")
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


def _validate_choices(cfg: CfgNode) -> None:
    _require_choice("AMP.MEMORY_FORMAT", cfg.AMP.MEMORY_FORMAT, MEMORY_FORMATS)
    _require_choice("AMP.DTYPE", cfg.AMP.DTYPE, AMP_DTYPES)
    _require_choice("DIST_BACKEND", cfg.DIST_BACKEND, DIST_BACKENDS)
    _require_choice("TRAIN.OPTIMIZER", cfg.TRAIN.OPTIMIZER, OPTIMIZERS, ignore_case=True)
    _require_choice("DATASET.SAMPLER", cfg.DATASET.SAMPLER, SAMPLERS)
    _require_choice("MODEL.ACTIVATION", cfg.MODEL.ACTIVATION, ACTIVATIONS)
    _require_choice("TRAIN.NONFINITE_LOSS", cfg.TRAIN.NONFINITE_LOSS, NONFINITE_LOSS_ACTIONS)
    _require_choice("DATASET.BAD_FILES", cfg.DATASET.BAD_FILES, BAD_FILE_POLICIES)
    _require_choice("AUG.MIXUP_MODE", cfg.AUG.MIXUP_MODE, MIXUP_MODES)
    _require_choice("LOSS.LOSS", cfg.LOSS.LOSS, LOSSES)
    _require_choice("TRAIN.LR_SCHEDULER.METHOD", cfg.TRAIN.LR_SCHEDULER.METHOD, LR_SCHEDULER_METHODS)
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
    """The defaults with `settings` ({'TEST.IMAGE_SIZE': [...], ...} or nested) applied, validated."""
    return load_config(None, settings_as_opts(settings))


def config_from_yaml_text(text: str, source: str) -> CfgNode:
    """A stored config (YAML text, as `save_config` writes), validated as any experiment file is."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"{source} is not valid YAML; give the experiment file with --cfg") from None
    if not isinstance(data, Mapping):
        raise UserError(f"{source} is not a mapping of config keys; give the experiment file with --cfg")
    return config_from_settings(data)


def output_dir(cfg: CfgNode) -> Path:
    """The run folder, as the release names it: OUTPUT_DIR/DATASET.DATASET/NAME."""
    if not cfg.NAME:
        raise UserError("NAME is empty because no experiment file was given; add `NAME <name>` to the overrides")
    return Path(cfg.OUTPUT_DIR) / cfg.DATASET.DATASET / cfg.NAME


def save_config(cfg: CfgNode, path: str | os.PathLike) -> None:
    """Write the full config as YAML (atomically); `load_config(path)` gives back an equal node."""
    atomic_write_text(path, cfg.dump())

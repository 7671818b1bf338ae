"""The ``cvt`` command: train, test, predict, info, export, list.

Experiment commands take the release's interface: ``--cfg FILE_OR_NAME`` then ``KEY VALUE`` overrides
(``cvt train --cfg cvt-13-224x224 TRAIN.LR 0.1``). A user's mistake prints one ``error:`` line and
exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import UserError

if TYPE_CHECKING:
    import torch
    from yacs.config import CfgNode

    from .interop.checkpoint import Checkpoint

log = logging.getLogger("cvt")

DEFAULT_EXPERIMENT = "cvt-digits"
IMAGENET_CLASSES = 1000


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _add_cfg(parser: argparse.ArgumentParser, default: str | None = None, example: str = "TRAIN.LR 0.1") -> None:
    parser.add_argument(
        "--cfg",
        default=default,
        help="experiment YAML file, or the bare name of a packaged one (see `cvt list`)"
        + (f"; default {default}" if default else ""),
    )
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help=f"config overrides, e.g. {example}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="CvT: Convolutional vision Transformers")
    parser.add_argument("--version", action="version", version=f"cvt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train (or fine-tune) a model from an experiment file")
    _add_cfg(p, DEFAULT_EXPERIMENT)

    p = sub.add_parser("test", help="evaluate TEST.MODEL_FILE on the test split")
    _add_cfg(p, example="TEST.MODEL_FILE model.pth")

    p = sub.add_parser("predict", help="top-k classes of images")
    p.add_argument("--cfg", help="experiment file or name (transform, model spec); default: the checkpoint's own")
    p.add_argument("--weights", required=True, help="checkpoint: any supported format")
    p.add_argument("--topk", type=_positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: cuda when available)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")

    p = sub.add_parser("info", help="parameters and multiply-adds of a model")
    p.add_argument("--cfg", help="experiment file or name (instead of a model name)")
    p.add_argument("--img-size", type=int, help="square input size (default: the config's TEST.IMAGE_SIZE, or 224)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("args", nargs="*", metavar="NAME | KEY VALUE", help=f"a model name, or overrides after --cfg")

    p = sub.add_parser("export", help="convert a checkpoint to another format")
    p.add_argument("--weights", required=True, help="checkpoint: any supported format")
    p.add_argument("--format", required=True, choices=["official", "hf", "safetensors"])
    p.add_argument("--cfg", help="experiment file or name, if the checkpoint does not say its architecture")
    p.add_argument("output", help="output file (official, safetensors) or folder (hf)")

    sub.add_parser("list", help="model names and packaged experiment files")
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


# --------------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import train

    train(load_config(args.cfg, args.opts))
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import test

    if not args.cfg:
        raise UserError("cvt test needs --cfg (the experiment file that defines the data and model)")
    test(load_config(args.cfg, args.opts))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model
    from .models.complexity import count_gmacs, count_params

    if args.cfg:
        from .config import load_config

        cfg = load_config(args.cfg, args.args)
        name, spec, num_classes = cfg.NAME, dict(cfg.MODEL.SPEC), cfg.MODEL.NUM_CLASSES
        size = (args.img_size, args.img_size) if args.img_size else tuple(cfg.TEST.IMAGE_SIZE[::-1])
    else:
        if len(args.args) != 1:
            raise UserError("cvt info takes one model name (cvt-13, cvt-21, cvt-w24) or --cfg FILE [KEY VALUE ...]")
        name, spec, num_classes = args.args[0], args.args[0], 1000
        size = (args.img_size or 224,) * 2
    with torch.device("meta"):  # shapes only: no memory for weights, no arithmetic
        model = create_model(spec, num_classes=num_classes)
    min_size = model.spec.min_input_size()
    if min(size) < min_size:
        raise UserError(f"--img-size {min(size)} is too small for this model's strides; use at least {min_size}")
    params, gmacs = count_params(model), count_gmacs(model, size)
    if args.json:
        print(json.dumps({"model": name, "image_size": list(size), "params": params, "gmacs": round(gmacs, 3)}))
        return 0
    strides = [f["reduction"] for f in model.feature_info]
    widths = [f["num_chs"] for f in model.feature_info]
    print(f"model      {name}")
    print(f"input      {size[0]}x{size[1]}")
    print(f"params     {params:,} ({params / 1e6:.1f}M)")
    print(f"GMACs      {gmacs:.2f}")
    print(f"stages     widths {widths}, depths {list(model.spec.depth)}, strides {strides}")
    return 0


def _image_files(inputs: Sequence[str]) -> list[Path]:
    from .data import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image {item!r} does not exist; check the path")
    if not files:
        raise UserError(f"no images found in {', '.join(inputs)}")
    return files


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from .config import load_config, spec_from_config
    from .data import BadImageError, build_transform, load_rgb
    from .interop.checkpoint import model_from_checkpoint, read_checkpoint

    ckpt = read_checkpoint(args.weights)
    cfg = _experiment_of(ckpt, args.cfg)
    if cfg is None:
        if ckpt.num_classes != IMAGENET_CLASSES:
            raise UserError(
                f"{args.weights} does not say how its images were preprocessed (size, normalisation); "
                "give its experiment file with --cfg"
            )
        cfg = load_config(None)
        log.info(
            "%s does not say how its images were preprocessed: using the ImageNet test transform "
            "(resize to 256, centre crop 224); give --cfg to change it", args.weights,
        )
    model, ckpt = model_from_checkpoint(ckpt, spec=spec_from_config(cfg) if args.cfg else None)
    device = _predict_device(args.device)
    model.to(device).eval()
    names = ckpt.class_names or [str(i) for i in range(model.num_classes)]
    transform = build_transform(cfg, is_train=False)
    topk = min(args.topk, model.num_classes)
    results: list[dict] = []

    def classify(batch: list[tuple[Path, torch.Tensor]]) -> None:
        with torch.inference_mode():
            probs = model(torch.stack([image for _, image in batch]).to(device)).float().softmax(dim=-1).cpu()
        for (path, _), image_probs in zip(batch, probs):
            values, indices = image_probs.topk(topk)
            preds = [{"index": int(i), "class": names[int(i)], "prob": round(float(p), 6)}
                     for p, i in zip(values, indices)]
            results.append({"image": str(path), "predictions": preds})
            if not args.json:
                print(f"{path}: " + ", ".join(f"{p['class']} {100 * p['prob']:.1f}%" for p in preds))

    skipped, batch = 0, []
    files = _image_files(args.images)
    for path in files:
        try:
            batch.append((path, transform(load_rgb(path, cfg.DATASET.MAX_IMAGE_PIXELS))))
        except BadImageError as e:
            print(f"skipped {e}", file=sys.stderr)
            skipped += 1
        if len(batch) == args.batch_size:
            classify(batch)
            batch = []
    if batch:
        classify(batch)
    if args.json:
        print(json.dumps(results))
    if skipped:
        print(f"{skipped} of {len(files)} image(s) skipped: unreadable", file=sys.stderr)
    return 0 if results else 2


def _predict_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not a device this command runs on; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _experiment_of(ckpt: Checkpoint, cfg_arg: str | None) -> CfgNode | None:
    """The config that says how a checkpoint's images are preprocessed: --cfg, else the one the
    project's training checkpoints carry, else the test transform an export carries; None if unknown."""
    from .config import load_config

    if cfg_arg:
        return load_config(cfg_arg)
    if isinstance(ckpt.extra.get("config"), str):
        return load_config(None, _config_text_as_opts(ckpt.extra["config"]))
    if ckpt.eval_settings:
        return load_config(None, _as_opts(ckpt.eval_settings))
    return None


def _config_text_as_opts(config_text: str) -> list[str]:
    """A stored config (YAML text) as KEY VALUE overrides, so it goes through the same validation."""
    import yaml

    return _as_opts(yaml.safe_load(config_text))


def _as_opts(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Nested or dotted {key: value} settings as KEY VALUE overrides."""
    out: list[str] = []
    for key, value in node.items():
        if isinstance(value, Mapping):
            out += _as_opts(value, f"{prefix}{key}.")
        else:
            out += [f"{prefix}{key}", repr(value)]
    return out


def _cmd_export(args: argparse.Namespace) -> int:
    from .config import spec_from_config
    from .data.transforms import eval_transform_settings
    from .interop.checkpoint import model_from_checkpoint, read_checkpoint, save_official, save_safetensors
    from .interop.hf import save_hf

    ckpt = read_checkpoint(args.weights)
    # The official layout is a bare state dict; the other two keep how images are to be preprocessed.
    cfg = _experiment_of(ckpt, args.cfg) if args.format != "official" or args.cfg else None
    model, ckpt = model_from_checkpoint(ckpt, spec=spec_from_config(cfg) if args.cfg else None)
    eval_settings = eval_transform_settings(cfg) if cfg is not None else None
    if args.format == "official":
        save_official(model, args.output)
    elif args.format == "safetensors":
        save_safetensors(model, args.output, ckpt.class_names, eval_settings)
    else:
        save_hf(model, args.output, ckpt.class_names, eval_settings)
    print(f"wrote {args.output} ({args.format} layout, {model.num_classes} classes)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .config import list_experiments
    from .models import list_models

    print("models:      " + ", ".join(list_models()))
    print("experiments: " + ", ".join(sorted(list_experiments())))
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "test": _cmd_test,
    "predict": _cmd_predict,
    "info": _cmd_info,
    "export": _cmd_export,
    "list": _cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:  # with the subcommand's usage, not the top level's
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`cvt predict ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a path the system refused (permissions, disk full, a file in the way)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

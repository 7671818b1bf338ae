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
from collections.abc import Sequence

from . import __version__
from .errors import UserError

DEFAULT_EXPERIMENT = "cvt-digits"
# As cvt.weights.export.EXPORT_FORMATS (a test checks), named here so that `cvt --help` loads no torch.
EXPORT_FORMATS = ("official", "hf", "safetensors", "onnx", "torchscript", "exported")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would name this function in its message
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer") from None
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


_MODEL_HELP = "a published tag (`cvt list`) or hf-hub:org/repo[@revision], fetched into the Hugging Face cache"


def _add_weights(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--weights", help="checkpoint: any supported format (file or folder)")
    group.add_argument("--model", dest="weights", help=_MODEL_HELP)
    parser.add_argument(
        "--use-ema", action="store_true",
        help="the EMA weights a run's checkpoint.pth holds (trained with TRAIN.EMA.ENABLED), not its model's",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="CvT: Convolutional vision Transformers")
    parser.add_argument("--version", action="version", version=f"cvt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train (or fine-tune) a model from an experiment file")
    _add_cfg(p, DEFAULT_EXPERIMENT)

    p = sub.add_parser("test", help="evaluate TEST.MODEL_FILE (or --model) on the test split")
    p.add_argument("--model", help=f"weights to test: {_MODEL_HELP}; a tag brings its own experiment (--cfg optional)")
    _add_cfg(p, example="TEST.MODEL_FILE model.pth")

    p = sub.add_parser("predict", help="top-k classes of images")
    p.add_argument("--cfg", help="experiment file or name (transform, model spec); default: the checkpoint's own")
    _add_weights(p)
    p.add_argument("--topk", type=_positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: cuda when available)")
    p.add_argument("--max-image-pixels", type=_positive_int, metavar="N",
                   help="largest image read, in pixels (default: the config's DATASET.MAX_IMAGE_PIXELS)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")

    p = sub.add_parser("info", help="parameters and multiply-adds of a model")
    p.add_argument("--cfg", help="experiment file or name (instead of a model name)")
    p.add_argument("--model", help="a model name or published tag (at its test size)")
    p.add_argument("--img-size", type=_positive_int, help="square input size (default: the config's TEST.IMAGE_SIZE, or 224)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("args", nargs="*", metavar="NAME | KEY VALUE", help="a model name, or overrides after --cfg")

    p = sub.add_parser("export", help="convert a checkpoint to another format")
    _add_weights(p)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--cfg", help="experiment file or name, where the checkpoint does not say its architecture or test transform")
    p.add_argument("--force", action="store_true", help="hf: replace files already in the output folder")
    p.add_argument("output", help="output file (official, safetensors, onnx, torchscript, exported) or folder (hf)")

    sub.add_parser("list", help="model names and packaged experiment files")
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


# --------------------------------------------------------------------------------------------------
# Commands: each parses nothing and computes nothing itself; the library does the work.
# --------------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.run import train

    train(load_config(args.cfg, args.opts))
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from .config import load_test_config
    from .training.run import test

    test(load_test_config(args.cfg, args.opts, model=args.model))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .models.complexity import model_summary

    if args.cfg:
        from .config import load_config
        from .data.transforms import test_output_size

        if args.model:
            raise UserError("cvt info takes --cfg FILE [KEY VALUE ...] or --model NAME, not both")
        cfg = load_config(args.cfg, args.args)
        name, spec, num_classes = cfg.NAME, dict(cfg.MODEL.SPEC), cfg.MODEL.NUM_CLASSES
        size = (args.img_size, args.img_size) if args.img_size is not None else test_output_size(cfg)
    else:
        names = [args.model] if args.model else args.args
        if len(names) != 1 or (args.model and args.args):
            raise UserError("cvt info takes one model name or tag (cvt-13, cvt-13-384-22k, ...) or --cfg FILE [KEY VALUE ...]")
        name, spec, num_classes = names[0], _model_name(names[0]), 1000
        size = (args.img_size if args.img_size is not None else _test_size(name),) * 2
    summary = model_summary(spec, num_classes, size)
    if args.json:
        print(json.dumps({"model": name, **{k: summary[k] for k in ("image_size", "params", "gmacs")}}))
        return 0
    print(f"model      {name}")
    print(f"input      {size[0]}x{size[1]}")
    print(f"params     {summary['params']:,} ({summary['params'] / 1e6:.1f}M)")
    print(f"GMACs      {summary['gmacs']:.2f}")
    print(f"stages     widths {summary['widths']}, depths {summary['depths']}, strides {summary['strides']}")
    return 0


def _model_name(name: str) -> str:
    """A model name or published tag as given, or a one-line error that points an experiment's name at --cfg."""
    from .config import list_experiments
    from .models.spec import list_models, model_spec

    try:
        model_spec(name)
    except UserError:
        if name in list_experiments():
            raise UserError(f"{name!r} is an experiment, not a model name; use --cfg {name}") from None
        raise UserError(
            f"unknown model {name!r}; choose one of {', '.join(dict.fromkeys(list_models() + list_models(pretrained=True)))}, "
            "or --cfg EXPERIMENT"
        ) from None
    return name


def _test_size(name: str) -> int:
    from .models.zoo import find_published

    weights = find_published(name)
    return weights.image_size if weights else 224


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import Predictor, image_files

    files = image_files(args.images)  # a mistyped image path before any model is loaded or downloaded
    predictor = Predictor(args.weights, args.cfg, device=args.device, batch_size=args.batch_size, use_ema=args.use_ema,
                          max_image_pixels=args.max_image_pixels)
    results, skipped = [], 0
    for prediction in predictor.predict(files, args.topk):
        if prediction.error:
            print(f"skipped {prediction.error}", file=sys.stderr)
            skipped += 1
            continue
        results.append(prediction.as_dict())
        if not args.json:
            shown = ", ".join(f"{p['class']} {100 * p['prob']:.1f}%" for p in prediction.classes)
            print(f"{prediction.image}: {shown}")
    if args.json:
        print(json.dumps(results))
    if skipped:
        print(f"{skipped} of {len(files)} image(s) skipped: unreadable", file=sys.stderr)
    return 0 if results else 2


def _cmd_export(args: argparse.Namespace) -> int:
    from .weights.export import export_checkpoint

    model = export_checkpoint(
        args.weights, args.format, args.output, cfg_file=args.cfg, force=args.force, use_ema=args.use_ema
    )
    print(f"wrote {args.output} ({args.format} layout, {model.num_classes} classes)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .config import list_experiments, shared_bases
    from .models.spec import list_models

    bases = shared_bases()
    print("models:      " + ", ".join(list_models()))
    print("pretrained:  " + ", ".join(list_models(pretrained=True)))
    print("experiments: " + ", ".join(name for name in list_experiments() if name not in bases))
    print("bases:       " + ", ".join(bases) + "  (shared keys for other files' BASE, not runnable alone)")
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "test": _cmd_test,
    "predict": _cmd_predict,
    "info": _cmd_info,
    "export": _cmd_export,
    "list": _cmd_list,
}


# The commands that run a model. Their process is theirs: glibc's malloc may keep the memory a step
# frees for the next (`cvt.training.session.keep_freed_memory`).
_RUN_MODELS = {"train", "test", "predict"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:  # with the subcommand's usage, not the top level's
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    for stream in (sys.stdout, sys.stderr):
        # File names need not be UTF-8 (they reach us as surrogate escapes): print them escaped,
        # under any console encoding, rather than die mid-output.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command in _RUN_MODELS:
            from .training.session import keep_freed_memory

            keep_freed_memory()
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
    except RuntimeError as e:
        # torch reports a killed data-loader worker wherever the main process happens to be
        from .data.loader import worker_failure

        failure = worker_failure(e)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the system refused (permissions, disk full, a file in the way)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Deployment files: ONNX, TorchScript and torch.export programs of a CvT, each checked against the model.

Every file is traced through the portable kernels (`cvt.models.kernels.portable_kernels`), with the
batch, height and width dynamic (TorchScript traces keep them as the tensors' sizes; ONNX and
torch.export get them as symbolic dimensions). After writing, the file is run by its own runtime on
random batches and its logits are compared with the eager model's; a file that disagrees is never
put in place (it is verified under a temporary name), so an earlier file at that path survives.

Each file carries the test transform: ONNX as metadata props (plain values other runtimes can read),
TorchScript and torch.export as an extra file in the archive holding the same props as JSON.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from ..config import PIL_INTERPOLATIONS, config_from_settings
from ..data.transforms import CROP_PCT, eval_transform_settings, test_output_size, test_resize_size
from ..errors import UserError
from ..files import atomic_write_bytes, require_file_path
from ..models.kernels import portable_kernels
from .hf_preprocessor import EVAL_TRANSFORM_KEY

__all__ = [
    "DEPLOY_FORMATS", "MAX_ABS_DIFF", "OnnxClassifier", "deploy", "deployment_metadata", "read_deployed",
    "require_dependencies",
]

log = logging.getLogger(__name__)

DEPLOY_FORMATS = ("onnx", "torchscript", "exported")
# The most a deployed file's fp32 logits may differ from the eager model's: float rounding of the
# same function computed by other kernels stays far below it, any real error far above.
MAX_ABS_DIFF = 1e-4
VERIFY_BATCHES = (1, 3)
# The archive member of TorchScript and torch.export files that holds the metadata props as JSON.
METADATA_FILE = "cvt_metadata.json"
# The props key holding the test transform in this project's own terms (exact, for `cvt predict`).
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# What each format needs beyond torch, all installed by the `onnx` extra.
_DEPENDENCIES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "torchscript": (), "exported": ()}

Runner = Callable[[torch.Tensor], torch.Tensor]


def require_dependencies(fmt: str, purpose: str | None = None) -> list[ModuleType]:
    """The modules `fmt` needs beyond torch, or a `UserError` naming the extra that installs them."""
    if not hasattr(torch.export.Dim, "AUTO"):  # dynamic shapes found by the exporter: torch 2.6
        raise UserError(f"{purpose or f'--format {fmt}'} needs torch >= 2.6 (this is {torch.__version__}); upgrade torch")
    try:
        return [importlib.import_module(name) for name in _DEPENDENCIES[fmt]]
    except ImportError as e:
        raise UserError(
            f"{purpose or f'--format {fmt}'} needs {e.name or 'a package'} (not installed); "
            "install the onnx extra: pip install 'cvt-vision[onnx]'"
        ) from None


def deployment_metadata(cfg: CfgNode, num_classes: int, class_names: Sequence[str] | None) -> dict[str, str]:
    """The preprocessing of `cfg`'s test transform (and the class names, where known) as string props:
    resize (the shorter side, or [height, width]), then an optional centre crop to input_size."""
    height, width = test_output_size(cfg)
    settings = eval_transform_settings(cfg)
    crop = bool(cfg.TEST.CENTER_CROP)
    props: dict[str, Any] = {
        "input_size": [3, height, width],
        "resize": test_resize_size(cfg) if crop else list(test_resize_size(cfg)),
        "center_crop": crop,
        "crop_pct": CROP_PCT if crop else 1.0,
        "interpolation": PIL_INTERPOLATIONS[int(cfg.TEST.INTERPOLATION)],
        "mean": list(cfg.INPUT.MEAN),
        "std": list(cfg.INPUT.STD),
        "num_classes": num_classes,
        EVAL_TRANSFORM_KEY: settings,
    }
    if class_names is not None:
        props["class_names"] = list(class_names)
    return {key: json.dumps(value) for key, value in props.items()}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Keeps the exporters' chatter out of the command's output: TorchScript's deprecation and tracer
    warnings (shape tests recorded as constants, which the verification covers) and the ONNX
    optimizer's hundreds of INFO log lines."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            yield
    finally:
        logging.disable(previous)


def _dynamic_shapes() -> tuple[dict[int, Any]]:
    auto = torch.export.Dim.AUTO  # the exporter finds the valid range of each (CvT has a minimum size)
    return ({0: auto, 2: auto, 3: auto},)


def _onnx_bytes(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    onnx = require_dependencies("onnx")[0]
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=_dynamic_shapes(), verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def _torchscript_bytes(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _exported_bytes(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


_WRITERS = {"onnx": _onnx_bytes, "torchscript": _torchscript_bytes, "exported": _exported_bytes}


# --------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------


class OnnxClassifier:
    """An ONNX file run by ONNX Runtime on the CPU, called like the model: images (B, 3, H, W) -> logits.
    `threads`: ONNX Runtime's intra-op threads (default: its own choice, one per core)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        ort = require_dependencies("onnx", f"running {os.fspath(path)}")[2]
        if not Path(path).is_file():
            raise UserError(f"{os.fspath(path)!r} does not exist; check the path")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime has its own exception types (a corrupt or foreign file)
            raise UserError(f"{os.fspath(path)!r} is not an ONNX model ONNX Runtime can run: {str(e).splitlines()[0]}") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        classes = self.session.get_outputs()[0].shape[-1]
        if not isinstance(classes, int):  # a symbolic output size: the count the file records, or its names'
            classes = json.loads(self.metadata["num_classes"]) if "num_classes" in self.metadata else len(self.class_names or ())
        if not classes:
            raise UserError(f"{os.fspath(path)!r} does not say how many classes it predicts; export it again with `cvt export`")
        self.num_classes = int(classes)

    @property
    def class_names(self) -> list[str] | None:
        return json.loads(self.metadata["class_names"]) if "class_names" in self.metadata else None

    def eval_config(self) -> CfgNode | None:
        """The test transform the file carries, as a config; None for a file from elsewhere."""
        settings = self.metadata.get(EVAL_TRANSFORM_KEY)
        return config_from_settings(json.loads(settings)) if settings else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: images.detach().cpu().float().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def read_deployed(path: str | os.PathLike, fmt: str) -> tuple[Runner, dict[str, str]]:
    """Load a file `deploy` wrote with its own runtime: (images -> logits, metadata props)."""
    if fmt == "onnx":
        classifier = OnnxClassifier(path)
        return classifier, classifier.metadata
    extra = {METADATA_FILE: ""}
    # An open file: torch.export.load takes a path only when it ends in .pt2.
    with open(path, "rb") as f, _quiet_exporters():
        if fmt == "torchscript":
            module = torch.jit.load(f, map_location="cpu", _extra_files=extra)
        else:
            module = torch.export.load(f, extra_files=extra).module()
    return module, json.loads(extra[METADATA_FILE] or "{}")


# --------------------------------------------------------------------------------------------------
# Export, then verify
# --------------------------------------------------------------------------------------------------


def deploy(model: nn.Module, fmt: str, output: str | os.PathLike, cfg: CfgNode, class_names: Sequence[str] | None = None) -> float:
    """Write `model` as a `fmt` file ('onnx', 'torchscript', 'exported') at `output`, carrying the test
    transform of `cfg`, then run the file and compare with the eager model.

    The model is put on the CPU in fp32 eval mode (in place). Returns the largest absolute logit
    difference seen; above `MAX_ABS_DIFF` nothing is written and a `UserError` says so.
    """
    if fmt not in _WRITERS:
        raise UserError(f"deployment format {fmt!r} is not one of {', '.join(DEPLOY_FORMATS)}")
    require_dependencies(fmt)
    output = require_file_path(output)  # before the export, not at the rename that ends it
    model = model.cpu().float().eval()
    metadata = deployment_metadata(cfg, model.num_classes, class_names)
    height, width = test_output_size(cfg)
    # Batch 2: exporters treat sizes 0 and 1 as constants, so a batch of 1 would fix the batch size.
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with portable_kernels(), torch.no_grad(), _quiet_exporters():
        data = _WRITERS[fmt](model, example, metadata)
    # Verified under a temporary name beside `output`: a file that fails never replaces one already there.
    candidate = output.with_name(f".{output.stem}.verifying{output.suffix}")
    atomic_write_bytes(candidate, data)
    try:
        diff = _verify(model, fmt, candidate, metadata, (height, width))
        if not diff <= MAX_ABS_DIFF:  # NaN fails too
            raise UserError(
                f"{os.fspath(output)}: the {fmt} file's logits differ from the model's by {diff:.3g} "
                f"(more than {MAX_ABS_DIFF:g}), so it was not written; please report this as a bug"
            )
        os.replace(candidate, output)
    finally:
        candidate.unlink(missing_ok=True)
    log.info("verified %s: %s logits within %.3g of the model's (batches of %s at %dx%d)", output, fmt, diff,
             " and ".join(map(str, VERIFY_BATCHES)), height, width)
    return diff


def _verify(model: nn.Module, fmt: str, path: str | os.PathLike, metadata: dict[str, str], size: tuple[int, int]) -> float:
    """The largest absolute difference of the file's logits from the eager model's, on random batches."""
    run, stored = read_deployed(path, fmt)
    if stored != metadata:
        raise UserError(f"{os.fspath(path)}: the metadata read back differs from what was written; please report this as a bug")
    generator = torch.Generator().manual_seed(1)
    diff = 0.0
    with torch.inference_mode():
        for batch in VERIFY_BATCHES:
            images = torch.randn(batch, 3, *size, generator=generator)
            got, expected = run(images), model(images)
            if got.shape != expected.shape:
                return float("inf")
            diff = max(diff, (got.float() - expected.float()).abs().max().item())
    return diff

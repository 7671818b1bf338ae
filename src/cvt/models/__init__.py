"""The CvT network: `spec` (the architecture as data, no torch), `zoo` (the published checkpoints as
data, no torch), `kernels` (how it computes per device), `cvt` (blocks, network, `create_model`, timm's
registry), `convert` (foreign checkpoint layouts), `detection` (a backbone for torchvision's detectors).

Names are resolved on first use, so importing `cvt.models.spec` does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConvolutionalVisionTransformer": "cvt",
    "create_model": "cvt",
    "CvtSpec": "spec",
    "list_models": "spec",
    "model_spec": "spec",
    "checkpoint_filter_fn": "convert",
    "detection_backbone": "detection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

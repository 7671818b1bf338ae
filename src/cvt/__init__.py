"""CvT: Convolutional vision Transformers, the published models with their whole training system.

The API is resolved on first use (PEP 562), so `import cvt` and the command line's help do not load
torch until a name that needs it is touched.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import UserError

__version__ = "0.1.0"

_EXPORTS = {
    "ConvolutionalVisionTransformer": "cvt.models.cvt",
    "create_model": "cvt.models.cvt",
    "CvtSpec": "cvt.models.spec",
    "list_models": "cvt.models.spec",
    "Checkpoint": "cvt.weights.read",
    "read_checkpoint": "cvt.weights.read",
    "load_checkpoint": "cvt.weights.load",
    "model_from_checkpoint": "cvt.weights.load",
    "save_hf": "cvt.weights.export",
    "save_official": "cvt.weights.export",
    "save_safetensors": "cvt.weights.export",
    "Predictor": "cvt.predict",
}

__all__ = [
    "Checkpoint",
    "ConvolutionalVisionTransformer",
    "CvtSpec",
    "UserError",
    "__version__",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_from_checkpoint",
    "Predictor",
    "read_checkpoint",
    "save_hf",
    "save_official",
    "save_safetensors",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

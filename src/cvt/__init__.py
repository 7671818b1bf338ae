"""CvT: Convolutional vision Transformers, the published models with their whole training system.

The API is resolved on first use (PEP 562), so `import cvt` and the command line's help do not load
torch until a name that needs it is touched.

timm: `import cvt` registers the architectures and the published checkpoints in timm's registry
(`timm.create_model('cvt_13.ms_in1k', pretrained=True)`) at once when timm is loaded already, else the
moment timm is imported (an import hook), so that registering never loads torch for a program that
does not use timm. `import cvt.models.cvt` registers them too.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .errors import UserError

__version__ = "0.1.0"

_EXPORTS = {
    "ConvolutionalVisionTransformer": "cvt.models.cvt",
    "create_model": "cvt.weights.load",
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
    "detection_backbone": "cvt.models.detection",
}

__all__ = [
    "Checkpoint",
    "ConvolutionalVisionTransformer",
    "CvtSpec",
    "UserError",
    "__version__",
    "create_model",
    "detection_backbone",
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


_TIMM_MODELS = "cvt.models.cvt"  # registers its entrypoints with timm when imported


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Imports `_TIMM_MODELS` right after timm's own import finishes, then removes itself."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # whichever finder provides timm (path entries, editable installs, zips)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            loader_exec(module)
            # Already importing (our model module imported timm first): it registers when it finishes.
            importlib.import_module(_TIMM_MODELS)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    importlib.import_module(_TIMM_MODELS)
elif not any(isinstance(finder, _RegisterWhenTimmLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())

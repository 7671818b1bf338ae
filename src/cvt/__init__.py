"""CvT: Convolutional vision Transformers, the published models with their whole training system."""
from .errors import UserError
from .interop.checkpoint import (
    Checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_official,
    save_safetensors,
)
from .interop.hf import save_hf
from .models import ConvolutionalVisionTransformer, CvtSpec, create_model, list_models

__version__ = "0.1.0"

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
    "read_checkpoint",
    "save_hf",
    "save_official",
    "save_safetensors",
]

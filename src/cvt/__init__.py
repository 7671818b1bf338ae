"""CvT: Convolutional vision Transformers, the published models with their whole training system."""
from .errors import UserError
from .models import ConvolutionalVisionTransformer, CvtSpec, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "ConvolutionalVisionTransformer",
    "CvtSpec",
    "UserError",
    "create_model",
    "list_models",
    "__version__",
]

from .cvt import (
    ConvolutionalVisionTransformer,
    CvtSpec,
    checkpoint_filter_fn,
    create_model,
    list_models,
    model_spec,
)

__all__ = [
    "ConvolutionalVisionTransformer",
    "CvtSpec",
    "checkpoint_filter_fn",
    "create_model",
    "list_models",
    "model_spec",
]

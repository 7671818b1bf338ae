"""Model size and cost: parameters and multiply-adds (what the CvT paper calls GFLOPs)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError
from .cvt import create_model
from .spec import CvtSpec


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_gmacs(model: nn.Module, image_size: tuple[int, int]) -> float:
    """Multiply-adds (in billions) of one eval-mode forward pass on one image.

    Counts convolutions, linears and attention (torch's flop counter reports 2 FLOPs per
    multiply-add); normalisation and activations are left out, as in the paper's table.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, *image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def model_summary(
    spec: str | Mapping[str, Any] | CvtSpec, num_classes: int = 1000, image_size: tuple[int, int] = (224, 224)
) -> dict[str, Any]:
    """Parameters, GMACs at `image_size` (height, width), and the stages' widths, depths and strides.

    Built on the meta device: shapes only, no memory for weights and no arithmetic."""
    with torch.device("meta"):
        model = create_model(spec, num_classes=num_classes)
    min_size = model.spec.min_input_size()
    if min(image_size) < min_size:
        raise UserError(f"image size {min(image_size)} is too small for this model's strides; use at least {min_size}")
    return {
        "image_size": list(image_size),
        "params": count_params(model),
        "gmacs": round(count_gmacs(model, image_size), 3),
        "widths": [f["num_chs"] for f in model.feature_info],
        "depths": list(model.spec.depth),
        "strides": [f["reduction"] for f in model.feature_info],
    }

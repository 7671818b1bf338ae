"""Model size and cost: parameters and multiply-adds (what the CvT paper calls GFLOPs)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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

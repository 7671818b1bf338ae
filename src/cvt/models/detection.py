"""CvT as a backbone for torchvision's detection and segmentation models (Faster/Mask R-CNN, RetinaNet).

torchvision's models take a module with an ``out_channels`` attribute whose forward returns an ordered
dict of feature maps. `detection_backbone` gives that: the three stage maps (strides 4, 8, 16 for the
published spec) through a feature pyramid, plus two coarser levels (strides 32 and 64), so the five
levels match torchvision's default anchor sizes (32 to 512 pixels).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .cvt import ConvolutionalVisionTransformer

__all__ = ["CvtFpnBackbone", "detection_backbone"]


class CvtFpnBackbone(nn.Module):
    """The stage maps of `body` through a feature pyramid with `out_channels` channels per level."""

    def __init__(self, body: ConvolutionalVisionTransformer, out_channels: int = 256) -> None:
        super().__init__()
        body.prune_intermediate_layers(body.num_stages, prune_norm=True)  # no final norm, no head
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [info["num_chs"] for info in body.feature_info], out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def detection_backbone(model: ConvolutionalVisionTransformer, out_channels: int = 256) -> CvtFpnBackbone:
    """A torchvision detection backbone from a CvT (pretrained or not); its head and final norm are dropped.

    ``FasterRCNN(detection_backbone(cvt.create_model('cvt-13', pretrained=True)), num_classes=91)``
    """
    return CvtFpnBackbone(model, out_channels)

"""torch.hub entry points: ``torch.hub.load('<owner>/cvt', 'cvt_13', pretrained=True)``.

One entry point per published checkpoint (the tag with '_' for '-': cvt_13, cvt_13_384, cvt_13_384_22k,
cvt_21, cvt_21_384, cvt_21_384_22k, cvt_w24_384_22k). The weights come from the Hugging Face hub
through `cvt.create_model`; keyword arguments go to it (num_classes, act, drop_path_rate, ...).
"""
import pathlib
import sys

dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors", "yacs", "yaml"]

# torch.hub imports this file from the repository root; the package lives under src/. Every public
# callable here is an entry point to torch.hub.list, so nothing but the entry points is imported bare.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "src"))

import cvt  # noqa: E402
from cvt.models.zoo import PUBLISHED  # noqa: E402


def _entry_point(tag: str):
    def load(pretrained: bool = False, **kwargs):
        return cvt.create_model(tag, pretrained=pretrained, **kwargs)

    weights = PUBLISHED[tag]
    load.__name__ = tag.replace("-", "_")
    load.__doc__ = (
        f"CvT {weights.variant[4:].upper()} at {weights.image_size}x{weights.image_size}, ImageNet-1k top-1 {weights.top1}% "
        f"(weights: {weights.repo}). pretrained=True loads them."
    )
    return load


for _tag in PUBLISHED:
    globals()[_tag.replace("-", "_")] = _entry_point(_tag)

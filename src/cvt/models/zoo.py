"""The seven published checkpoints as data: their tags, Hugging Face copies, test transforms and the
top-1 the paper reports. No torch here: the config, the command line and timm's registry read it.

Every tag runs QuickGELU: the hub copies are the release's checkpoints, converted by transformers'
conversion script, so they were trained with QuickGELU whatever transformers' port computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError

__all__ = [
    "CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "PUBLISHED", "PublishedWeights", "find_published", "name_key",
    "published_weights", "repo_tag",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3  # PIL's code, as TEST.INTERPOLATION takes it
# The centre-crop ratio of the release's 224 tests (and of most ImageNet evaluations).
CROP_PCT = 0.875


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint: where its copy lives and how the release tested it."""

    tag: str  # cvt's name
    timm_name: str  # 'architecture.pretrained_tag' in timm's registry
    repo: str  # Hugging Face hub repo
    variant: str  # architecture (cvt.models.spec)
    image_size: int
    center_crop: bool  # resize to size/0.875 and crop (224), or resize straight to size x size (384)
    top1: float  # ImageNet-1k top-1 (%) in the paper
    experiment: str  # the packaged experiment file with this architecture and test transform
    act: str = "quick_gelu"

    def eval_settings(self) -> dict[str, Any]:
        """The test transform as config values (the form `cvt.data.transforms.eval_transform_settings` gives)."""
        return {
            "TEST.IMAGE_SIZE": [self.image_size, self.image_size],
            "TEST.CENTER_CROP": self.center_crop,
            "TEST.INTERPOLATION": BICUBIC,
            "INPUT.MEAN": list(IMAGENET_MEAN),
            "INPUT.STD": list(IMAGENET_STD),
        }


def _weights(tag: str, timm_name: str, size: int, top1: float) -> PublishedWeights:
    variant = "-".join(tag.split("-")[:2])
    return PublishedWeights(
        tag=tag, timm_name=timm_name, repo=f"microsoft/{tag}", variant=variant, image_size=size,
        center_crop=size < 384, top1=top1, experiment=f"{variant}-{size}x{size}",
    )


PUBLISHED: dict[str, PublishedWeights] = {
    w.tag: w
    for w in (
        _weights("cvt-13", "cvt_13.ms_in1k", 224, 81.6),
        _weights("cvt-13-384", "cvt_13.ms_in1k_384", 384, 83.0),
        _weights("cvt-13-384-22k", "cvt_13.ms_in22k_ft_in1k_384", 384, 83.3),
        _weights("cvt-21", "cvt_21.ms_in1k", 224, 82.5),
        _weights("cvt-21-384", "cvt_21.ms_in1k_384", 384, 83.3),
        _weights("cvt-21-384-22k", "cvt_21.ms_in22k_ft_in1k_384", 384, 84.9),
        _weights("cvt-w24-384-22k", "cvt_w24.ms_in22k_ft_in1k_384", 384, 87.6),
    )
}


def name_key(name: str) -> str:
    """How model names and tags are looked up: any case, '_' for '-' (timm writes cvt_13)."""
    return name.lower().replace("_", "-")


def find_published(name: str) -> PublishedWeights | None:
    """The published checkpoint `name` is the tag of, or None."""
    return PUBLISHED.get(name_key(name))


def published_weights(tag: str) -> PublishedWeights:
    """The published checkpoint `tag` names, or a UserError listing the tags."""
    found = find_published(tag)
    if found is None:
        raise UserError(f"unknown pretrained tag {tag!r}; choose one of {', '.join(PUBLISHED)}")
    return found


def repo_tag(repo: str) -> PublishedWeights | None:
    """The published checkpoint whose hub copy `repo` is, or None (any other repo)."""
    return next((w for w in PUBLISHED.values() if w.repo.lower() == repo.lower()), None)

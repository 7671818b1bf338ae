"""Image transforms, as the release builds them from the config.

Training takes one of two paths, chosen as the release does:

* AUG.TIMM_AUG.USE_LOADER or USE_TRANSFORM: timm's `create_transform` (RandAugment, random erasing,
  colour jitter, flips), the CvT-13 recipe;
* FINETUNE.FINETUNE with FINETUNE.USE_TRAIN_AUG false: resize to (size + 32) squared, random crop,
  horizontal flip (the release's fine-tuning augmentation);
* otherwise the plain path: RandomResizedCrop, horizontal flip, optional colour jitter, grayscale and
  Gaussian blur, the CvT-21 recipe.

Testing resizes the shorter side to size / 0.875 and centre-crops (TEST.CENTER_CROP true), or resizes
straight to the test size (the 384 files). IMAGE_SIZE is [width, height], as in the release.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment, create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from yacs.config import CfgNode

from ..config import PIL_INTERPOLATIONS, config_value
from ..errors import UserError
from ..models.zoo import CROP_PCT

__all__ = [
    "EVAL_TRANSFORM_KEYS",
    "RandomGaussianBlur",
    "build_transform",
    "eval_transform_settings",
    "interpolation_mode",
    "posterize_any_bits",
    "test_output_size",
    "train_output_size",
]


# The config keys the test transform reads. Exported weights carry their values, so that `cvt predict`
# preprocesses images as the model was evaluated without the experiment file.
EVAL_TRANSFORM_KEYS = ("TEST.IMAGE_SIZE", "TEST.CENTER_CROP", "TEST.INTERPOLATION", "INPUT.MEAN", "INPUT.STD")

Transform = Callable[[Image.Image], torch.Tensor]


def interpolation_mode(code: int, key: str) -> InterpolationMode:
    """torchvision's mode for a PIL integer code; `key` names the config key in the error."""
    try:
        return InterpolationMode(PIL_INTERPOLATIONS[int(code)])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{key}: unknown interpolation {code!r}; use a PIL code: 2 bilinear, 3 bicubic "
            "(0 nearest, 1 lanczos, 4 box, 5 hamming)"
        ) from None


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from `sigma` for each image (the release's)."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        # torch's generator, so DataLoader worker seeding covers it like every other transform.
        radius = torch.empty(()).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def test_output_size(cfg: CfgNode) -> tuple[int, int]:
    """(height, width) of the test transform's images."""
    width, height = cfg.TEST.IMAGE_SIZE[0], cfg.TEST.IMAGE_SIZE[1]
    if cfg.TEST.CENTER_CROP:
        return width, width  # the release crops a square of IMAGE_SIZE[0]
    return height, width


def train_output_size(cfg: CfgNode) -> tuple[int, int]:
    """(height, width) of the training transform's images: every training path crops a square of
    TRAIN.IMAGE_SIZE[0], as the release does."""
    size = int(cfg.TRAIN.IMAGE_SIZE[0])
    return size, size


def test_resize_size(cfg: CfgNode) -> int | tuple[int, int]:
    """What the test transform resizes to: the shorter side IMAGE_SIZE[0] / CROP_PCT before a centre crop,
    else (height, width) straight."""
    return int(cfg.TEST.IMAGE_SIZE[0] / CROP_PCT) if cfg.TEST.CENTER_CROP else test_output_size(cfg)


def eval_transform_settings(cfg: CfgNode) -> dict[str, Any]:
    """{key: value} of `EVAL_TRANSFORM_KEYS` in `cfg`, as plain JSON values."""
    return {key: config_value(cfg, key) for key in EVAL_TRANSFORM_KEYS}


def build_transform(cfg: CfgNode, is_train: bool) -> Transform:
    """PIL RGB image -> normalised float tensor (3, H, W), for training or for testing."""
    normalize = T.Normalize(mean=list(cfg.INPUT.MEAN), std=list(cfg.INPUT.STD))
    if is_train:
        timm_aug = cfg.AUG.TIMM_AUG
        if timm_aug.USE_LOADER or timm_aug.USE_TRANSFORM:
            return _timm_train_transform(cfg)
        if cfg.FINETUNE.FINETUNE and not cfg.FINETUNE.USE_TRAIN_AUG:
            return _finetune_train_transform(cfg, normalize)
        return _plain_train_transform(cfg, normalize)

    interpolation = interpolation_mode(cfg.TEST.INTERPOLATION, "TEST.INTERPOLATION")
    steps: list[Callable] = [T.Resize(test_resize_size(cfg), interpolation=interpolation)]
    if cfg.TEST.CENTER_CROP:
        steps.append(T.CenterCrop(test_output_size(cfg)))
    return T.Compose([*steps, T.ToTensor(), normalize])


def posterize_any_bits(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize op, also for 0 bits kept: a black image, as Pillow before 13 gave.

    RandAugment's 'inc1' posterize keeps 4 - int(4 * magnitude / 10) bits, so 0 at magnitude 10,
    which the recipe's m9 with mstd0.5 reaches for about 2% of draws. Pillow 13 refuses 0 bits
    with a ValueError, which would crash the data loader.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _patch_posterize(transform: T.Compose) -> None:
    """Give this transform's auto-augment ops `posterize_any_bits` in place of timm's posterize."""
    for step in transform.transforms:
        ops = list(getattr(step, "ops", []))  # RandAugment, AugMixAugment
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]  # AutoAugment
        for op in ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_any_bits


def _timm_train_transform(cfg: CfgNode) -> Transform:
    try:
        transform = _create_timm_transform(cfg)
    except (AssertionError, KeyError, ValueError) as e:
        # The config validates the names and numbers timm takes (cvt.config); what it cannot check is
        # an AUTO_AUGMENT policy's options, which timm refuses with an assertion.
        policy = cfg.AUG.TIMM_AUG.AUTO_AUGMENT
        fix = (f"fix AUG.TIMM_AUG.AUTO_AUGMENT {policy!r}'s options (e.g. 'rand-m9-mstd0.5-inc1'; timm's RandAugment, "
               "AugMix, AutoAugment)" if policy else "check the AUG.TIMM_AUG settings against timm's create_transform")
        raise UserError(f"AUG.TIMM_AUG: timm cannot build the training transform ({e or type(e).__name__}); {fix}") from None
    _patch_posterize(transform)
    return transform


def _create_timm_transform(cfg: CfgNode) -> T.Compose:
    aug, timm_aug = cfg.AUG, cfg.AUG.TIMM_AUG
    return create_transform(
        input_size=cfg.TRAIN.IMAGE_SIZE[0],
        is_training=True,
        scale=tuple(aug.SCALE),
        ratio=tuple(aug.RATIO),
        hflip=timm_aug.HFLIP,
        vflip=timm_aug.VFLIP,
        color_jitter=timm_aug.COLOR_JITTER,
        auto_augment=timm_aug.AUTO_AUGMENT or None,
        interpolation=timm_aug.INTERPOLATION,
        re_prob=timm_aug.RE_PROB,
        re_mode=timm_aug.RE_MODE,
        re_count=timm_aug.RE_COUNT,
        # Split batch-norm augmentation (AugMix splits) is not part of the recipe.
        re_num_splits=0,
        mean=tuple(cfg.INPUT.MEAN),
        std=tuple(cfg.INPUT.STD),
    )


def _finetune_train_transform(cfg: CfgNode, normalize: T.Normalize) -> Transform:
    """The release's light fine-tuning augmentation: a square resize 32 pixels above the crop, a random
    crop and a horizontal flip."""
    crop = cfg.TRAIN.IMAGE_SIZE[0]
    return T.Compose([
        T.Resize((crop + 32, crop + 32), interpolation=interpolation_mode(cfg.AUG.INTERPOLATION, "AUG.INTERPOLATION")),
        T.RandomCrop((crop, crop)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ])


def _plain_train_transform(cfg: CfgNode, normalize: T.Normalize) -> Transform:
    aug = cfg.AUG
    steps: list[Callable] = [
        T.RandomResizedCrop(
            cfg.TRAIN.IMAGE_SIZE[0],
            scale=tuple(aug.SCALE),
            ratio=tuple(aug.RATIO),
            interpolation=interpolation_mode(aug.INTERPOLATION, "AUG.INTERPOLATION"),
        ),
        T.RandomHorizontalFlip(),
    ]
    jitter = list(aug.COLOR_JITTER)  # five numbers, as validated: four strengths, then the probability
    if jitter[4] > 0:
        steps.append(T.RandomApply([T.ColorJitter(*jitter[:4])], p=jitter[4]))
    if aug.GRAY_SCALE > 0:
        steps.append(T.RandomGrayscale(p=aug.GRAY_SCALE))
    if aug.GAUSSIAN_BLUR > 0:
        steps.append(T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=aug.GAUSSIAN_BLUR))
    steps += [T.ToTensor(), normalize]
    return T.Compose(steps)

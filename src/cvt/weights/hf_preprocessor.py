"""The test transform as Hugging Face's ``preprocessor_config.json`` says it, both ways.

transformers' CvT checkpoints preprocess with ConvNextImageProcessor: below 384 px it resizes the
shortest edge to size / crop_pct and centre-crops a size x size square; from 384 px on it resizes to
size x size. Files this project writes also hold its exact settings under their own key.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..models.zoo import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["EVAL_TRANSFORM_KEY", "PREPROCESSOR_FILE", "eval_settings_from_hf_preprocessor", "hf_preprocessor_config"]

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
_HF_PROCESSOR = "ConvNextImageProcessor"
EVAL_TRANSFORM_KEY = "cvt_eval_transform"
_HF_CROP_FROM = 384


def hf_preprocessor_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json`` for the test transform `settings` (see
    ``cvt.data.transforms.eval_transform_settings``), as close as transformers' processor can say it."""
    width, height = settings["TEST.IMAGE_SIZE"]
    size, crop = width, settings["TEST.CENTER_CROP"]
    if (not crop and width != height) or crop != (size < _HF_CROP_FROM):
        log.warning(
            "transformers' image processor cannot express this test transform (TEST.IMAGE_SIZE %s, "
            "TEST.CENTER_CROP %s) exactly: AutoImageProcessor will %s; cvt reads the exact settings",
            [width, height], crop, "crop a square" if size < _HF_CROP_FROM else "resize without cropping",
        )
    return {
        "image_processor_type": _HF_PROCESSOR,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "crop_pct": CROP_PCT if crop else 1.0,
        "resample": settings["TEST.INTERPOLATION"],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(settings["INPUT.MEAN"]),
        "image_std": list(settings["INPUT.STD"]),
        EVAL_TRANSFORM_KEY: dict(settings),
    }


def eval_settings_from_hf_preprocessor(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The test transform settings a ``preprocessor_config.json`` describes, or None when this
    project's transform cannot reproduce it."""
    if not isinstance(config, Mapping):
        return None
    if isinstance(config.get(EVAL_TRANSFORM_KEY), Mapping):
        return dict(config[EVAL_TRANSFORM_KEY])
    # Older files (Microsoft's hub folders among them) name a feature extractor and give size as an int.
    kind = config.get("image_processor_type") or config.get("feature_extractor_type")
    size = config.get("size")
    size = size.get("shortest_edge") if isinstance(size, Mapping) else size
    if kind not in (_HF_PROCESSOR, "ConvNextFeatureExtractor") or not isinstance(size, int):
        return None
    if not config.get("do_normalize", True):
        return None
    crop_pct = config.get("crop_pct", CROP_PCT)
    if not isinstance(crop_pct, (int, float)):
        return None
    if size < _HF_CROP_FROM and abs(crop_pct - CROP_PCT) > 1e-6:
        return None  # a crop other than the release's 0.875
    return {
        "TEST.IMAGE_SIZE": [size, size],
        "TEST.CENTER_CROP": size < _HF_CROP_FROM,
        "TEST.INTERPOLATION": int(config.get("resample", 3)),
        "INPUT.MEAN": list(config.get("image_mean", IMAGENET_MEAN)),
        "INPUT.STD": list(config.get("image_std", IMAGENET_STD)),
    }


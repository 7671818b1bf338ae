"""The CvT architecture as data: the release's MODEL.SPEC, the published variants, and the names the
model accepts. No torch here, so the config and the command line can use it without loading torch.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import UserError
from .zoo import PUBLISHED, find_published, name_key

__all__ = ["ACTIVATIONS", "INIT_METHODS", "PROJECTION_METHODS", "CvtSpec", "check_activation", "list_models", "model_spec"]

# The MLP activation: 'quick_gelu' as the release trained its weights, 'gelu' as transformers' port runs.
ACTIVATIONS = ("quick_gelu", "gelu")
PROJECTION_METHODS = ("dw_bn", "avg", "linear")
INIT_METHODS = ("trunc_norm", "xavier")


def check_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise UserError(f"activation {act!r} must be 'quick_gelu' (the published weights) or 'gelu' (trained in transformers)")
    return act


@dataclass(frozen=True)
class CvtSpec:
    """The architecture, with the release's MODEL.SPEC keys (lower-cased here, upper-case in YAML)."""

    num_stages: int = 3
    patch_size: tuple[int, ...] = (7, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2)
    patch_padding: tuple[int, ...] = (2, 1, 1)
    dim_embed: tuple[int, ...] = (64, 192, 384)
    num_heads: tuple[int, ...] = (1, 3, 6)
    depth: tuple[int, ...] = (1, 2, 10)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 4.0)
    attn_drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.1)
    qkv_bias: tuple[bool, ...] = (True, True, True)
    cls_token: tuple[bool, ...] = (False, False, True)
    pos_embed: tuple[bool, ...] = (False, False, False)
    qkv_proj_method: tuple[str, ...] = ("dw_bn", "dw_bn", "dw_bn")
    kernel_qkv: tuple[int, ...] = (3, 3, 3)
    padding_kv: tuple[int, ...] = (1, 1, 1)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    padding_q: tuple[int, ...] = (1, 1, 1)
    stride_q: tuple[int, ...] = (1, 1, 1)
    init: str = "trunc_norm"

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> CvtSpec:
        """Build from a MODEL.SPEC mapping (upper- or lower-case keys); missing keys keep defaults."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in spec.items():
            name = key.lower()
            if name not in known:
                raise UserError(
                    f"unknown MODEL.SPEC key {key!r}; valid keys: {', '.join(sorted(k.upper() for k in known))}"
                )
            values[name] = value if name in ("num_stages", "init") else tuple(value)
        return cls(**values).validated()

    def to_dict(self) -> dict[str, Any]:
        """The spec with the release's upper-case keys and YAML-friendly lists."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name.upper()] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> CvtSpec:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CvtSpec(**values).validated()

    def validated(self) -> CvtSpec:
        n = self.num_stages
        if n < 1:
            raise UserError(f"MODEL.SPEC.NUM_STAGES must be >= 1, got {n}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and len(value) != n:
                raise UserError(
                    f"MODEL.SPEC.{f.name.upper()} has {len(value)} entries but NUM_STAGES is {n}; give one per stage"
                )
        for i in range(n):
            dim, heads = self.dim_embed[i], self.num_heads[i]
            if heads < 1 or dim % heads:
                raise UserError(
                    f"MODEL.SPEC.NUM_HEADS[{i}]={heads} does not divide DIM_EMBED[{i}]={dim}; "
                    "pick a head count that divides the stage width"
                )
            if self.qkv_proj_method[i] not in PROJECTION_METHODS:
                raise UserError(
                    f"MODEL.SPEC.QKV_PROJ_METHOD[{i}]={self.qkv_proj_method[i]!r} is not one of {PROJECTION_METHODS}"
                )
            if self.pos_embed[i]:
                raise UserError(
                    "MODEL.SPEC.POS_EMBED is true but CvT has no positional embedding (the published models "
                    "set it false everywhere); set POS_EMBED to false"
                )
            if self.cls_token[i] and i != n - 1:
                raise UserError(
                    f"MODEL.SPEC.CLS_TOKEN[{i}] is true but only the last stage may carry a cls token"
                )
            if self.depth[i] < 0 or self.dim_embed[i] < 1:
                raise UserError(f"MODEL.SPEC DEPTH and DIM_EMBED must be positive (stage {i})")
        if self.init not in INIT_METHODS:
            raise UserError(f"MODEL.SPEC.INIT={self.init!r} must be one of {INIT_METHODS}")
        return self

    def min_input_size(self) -> int:
        """The smallest square image for which every stage still has at least one token."""
        size = 1
        for k, s, p in reversed(list(zip(self.patch_size, self.patch_stride, self.patch_padding))):
            size = (size - 1) * s + k - 2 * p
            size = max(size, 1)
        return size


_VARIANTS: dict[str, CvtSpec] = {
    "cvt-13": CvtSpec(depth=(1, 2, 10)),
    "cvt-21": CvtSpec(depth=(1, 4, 16)),
    "cvt-w24": CvtSpec(
        dim_embed=(192, 768, 1024), num_heads=(3, 12, 16), depth=(2, 2, 20), drop_path_rate=(0.0, 0.0, 0.3)
    ),
}


def list_models(pretrained: bool = False) -> list[str]:
    """Architecture names accepted by :func:`create_model`; with `pretrained`, the tags of the published
    checkpoints instead (``create_model(tag, pretrained=True)``)."""
    return list(PUBLISHED) if pretrained else sorted(_VARIANTS)


def model_spec(name: str) -> CvtSpec:
    """The architecture of a variant ('cvt-13') or of a published checkpoint's tag ('cvt-13-384-22k')."""
    published = find_published(name)
    key = published.variant if published else name_key(name)
    if key not in _VARIANTS:
        raise UserError(
            f"unknown model {name!r}; choose one of {', '.join(list_models())}, a pretrained tag "
            f"({', '.join(list_models(pretrained=True))}) or pass a MODEL.SPEC dict"
        )
    return _VARIANTS[key]

"""CvT: Convolutional vision Transformers (Wu et al., 2021, arXiv 2103.15808).

Top to bottom: the building blocks, the network, `create_model`. The architecture as data (`CvtSpec`,
the variants) is in `spec.py`, how each op is computed per device in `kernels.py`, and the foreign
checkpoint layouts in `convert.py`.

The parameter layout and names equal the published release's state dicts, so official weights load
with no key conversion. The arithmetic equals the release's in fp32 eval mode to float rounding; the
speed comes from how it is computed, never from what:

* attention runs through ``scaled_dot_product_attention`` with the published scale (stage width ** -0.5,
  not head width), except in eager bf16 on CPU (see `kernels.attention`);
* QuickGELU ``y * sigmoid(1.702 y)`` equals ``silu(1.702 y) / 1.702``, so the two constants are folded
  into the weights of the linears around it and the activation is one fused SiLU;
* on CPU the token linears run as 1x1 convolutions of channels-last maps (`kernels.token_linear`);
* in eval mode, BatchNorm is folded into the depthwise convolution in front of it;
* in CPU training, BatchNorm sees dense channels-last maps and gradients (`kernels.dense_grad`,
  `kernels.depthwise_conv`);
* under ``torch.compile``, fp32 CPU training and CPU inference without inductor's freezing keep these
  layouts through ops opaque to the compiler, and that inference stores the residual stream and the
  projections' map once (`kernels.stored_once`);
* tokens (B, N, C) and maps (B, C, H, W) are views of one another in channels-last memory layout,
  so moving between them copies nothing;
* LayerNorm runs in float32 as published, without a round trip when the input already is float32.

benchmarks/RESULTS.md has the measured effect of each of these.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .convert import checkpoint_filter_fn
from .kernels import (
    attention, dense_grad, depthwise_conv, map_to_tokens, stored_once, to_autocast_dtype, token_linear, tokens_to_map,
    uses_cpu_kernels,
)
from .spec import CvtSpec, check_activation, model_spec
from .zoo import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, PUBLISHED, PublishedWeights

QUICK_GELU_ALPHA = 1.702

__all__ = ["ConvolutionalVisionTransformer", "create_model", "cvt_13", "cvt_21", "cvt_w24"]


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, as the published model does (eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout.

    With the published QuickGELU, ``fc2(y * sigmoid(a y))`` is computed as
    ``fc2'(silu(fc1'(x)))`` where fc1' is fc1 scaled by ``a`` and fc2' is fc2 scaled by ``1/a``:
    the same function, one fused activation kernel instead of three elementwise passes. The stored
    weights stay the published ones; only the (small) weight tensors are rescaled per call.
    """

    def __init__(self, dim: int, hidden_dim: int, act: str = "quick_gelu", drop: float = 0.0) -> None:
        super().__init__()
        check_activation(act)
        self.act = act
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "gelu":
            h = token_linear(x, self.fc1.weight, self.fc1.bias, "gelu")
            return self.drop(token_linear(self.drop(h), self.fc2.weight, self.fc2.bias))
        a = QUICK_GELU_ALPHA
        h = token_linear(x, self.fc1.weight * a, self.fc1.bias * a, "silu")
        return self.drop(token_linear(self.drop(h), self.fc2.weight * (1.0 / a), self.fc2.bias))


class ConvProjection(nn.Module):
    """Depthwise Conv2d + BatchNorm2d ('dw_bn'): the release's ``conv_proj_{q,k,v}``.

    In eval mode on the CPU kernels' path the BatchNorm is folded into the convolution (one pass over
    the map instead of two). Not on CUDA, where folding costs several small kernels per call and a step
    at common batch sizes is bound by kernel launches, not by passes over memory; nor inside
    `portable_kernels`, so exported graphs hold the BatchNorm (ONNX's exporter folds it itself).
    """

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim, bias=False)
        # The strides the weight's gradient comes with (the maps are channels-last): the same memory,
        # as its input-channel dimension has size 1, but DDP compares strides literally and would warn
        # "Grad strides do not match bucket view strides" on every rank.
        # (`.contiguous(memory_format=...)` would see nothing to change: size-1 dimensions do not count.)
        weight = self.conv.weight.data
        self.conv.weight.data = weight.as_strided(weight.shape, (weight.stride(0), 1, weight.stride(2), 1))
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.bn.track_running_stats or not uses_cpu_kernels(x):
            return self.bn(depthwise_conv(x, self.conv))
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        scale = bn.weight * inv_std if bn.affine else inv_std
        shift = bn.bias - bn.running_mean * scale if bn.affine else -bn.running_mean * scale
        weight = self.conv.weight * scale.to(self.conv.weight.dtype).view(-1, 1, 1, 1)
        return depthwise_conv(x, self.conv, weight, shift.to(weight.dtype))


def _build_projection(method: str, dim: int, kernel_size: int, stride: int, padding: int) -> nn.Module | None:
    if method == "dw_bn":
        return ConvProjection(dim, kernel_size, stride, padding)
    if method == "avg":
        return nn.AvgPool2d(kernel_size, stride, padding, ceil_mode=True)
    return None  # 'linear': the tokens go straight to the linear projection


class Attention(nn.Module):
    """Multi-head attention with convolutional projections of q, k and v.

    Scale is the whole stage width ** -0.5 (as published), not the head width.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        method: str = "dw_bn",
        kernel_size: int = 3,
        stride_kv: int = 2,
        stride_q: int = 1,
        padding_kv: int = 1,
        padding_q: int = 1,
        with_cls_token: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim**-0.5
        self.with_cls_token = with_cls_token
        self.attn_drop = attn_drop
        # 'avg' leaves q unprojected, as the release does.
        self.conv_proj_q = _build_projection("linear" if method == "avg" else method, dim, kernel_size, stride_q, padding_q)
        self.conv_proj_k = _build_projection(method, dim, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = _build_projection(method, dim, kernel_size, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _project(self, projection: nn.Module | None, cls: torch.Tensor | None, x_map: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if projection is None:
            return tokens if cls is None else torch.cat((cls, tokens), dim=1)
        if cls is None:
            return map_to_tokens(projection(x_map))
        return torch.cat((cls, map_to_tokens(dense_grad(projection(x_map)))), dim=1)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = to_autocast_dtype(x)  # one cast for the three projections below, not one each
        if self.with_cls_token:
            cls, tokens = x[:, :1], x[:, 1:]
        else:
            cls, tokens = None, x
        if cls is None and self.conv_proj_q is None and self.conv_proj_k is None:
            q_in = k_in = v_in = x  # all-'linear': no convolution at all (the release crashes here)
        else:
            # The convolutions want a dense channels-last map: a view of the tokens without a cls
            # token; with one, a single copy here rather than one inside each of the three convolutions.
            x_map = stored_once(tokens_to_map(tokens, height, width).contiguous(memory_format=torch.channels_last))
            q_in = self._project(self.conv_proj_q, cls, x_map, tokens)
            k_in = self._project(self.conv_proj_k, cls, x_map, tokens)
            v_in = self._project(self.conv_proj_v, cls, x_map, tokens)
        q = self._split_heads(token_linear(q_in, self.proj_q.weight, self.proj_q.bias))
        k = self._split_heads(token_linear(k_in, self.proj_k.weight, self.proj_k.bias))
        v = self._split_heads(token_linear(v_in, self.proj_v.weight, self.proj_v.bias))
        out = attention(q, k, v, self.scale, self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).flatten(2)
        return self.proj_drop(token_linear(out, self.proj.weight, self.proj.bias))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        act: str,
        **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNormFp32(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNormFp32(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = stored_once(x + self.drop_path(self.attn(self.norm1(x), height, width)))
        return stored_once(x + self.drop_path(self.mlp(self.norm2(x))))


class ConvEmbed(nn.Module):
    """Convolutional token embedding: strided Conv2d, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride, padding)
        self.norm = LayerNormFp32(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> channels-last (B, C, H', W')."""
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        height, width = x.shape[-2:]
        tokens = self.norm(map_to_tokens(x).contiguous())
        return tokens_to_map(tokens, height, width)


class Stage(nn.Module):
    """One CvT stage: token embedding, optional cls token, blocks. Named ``stage{i}`` in the network."""

    def __init__(self, spec: CvtSpec, index: int, in_chans: int, act: str) -> None:
        super().__init__()
        i, dim = index, spec.dim_embed[index]
        self.patch_embed = ConvEmbed(in_chans, dim, spec.patch_size[i], spec.patch_stride[i], spec.patch_padding[i])
        self.pos_drop = nn.Dropout(spec.drop_rate[i])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token[i] else None
        drop_path_rates = torch.linspace(0, spec.drop_path_rate[i], spec.depth[i], device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim,
                spec.num_heads[i],
                spec.mlp_ratio[i],
                spec.qkv_bias[i],
                spec.drop_rate[i],
                spec.attn_drop_rate[i],
                rate,
                act,
                method=spec.qkv_proj_method[i],
                kernel_size=spec.kernel_qkv[i],
                stride_kv=spec.stride_kv[i],
                stride_q=spec.stride_q[i],
                padding_kv=spec.padding_kv[i],
                padding_q=spec.padding_q[i],
                with_cls_token=spec.cls_token[i],
            )
            for rate in drop_path_rates
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the channels-last feature map and the cls token (B, 1, C), if this stage has one."""
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        tokens = map_to_tokens(x)
        if self.cls_token is not None:
            # expand_as a (B, 1, C) view, not expand(B, ...): tracers record the batch size as a
            # tensor's shape, so an exported graph keeps it dynamic.
            tokens = torch.cat((self.cls_token.expand_as(tokens[:, :1]), tokens), dim=1)
        tokens = self.pos_drop(tokens)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                tokens = checkpoint(block, tokens, height, width, use_reentrant=False)
            else:
                tokens = block(tokens, height, width)
        cls = None
        if self.cls_token is not None:
            cls, tokens = tokens[:, :1], tokens[:, 1:]
        return tokens_to_map(tokens, height, width), cls


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


class ConvolutionalVisionTransformer(nn.Module):
    """CvT image classifier.

    Args:
        spec: the architecture (see :class:`CvtSpec`).
        num_classes: classes of the head; 0 for no head (``forward`` returns pooled features).
        in_chans: input image channels.
        act: ``'quick_gelu'`` as the release trained (every published checkpoint, hub copies included),
            ``'gelu'`` for weights trained in transformers.
        drop_path_rate: if given, replaces the last stage's DROP_PATH_RATE (the knob the recipes tune).
        grad_checkpointing: recompute block activations in backward to save memory.
        global_pool: timm's pooling before the head: 'token' (the cls token, the default where the
            last stage has one), 'avg' (the mean token, the default elsewhere) or '' (none).
    """

    def __init__(
        self,
        spec: CvtSpec | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        act: str = "quick_gelu",
        drop_path_rate: float | None = None,
        grad_checkpointing: bool = False,
        global_pool: str | None = None,
    ) -> None:
        super().__init__()
        spec = (spec or CvtSpec()).validated()
        if drop_path_rate is not None:
            spec = spec.replace(drop_path_rate=spec.drop_path_rate[:-1] + (float(drop_path_rate),))
        self.spec = spec
        self.num_classes = num_classes
        self.act = act
        self.num_stages = spec.num_stages
        self.num_features = spec.dim_embed[-1]
        self.feature_info = [
            {"num_chs": spec.dim_embed[i], "reduction": math.prod(spec.patch_stride[: i + 1]), "module": f"stage{i}"}
            for i in range(spec.num_stages)
        ]
        chans = in_chans
        for i in range(spec.num_stages):
            self.add_module(f"stage{i}", Stage(spec, i, chans, act))
            chans = spec.dim_embed[i]
        self.norm = LayerNormFp32(self.num_features)
        self.global_pool = self._pool_names[0]
        self._set_global_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(spec.init)
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def stages(self) -> list[Stage]:
        return [getattr(self, f"stage{i}") for i in range(self.num_stages)]

    @property
    def _pool_names(self) -> tuple[str, ...]:
        # timm's pooling names this model takes, its default first: the last stage's cls token where it
        # has one (the release's), else the mean token.
        return ("token", "avg", "") if self.stages[-1].cls_token is not None else ("avg", "")

    # --- init ------------------------------------------------------------------------------------

    def init_weights(self, method: str = "trunc_norm") -> None:
        """The release's init: Linear trunc-normal(.02) or xavier-uniform, zero biases; norms 1/0;
        the head trunc-normal(.02) with PyTorch's default bias (the release's init skips the head)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if method == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            _init_head(self.head)

    # --- timm-style API --------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stage{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_activation(self, act: str) -> None:
        """Switch every MLP between 'quick_gelu' (the release's) and 'gelu' (transformers'); the
        weights are the same tensors, only the function between them changes."""
        check_activation(act)
        self.act = act
        for module in self.modules():
            if isinstance(module, Mlp):
                module.act = act

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one, as the release builds it (trunc-normal .02
        weight, PyTorch's default uniform bias); with `global_pool`, also the pooling, as timm's:
        'token' (the cls token; only where the last stage has one), 'avg' (the mean token) or ''
        (none: `forward_head` keeps every token, as ``reset_classifier(0, '')`` asks)."""
        self._set_global_pool(global_pool)
        self.num_classes = num_classes
        if num_classes > 0:
            device, dtype = self.norm.weight.device, self.norm.weight.dtype
            self.head = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
            _init_head(self.head)
        else:
            self.head = nn.Identity()

    def _set_global_pool(self, global_pool: str | None) -> None:
        if global_pool is not None:
            if global_pool not in self._pool_names:
                raise ValueError(f"global_pool must be one of {self._pool_names} for this model, not {global_pool!r}")
            self.global_pool = global_pool

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract: the stage feature maps `indices` selects (None: all; n: the last n; a list:
        those, negative from the end) at strides 4, 8, 16 for the published spec, as (B, C, H, W)
        channels-last views ('NCHW') or (B, H, W, C) ('NHWC'); with `norm`, the last stage's map goes
        through the final LayerNorm. Returns the intermediates alone with `intermediates_only`, else
        ``(forward_features(x), intermediates)``; `stop_early` skips the stages after the last one taken,
        and then, as timm's hierarchical models, returns the last stage run's map in place of the final
        features (the final LayerNorm has the last stage's width).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', not {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        stages = self.stages[: max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates: list[torch.Tensor] = []
        cls = None
        for i, stage in enumerate(stages):
            x, cls = stage(x)
            if i in take_indices:
                feature = x
                if norm and i == self.num_stages - 1:
                    feature = tokens_to_map(self.norm(map_to_tokens(x)), *x.shape[-2:])
                intermediates.append(feature.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feature)
        if intermediates_only:
            return intermediates
        if len(stages) < self.num_stages:
            return x, intermediates
        return self._final_norm(x, cls), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one `indices` takes (and the norm, head), as timm's feature
        wrappers ask. As in timm's hierarchical models, dropping the last stage drops the final norm and
        the head too, whatever `prune_norm` and `prune_head` say (both have its width), and the features
        become the last kept stage's. Returns the absolute indices."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last_stage_pruned = max_index + 1 < self.num_stages
        for i in range(max_index + 1, self.num_stages):
            delattr(self, f"stage{i}")
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[: max_index + 1]
        self.num_features = self.feature_info[-1]["num_chs"]
        if self.global_pool not in self._pool_names:  # the cls token went with the last stage
            self.global_pool = self._pool_names[0]
        if prune_norm or last_stage_pruned:
            self.norm = nn.Identity()
        if prune_head or last_stage_pruned:
            self.reset_classifier(0)
        return take_indices

    def _final_norm(self, last_map: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        return self.norm(cls if cls is not None else map_to_tokens(last_map))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised features before pooling: (B, 1, C) cls token, or (B, H*W, C) tokens."""
        cls = None
        for stage in self.stages:
            x, cls = stage(x)
        return self._final_norm(x, cls)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, C) normalised features -> (B, num_classes) logits (or pooled (B, C)); with
        ``global_pool`` '' every token's, (B, N, num_classes) (or the features themselves)."""
        if self.global_pool:  # the cls token is the only token forward_features keeps where there is one
            x = x[:, 0] if x.shape[1] == 1 else x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_head(head: nn.Linear) -> None:
    """The release's head: trunc-normal(.02) weight; the bias keeps nn.Linear's own init,
    uniform(+-1/sqrt(fan_in)), drawn afresh so that a second init_weights call re-initialises it."""
    trunc_normal_(head.weight, std=0.02)
    bound = 1.0 / math.sqrt(head.in_features)
    nn.init.uniform_(head.bias, -bound, bound)


def create_model(
    name_or_spec: str | Mapping[str, Any] | CvtSpec = "cvt-13",
    num_classes: int = 1000,
    *,
    act: str = "quick_gelu",
    drop_path_rate: float | None = None,
    grad_checkpointing: bool = False,
    in_chans: int = 3,
    global_pool: str | None = None,
    **spec_overrides: Any,
) -> ConvolutionalVisionTransformer:
    """Build a CvT.

    Args:
        name_or_spec: ``'cvt-13'``, ``'cvt-21'``, ``'cvt-w24'``, a MODEL.SPEC dict with the release's
            upper-case keys, or a :class:`CvtSpec`.
        num_classes: head size (0: no head).
        act: ``'quick_gelu'`` (the release's, every published checkpoint) or ``'gelu'`` (trained in transformers).
        drop_path_rate: stochastic depth of the last stage (the release's DROP_PATH_RATE[-1]).
        grad_checkpointing: trade compute for activation memory in training.
        global_pool: timm's pooling before the head, 'token', 'avg' or '' (see the network's docstring).
        spec_overrides: any other spec field, lower-case (e.g. ``drop_rate=(0.1,) * 3``).
    """
    if isinstance(name_or_spec, CvtSpec):
        spec = name_or_spec
    elif isinstance(name_or_spec, str):
        spec = model_spec(name_or_spec)
    elif isinstance(name_or_spec, Mapping):
        spec = CvtSpec.from_dict(name_or_spec)
    else:
        raise TypeError(f"name_or_spec must be a name, a MODEL.SPEC dict or a CvtSpec, not {type(name_or_spec).__name__}")
    if spec_overrides:
        spec = spec.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_overrides.items()})
    return ConvolutionalVisionTransformer(
        spec, num_classes, in_chans=in_chans, act=act, drop_path_rate=drop_path_rate, grad_checkpointing=grad_checkpointing,
        global_pool=global_pool,
    )


# --------------------------------------------------------------------------------------------------
# timm's registry: `timm.create_model('cvt_13.ms_in1k', pretrained=True)` once this module is imported
# (`import cvt` sees to it when timm is imported; see cvt/__init__.py)
# --------------------------------------------------------------------------------------------------


def timm_pretrained_cfg(weights: PublishedWeights) -> dict[str, Any]:
    """timm's pretrained config of a published checkpoint: its hub repo, input size and test transform."""
    return {
        "hf_hub_id": weights.repo,
        "num_classes": 1000,
        "input_size": (3, weights.image_size, weights.image_size),
        # 224: resize the short side to size / 0.875, centre-crop; 384: resize straight to size x size.
        "crop_pct": CROP_PCT if weights.center_crop else 1.0,
        "crop_mode": "center" if weights.center_crop else "squash",
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "stage0.patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2103.15808",
    }


default_cfgs = generate_default_cfgs({w.timm_name: timm_pretrained_cfg(w) for w in PUBLISHED.values()})


def _create_for_timm(variant: str, pretrained: bool, drop_rate: float | None = None,
                     **kwargs: Any) -> ConvolutionalVisionTransformer:
    """timm's scalar `drop_rate` (which its train.py always passes, 0.0 by default) is every stage's
    DROP_RATE: the release's dropout after the patch embedding, the attention projection and the MLP."""
    spec = model_spec(variant)
    if drop_rate is not None:
        spec = spec.replace(drop_rate=(float(drop_rate),) * spec.num_stages)
    return build_model_with_cfg(
        ConvolutionalVisionTransformer,
        variant.replace("-", "_"),
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2), "feature_cls": "getter"},
        spec=spec,
        **kwargs,
    )


@register_model
def cvt_13(pretrained: bool = False, **kwargs: Any) -> ConvolutionalVisionTransformer:
    """CvT-13 (20M parameters), for timm."""
    return _create_for_timm("cvt-13", pretrained, **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs: Any) -> ConvolutionalVisionTransformer:
    """CvT-21 (32M parameters), for timm."""
    return _create_for_timm("cvt-21", pretrained, **kwargs)


@register_model
def cvt_w24(pretrained: bool = False, **kwargs: Any) -> ConvolutionalVisionTransformer:
    """CvT-W24 (277M parameters), for timm."""
    return _create_for_timm("cvt-w24", pretrained, **kwargs)

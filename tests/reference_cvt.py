"""A literal transcription of the published CvT's arithmetic (the release's lib/models/cls_cvt.py, in
eval and train mode), written plainly without any of the project's speed-ups. The equivalence tests
compare the project's model with it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvt.models.spec import CvtSpec


def ref_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The release's LayerNorm: computed in float32, cast back to the input dtype."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight, norm.bias, norm.eps).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class RefConvBn(nn.Module):
    def __init__(self, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, stride, padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def ref_projection(method: str, dim: int, kernel: int, stride: int, padding: int) -> nn.Module | None:
    if method == "dw_bn":
        return RefConvBn(dim, kernel, stride, padding)
    if method == "avg":
        return nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)
    return None


class RefAttention(nn.Module):
    def __init__(self, spec: CvtSpec, i: int) -> None:
        super().__init__()
        dim = spec.dim_embed[i]
        method = spec.qkv_proj_method[i]
        self.num_heads = spec.num_heads[i]
        self.scale = dim**-0.5  # the stage width, not the head width
        self.with_cls_token = spec.cls_token[i]
        k, skv, pkv = spec.kernel_qkv[i], spec.stride_kv[i], spec.padding_kv[i]
        self.conv_proj_q = ref_projection("linear" if method == "avg" else method, dim, k, spec.stride_q[i], spec.padding_q[i])
        self.conv_proj_k = ref_projection(method, dim, k, skv, pkv)
        self.conv_proj_v = ref_projection(method, dim, k, skv, pkv)
        self.proj_q = nn.Linear(dim, dim, bias=spec.qkv_bias[i])
        self.proj_k = nn.Linear(dim, dim, bias=spec.qkv_bias[i])
        self.proj_v = nn.Linear(dim, dim, bias=spec.qkv_bias[i])
        self.proj = nn.Linear(dim, dim)

    def _conv_tokens(self, projection: nn.Module | None, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if projection is None:
            return x
        b, n, c = x.shape
        x_map = x.permute(0, 2, 1).reshape(b, c, h, w)
        out = projection(x_map)
        return out.reshape(b, c, -1).permute(0, 2, 1)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.with_cls_token:
            cls, x = x[:, :1], x[:, 1:]
        q = self._conv_tokens(self.conv_proj_q, x, h, w)
        k = self._conv_tokens(self.conv_proj_k, x, h, w)
        v = self._conv_tokens(self.conv_proj_v, x, h, w)
        if self.with_cls_token:
            q, k, v = (torch.cat((cls, t), dim=1) for t in (q, k, v))
        b = q.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.num_heads, -1).permute(0, 2, 1, 3)

        q, k, v = heads(self.proj_q(q)), heads(self.proj_k(k)), heads(self.proj_v(v))
        scores = torch.einsum("bhld,bhtd->bhlt", q, k) * self.scale
        attn = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhlt,bhtd->bhld", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(b, out.shape[2], -1)
        return self.proj(out)


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, spec: CvtSpec, i: int, act: str) -> None:
        super().__init__()
        dim = spec.dim_embed[i]
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = RefAttention(spec, i)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = RefMlp(dim, int(dim * spec.mlp_ratio[i]), act)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(ref_layer_norm(self.norm1, x), h, w)
        return x + self.mlp(ref_layer_norm(self.norm2, x))


class RefEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim, eps=1e-5)


class RefStage(nn.Module):
    def __init__(self, spec: CvtSpec, i: int, in_chans: int, act: str) -> None:
        super().__init__()
        dim = spec.dim_embed[i]
        self.patch_embed = RefEmbed(in_chans, dim, spec.patch_size[i], spec.patch_stride[i], spec.patch_padding[i])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token[i] else None
        self.blocks = nn.ModuleList(RefBlock(spec, i, act) for _ in range(spec.depth[i]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.patch_embed.proj(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).permute(0, 2, 1)
        x = ref_layer_norm(self.patch_embed.norm, x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x, h, w)
        cls = None
        if self.cls_token is not None:
            cls, x = x[:, :1], x[:, 1:]
        return x.permute(0, 2, 1).reshape(b, c, h, w), cls


class RefCvt(nn.Module):
    def __init__(self, spec: CvtSpec, num_classes: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.num_stages = spec.num_stages
        chans = 3
        for i in range(spec.num_stages):
            self.add_module(f"stage{i}", RefStage(spec, i, chans, act))
            chans = spec.dim_embed[i]
        self.norm = nn.LayerNorm(chans, eps=1e-5)
        self.head = nn.Linear(chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = None
        for i in range(self.num_stages):
            x, cls = getattr(self, f"stage{i}")(x)
        if cls is not None:
            feats = ref_layer_norm(self.norm, cls).squeeze(1)
        else:
            b, c = x.shape[:2]
            feats = ref_layer_norm(self.norm, x.reshape(b, c, -1).permute(0, 2, 1)).mean(dim=1)
        return self.head(feats)


# --------------------------------------------------------------------------------------------------
# Fixtures: a fast model and its reference with one random, non-trivial state dict
# --------------------------------------------------------------------------------------------------

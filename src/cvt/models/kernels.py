"""How the CvT network computes, per device: the token linears, attention and the layout views.

One predicate, `uses_cpu_kernels`, chooses the device's path, and one, `cpu_has_amx`, what on the CPU
depends on its instruction sets. On CPU: oneDNN 1x1 convolutions of channels-last maps for the token
linears (bias and, in inference, the activation inside the kernel; in bf16 training over few tokens,
matmul gradients) where the CPU has no AMX, and chunked matmul attention for bf16 inference and
training (custom ops with backwards of their own, which run eager and compiled); under
``torch.compile``, in fp32 and bf16 training and in inference without inductor's freezing, the token
linears, attention and depthwise convolutions as custom ops inductor cannot relayout (see
`_opaque_under_compile`; bf16 attention stays the chunked matmuls with freezing too). Elsewhere (CUDA) and inside
`portable_kernels` (export): the portable ops, ``F.linear`` and ``scaled_dot_product_attention``.
All compute the same function; benchmarks/RESULTS.md has why each choice was made.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "attention", "cpu_has_amx", "dense_grad", "depthwise_conv", "freed_memory_reused_below", "map_to_tokens",
    "portable_kernels", "stored_once", "to_autocast_dtype", "token_linear", "tokens_to_map", "uses_cpu_kernels",
]

# Set by `portable_kernels`: process-wide, read once per op, so eager inference pays one global lookup.
_portable_only = False


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """Within this block the model computes with the portable ops on every device.

    Exporters (ONNX, TorchScript, torch.export) record the graph they see, and cannot record the
    private oneDNN op of the CPU path; with the portable ops the exported graph is the same whichever
    device the model sits on. The tests use it to check the CUDA path's arithmetic on CPU. Not thread
    local: every thread of the process computes portably until the block ends.
    """
    global _portable_only
    previous, _portable_only = _portable_only, True
    try:
        yield
    finally:
        _portable_only = previous


def uses_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether the CPU kernel choices below apply to ``x`` (oneDNN layouts and fused ops, chunked bf16
    attention). Elsewhere, on CUDA or inside `portable_kernels`, the portable ops (``F.linear``, SDPA)
    run."""
    return x.device.type == "cpu" and not _portable_only


def _amx_tiles() -> bool:
    # Private torch probes; a torch without them is treated as a CPU without AMX. CPUID alone is not
    # enough: on Linux the kernel must also grant the process AMX's tile state (5.16 and later do;
    # an older kernel leaves oneDNN on AVX-512), which `_init_amx` asks for and reports.
    has_tiles = getattr(torch.cpu, "_is_amx_tile_supported", None)
    usable = getattr(torch.cpu, "_init_amx", lambda: True)
    return bool(has_tiles is not None and has_tiles() and usable())


_CPU_HAS_AMX = _amx_tiles()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tile units (Intel Xeon since Sapphire Rapids), which make oneDNN's
    and the BLAS's matmuls several times faster in bf16. The 1x1-convolution route of `token_linear`
    was chosen on a CPU without AMX, where the BLAS sgemm behind ``F.linear`` was the slow one; with
    AMX, ``F.linear`` (oneDNN's AMX matmul in bf16) is taken instead (benchmarks/RESULTS.md says what
    was measured on which machine)."""
    return _CPU_HAS_AMX


# Activations ``token_linear`` applies, and their names as oneDNN post-ops (attr, algorithm).
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
_ONEDNN_POST_OPS = {"silu": ("swish", ""), "gelu": ("gelu", "none")}
# The fused kernels are a private torch op: a torch build or release without it takes the public
# path (a 1x1 convolution, then the activation), which computes the same function a little slower.
_HAS_ONEDNN_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
# oneDNN computes in bf16 only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT. Where it cannot (an
# AVX2 CPU) the public convolution falls back to another kernel by itself; the private op raises.
_ONEDNN_BF16 = _HAS_ONEDNN_POINTWISE and bool(
    getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype CPU ops on ``x`` compute in: autocast's when it is on, else ``x``'s own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _conv_map(tokens: torch.Tensor) -> torch.Tensor:
    # A dense (B, N, C) tensor seen as a channels-last (B, C, 1, N) map, the 1x1 convolutions' input.
    return tokens.contiguous().transpose(1, 2).unsqueeze(2)


def _conv_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` of (B, N, C) tokens as a 1x1 convolution of their channels-last map."""
    return F.conv2d(_conv_map(x), weight[:, :, None, None], bias).squeeze(2).transpose(1, 2)


def _conv_tokens_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))`` of (B, N, C) tokens, the activation inside oneDNN's 1x1
    convolution (an inference-only kernel: no backward); in bf16 on a CPU whose oneDNN has no bf16
    kernels, the public convolution, then the activation."""
    if x.dtype == torch.bfloat16 and not _ONEDNN_BF16:
        return _ACTIVATIONS[activation](_conv_tokens(x, weight, bias))
    attr, algorithm = _ONEDNN_POST_OPS[activation]
    out = torch.ops.mkldnn._convolution_pointwise(
        _conv_map(x), weight[:, :, None, None], bias, [0, 0], [1, 1], [1, 1], 1, attr, [], algorithm
    )
    return out.squeeze(2).transpose(1, 2)


def token_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None
) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))`` for (B, N, C) tokens.

    On a CPU without AMX it runs as a 1x1 convolution of the tokens seen as a channels-last (B, C, 1, N)
    map (a view, no copy): the same sums through oneDNN, whose kernels beat the sgemm behind
    ``F.linear`` there, forward and backward, with the bias inside the kernel. In inference the
    activation runs inside the kernel too, which saves a pass over, and an allocation of, the widest
    tensor of the MLP. In bf16 training on images of few tokens the backward is plain matmuls
    (`_token_conv`'s backward). Elsewhere (CUDA, AMX CPUs: `cpu_has_amx`) ``F.linear`` is the fast path.
    """
    if not uses_cpu_kernels(x) or x.dim() != 3 or cpu_has_amx():
        out = F.linear(x, weight, bias)
    elif _opaque_under_compile(x) or _trains_with_matmul_grads(x):
        # Autocast does not know the custom ops: their inputs get its dtype here, as ``F.linear``'s would.
        x, weight = to_autocast_dtype(x), to_autocast_dtype(weight)
        bias = None if bias is None else to_autocast_dtype(bias)
        if activation is not None and _HAS_ONEDNN_POINTWISE and not torch.is_grad_enabled():
            return _token_conv_pointwise(x, weight, bias, activation)  # compiled inference only
        out = _token_conv(x, weight, bias)
    elif activation is not None and (dtype := _fused_inference_dtype(x)) is not None:
        return _conv_tokens_pointwise(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), activation)
    else:
        out = _conv_tokens(x, weight, bias)
    return out if activation is None else _ACTIVATIONS[activation](out)


# Tokens per image up to which bf16 training takes its token linears' gradients as matmuls (CvT's last stage).
_MATMUL_GRADS_MAX_TOKENS = 256


def _trains_with_matmul_grads(x: torch.Tensor) -> bool:
    """Whether `token_linear` in eager bf16 training runs as `_token_conv`, whose backward computes
    the gradients of few tokens per image as matmuls (`_takes_matmul_grads`)."""
    return torch.is_grad_enabled() and _takes_matmul_grads(x.shape[1], _compute_dtype(x))


def _takes_matmul_grads(tokens: int, dtype: torch.dtype) -> bool:
    """Whether a token linear's gradients are two matmuls over all B*N tokens at once and a sum: in
    bf16 over few tokens per image, where oneDNN's weight-gradient kernel for a (B, C, 1, N) map, a
    reduction over N per image, runs below the matmul's rate (benchmarks/RESULTS.md)."""
    return dtype == torch.bfloat16 and tokens <= _MATMUL_GRADS_MAX_TOKENS


def _opaque_under_compile(x: torch.Tensor) -> bool:
    """Whether ``torch.compile`` is tracing CPU work where the token linears, attention and depthwise
    convolutions run as ops opaque to inductor (`_token_conv`, `_token_conv_pointwise`, the
    attention ops, `_depthwise_conv`): an fp32 or bf16 (autocast) training step (each op with its
    backward op: in bf16 those of eager bf16 training), or inference without inductor's freezing.

    Inductor gives the (B, C, 1, N) map's size-1 dimension the stride 0, so oneDNN no longer sees a
    channels-last input: it then convolves in NCHW, about twice as slowly, and inductor copies the
    maps between layouts around every call, forward and backward; it also copies the tensors around
    SDPA and, in the backward graph, the depthwise convolutions' maps (benchmarks/RESULTS.md).
    Inside the opaque ops the tensors keep the eager layouts. With freezing (inference only), inductor
    prepacks the weights and plans the layouts itself, and in fp32 does better than the opaque ops.
    """
    if not torch.compiler.is_compiling() or not uses_cpu_kernels(x):
        return False
    return _compute_dtype(x) in (torch.float32, torch.bfloat16) and (torch.is_grad_enabled() or not _inductor_freezes())


def _inductor_freezes() -> bool:
    """Whether inductor's freezing is on, read while the graph is traced (a global setting)."""
    from torch._inductor import config  # only while compiling: eager never imports the compiler

    return bool(config.freezing)


@torch.library.custom_op("cvt::token_conv", mutates_args=())
def _token_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for (B, N, C) tokens through the 1x1 convolution of `token_linear`."""
    return _conv_tokens(x, weight, bias).contiguous()


@_token_conv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _no_grad_for(x: torch.Tensor) -> torch.Tensor:
    # What a backward op returns in place of a gradient nobody needs: ops cannot return None.
    return x.new_empty(0)


def _fake_grads(
    x: torch.Tensor, weight: torch.Tensor, needs: Sequence[bool], x_format: torch.memory_format
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shapes a backward op of (x, weight, bias) returns for ``needs`` (its fake's result)."""
    needs_x, needs_weight, needs_bias = needs
    return (
        torch.empty_like(x, memory_format=x_format) if needs_x else _no_grad_for(x),
        torch.empty_like(weight) if needs_weight else _no_grad_for(weight),
        weight.new_empty(weight.shape[0]) if needs_bias else _no_grad_for(weight),
    )


def _grads_needed(ctx: Any) -> list[bool]:
    """Which of an op's first three inputs (x, weight, bias) autograd wants a gradient for."""
    return [bool(n) for n in ctx.needs_input_grad[:3]]


def _grads_for_autograd(grads: Sequence[torch.Tensor], needs: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    # The empty placeholders of a backward op's result back to None, as autograd takes them.
    return tuple(g if needed else None for g, needed in zip(grads, needs))


@torch.library.custom_op("cvt::token_conv_backward", mutates_args=())
def _token_conv_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `_token_conv` for x, weight and bias that ``needs`` asks for, in that order (an
    empty tensor for the others: a frozen weight, no bias, an input that needs none)."""
    needs_x, needs_weight, needs_bias = needs
    if _takes_matmul_grads(x.shape[1], grad.dtype):
        rows = grad.contiguous().view(-1, grad.shape[-1])
        return (
            torch.mm(rows, weight).view(x.shape) if needs_x else _no_grad_for(x),
            torch.mm(rows.t(), x.reshape(-1, x.shape[-1])) if needs_weight else _no_grad_for(weight),
            rows.sum(0) if needs_bias else _no_grad_for(weight),
        )
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        _conv_map(grad), _conv_map(x), weight[:, :, None, None], [weight.shape[0]] if needs_bias else None,
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1, list(needs),
    )
    return (
        grad_x.squeeze(2).transpose(1, 2).contiguous() if needs_x else _no_grad_for(x),
        grad_weight.flatten(1).contiguous() if needs_weight else _no_grad_for(weight),
        grad_bias if needs_bias else _no_grad_for(weight),
    )


@_token_conv_backward.register_fake
def _(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fake_grads(x, weight, needs, torch.contiguous_format)


def _token_conv_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, _bias = inputs
    ctx.save_for_backward(x, weight)


def _token_conv_grads(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    needs = _grads_needed(ctx)
    return _grads_for_autograd(_token_conv_backward(grad, *ctx.saved_tensors, needs), needs)


_token_conv.register_autograd(_token_conv_grads, setup_context=_token_conv_setup)


@torch.library.custom_op("cvt::token_conv_pointwise", mutates_args=())
def _token_conv_pointwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))`` for (B, N, C) tokens in inference, the activation
    inside oneDNN's 1x1 convolution as in eager inference (no backward: autograd must be off)."""
    return _conv_tokens_pointwise(x, weight, bias, activation).contiguous()


@_token_conv_pointwise.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fused_inference_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype in which oneDNN's inference-only kernels with fused epilogues may run, or None.

    They have no backward, so they need autograd off; they run on CPU in fp32 or bf16. Autocast does
    not know them, so under autocast the caller casts their inputs to the autocast dtype by hand, as
    autocast would for ``F.linear``. Under ``torch.compile`` the compiler fuses by itself.
    """
    if not _HAS_ONEDNN_POINTWISE or not uses_cpu_kernels(x) or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    dtype = _compute_dtype(x)
    return dtype if dtype in (torch.float32, torch.bfloat16) else None


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` cast to the autocast dtype when autocast is on: done once for a tensor that feeds several
    autocast ops, instead of once per op. Devices autocast does not know (meta: shape-only runs such
    as `cvt info`) pass through."""
    if x.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def stored_once(x: torch.Tensor) -> torch.Tensor:
    """``x``, which several ops read, as one stored tensor in compiled inference.

    Through the opaque ops without freezing, inductor would otherwise leave such a tensor uncomputed
    and recompute it in every reader: the residual stream from all of its addends, in both passes of
    each LayerNorm, and the q, k and v projections' channels-last map as one copy per projection. Its
    stride prim makes it one buffer, written once (benchmarks/RESULTS.md). Elsewhere ``x`` as it is:
    eager computes every tensor once, and in training the compiled graph keeps these for the backward.
    """
    if torch.is_grad_enabled() or not _opaque_under_compile(x):
        return x
    try:  # imported only while compiling
        from torch._inductor.inductor_prims import force_stride_order
    except ImportError:  # a torch without this private prim: inductor's own choice
        return x
    return force_stride_order(x, x.stride())


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a view: a contiguous token tensor is a channels-last map."""
    return x.transpose(1, 2).unflatten(2, (height, width))


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view when the map is channels-last."""
    return x.flatten(2).transpose(1, 2)


# The most attention scores held at once by the bf16 CPU path: a few MiB stay in cache and are reused,
# where the whole batch's would not.
_SCORE_CHUNK_BYTES = 8 * 2**20
# Tensors below this many bytes reuse memory the process freed (0: none is known to): set by
# `freed_memory_reused_below`.
_kept_allocation_bytes = 0


def freed_memory_reused_below(below_bytes: int) -> None:
    """Tell the kernels that the process's allocator keeps the memory it frees for tensors below
    ``below_bytes`` (``cvt.training.session.keep_freed_memory`` does so after setting glibc up).

    Eager bf16 training then keeps attention's probabilities for the backward where they fit: a fresh
    tensor of them would fault its pages in anew on every step and cost more than recomputing them
    (benchmarks/RESULTS.md).
    """
    global _kept_allocation_bytes
    _kept_allocation_bytes = below_bytes


def _keeps_allocation(nbytes: int) -> bool:
    return nbytes < _kept_allocation_bytes


# Above this much of one image's scores (CvT's first stage) compiled bf16 training runs
# `_recomputed_attention`, which keeps no scores for its backward; below it inductor traces the explicit
# matmuls ...
_LARGE_SCORE_BYTES_PER_IMAGE = 2 * 2**20
# ... and below it over at most this many keys (CvT's last stage) bf16 attention runs
# `_key_major_attention`, eager or compiled.
_KEY_MAJOR_MAX_KEYS = 64


def _score_bytes_per_image(q: torch.Tensor, k: torch.Tensor) -> int:
    """The size of one image's attention scores, all heads, for (B, heads, N, head_dim) ``q`` and ``k``."""
    return q.shape[1] * q.shape[2] * k.shape[2] * q.element_size()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over (B, heads, N, head_dim) tensors.

    ``scaled_dot_product_attention`` everywhere, except in bf16 on CPU, where its fused kernel
    (forward and backward) is slower than two plain oneDNN bf16 matmuls around a vectorised softmax,
    done a few images at a time (`_bf16_attention`), and in fp32 under ``torch.compile`` where the
    ops are opaque (`_opaque_under_compile`: `_flash_attention`, the same kernel, opaque to inductor).
    """
    if not uses_cpu_kernels(q) or dropout_p > 0.0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if q.dtype == torch.bfloat16:
        return _bf16_attention(q, k, v, scale)
    if q.dtype == torch.float32 and _opaque_under_compile(q):
        return _heads(_flash_attention(_tokens(q), _tokens(k), _tokens(v), q.shape[1], scale)[0], q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """bf16 attention on CPU as plain matmuls around a softmax, eager or compiled, with or without
    inductor's freezing (benchmarks/RESULTS.md).

    Over few keys (CvT's last stage) `_key_major_attention`, the scores transposed. Else, in eager
    training where the process keeps freed memory of the probabilities' size (`freed_memory_reused_below`),
    `_stored_attention`: a chunk of images at a time, the probabilities kept for the backward; in
    inference `_recomputed_attention`'s chunks, which keep nothing. Other training, and compiled training,
    takes `_recomputed_attention` where an image's scores are large (CvT's first stage; its backward
    recomputes them), else inductor traces the chunked matmuls. That is also the published model's
    arithmetic under autocast (bf16 scores, bf16 probabilities).
    """
    per_image = _score_bytes_per_image(q, k)
    chunk = max(1, _SCORE_CHUNK_BYTES // per_image)  # images whose scores are held at once
    if per_image <= _LARGE_SCORE_BYTES_PER_IMAGE and k.shape[2] <= _KEY_MAJOR_MAX_KEYS:
        return _over_heads(_key_major_attention, q, k, v, scale)
    if torch.is_grad_enabled():
        if _keeps_allocation(q.shape[0] * per_image) and not torch.compiler.is_compiling():
            return _over_heads(_stored_attention, q, k, v, scale, chunk * q.shape[1])
        if per_image <= _LARGE_SCORE_BYTES_PER_IMAGE:
            return _attention_in_chunks(q, k, v, scale, chunk)
    return _over_heads(_recomputed_attention, q, k, v, scale, chunk * q.shape[1])


def _attention_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    out = []
    for q_c, k_c, v_c in zip(q.split(chunk), k.split(chunk), v.split(chunk)):
        scores = torch.matmul(q_c, k_c.transpose(-2, -1)).mul_(scale)
        out.append(torch.matmul(torch.softmax(scores, dim=-1), v_c))
    return torch.cat(out)


def _over_heads(op: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any) -> torch.Tensor:
    """An attention ``op`` of (batch, N, head_dim) tensors (its first output) applied to (B, heads, N,
    head_dim) ones."""
    batch, heads = q.shape[:2]
    out = op(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *args)
    return (out[0] if isinstance(out, tuple) else out).unflatten(0, (batch, heads))


def _probabilities(a: torch.Tensor, b: torch.Tensor, scale: float, buffer: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``softmax(a b^T * scale, dim)`` of (n, ., head_dim) chunks, in place in (the first n entries of)
    ``buffer``: a fresh score tensor per chunk would cost more in page faults than the softmax. The
    scale is applied inside the matmul (one bf16 rounding where the published model has two; the same
    where the scale is a power of two, as in CvT's first stage)."""
    scores = _scaled_bmm(a, b.transpose(1, 2), scale, buffer[: a.shape[0]])
    return torch._softmax(scores, dim, False, out=scores)


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b) * scale`` into ``out``, the scaling inside oneDNN's matmul."""
    return torch.baddbmm(out, a, b, beta=0.0, alpha=scale, out=out)


# Custom ops rather than autograd Functions: the same code then runs eager and compiled, where
# inductor calls them as they are (it cannot trace their in-place work in reused buffers).


@torch.library.custom_op("cvt::recomputed_attention", mutates_args=())
def _recomputed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over (batch, N, head_dim) tensors, ``chunk`` batch entries at a
    time, in both passes; the backward recomputes each chunk's probabilities instead of keeping them.

    Autograd through the explicit matmuls keeps the whole batch's probabilities for the backward and
    allocates several more tensors of that size there; SDPA's fused CPU kernels keep none but run far
    below the machine's matmul rate. Here every matmul is a plain oneDNN one and the scores of one
    chunk at a time stay in cache, in two reused buffers.
    """
    out = q.new_empty(q.shape[:2] + v.shape[2:])
    scores = q.new_empty(min(chunk, q.shape[0]), q.shape[1], k.shape[1])
    for rows in _chunks(q.shape[0], chunk):
        torch.bmm(_probabilities(q[rows], k[rows], scale, scores), v[rows], out=out[rows])
    return out


@_recomputed_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    return q.new_empty(q.shape[:2] + v.shape[2:])


def _attention_chunk_grads(
    rows: slice, probs: torch.Tensor, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    scale: float, grad_scores_buffer: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Attention's gradients for q, k and v at ``rows``, written into ``grads``, from those rows'
    probabilities; dS goes through (the first entries of) ``grad_scores_buffer``."""
    grad_q, grad_k, grad_v = grads
    grad_scores = grad_scores_buffer[: probs.shape[0]]
    torch.bmm(grad_out[rows], v[rows].transpose(1, 2), out=grad_scores)
    # Stored probabilities come from memory: softmax's backward streams them in row by row, and dV's
    # matmul, which reads them transposed (far slower from memory), then finds them in cache.
    torch._softmax_backward_data(grad_scores, probs, -1, probs.dtype, grad_input=grad_scores)
    torch.bmm(probs.transpose(1, 2), grad_out[rows], out=grad_v[rows])
    _scaled_bmm(grad_scores, k[rows], scale, grad_q[rows])
    _scaled_bmm(grad_scores.transpose(1, 2), q[rows], scale, grad_k[rows])


@torch.library.custom_op("cvt::recomputed_attention_backward", mutates_args=())
def _recomputed_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    probs_buffer = q.new_empty(min(chunk, q.shape[0]), q.shape[1], k.shape[1])
    grad_scores_buffer = torch.empty_like(probs_buffer)
    for rows in _chunks(q.shape[0], chunk):
        probs = _probabilities(q[rows], k[rows], scale, probs_buffer)
        _attention_chunk_grads(rows, probs, grad_out, q, k, v, scale, grad_scores_buffer, (grad_q, grad_k, grad_v))
    return grad_q, grad_k, grad_v


@_recomputed_attention_backward.register_fake
def _(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _recomputed_attention_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, ctx.scale, ctx.chunk = inputs
    ctx.save_for_backward(q, k, v)


def _recomputed_attention_grads(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return (*_recomputed_attention_backward(grad, *ctx.saved_tensors, ctx.scale, ctx.chunk), None, None)


_recomputed_attention.register_autograd(_recomputed_attention_grads, setup_context=_recomputed_attention_setup)


@torch.library.custom_op("cvt::stored_attention", mutates_args=())
def _stored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale) v`` over (batch, N, head_dim) tensors, ``chunk`` batch entries at a
    time, as `_recomputed_attention` computes it: (output, probabilities).

    The probabilities are kept for the backward instead of recomputed there: recomputing costs a
    matmul and a softmax per chunk, more than writing them out and reading them back once where the
    process keeps its freed memory (no fresh pages per step: benchmarks/RESULTS.md).
    """
    out = q.new_empty(q.shape[:2] + v.shape[2:])
    probs = q.new_empty(q.shape[0], q.shape[1], k.shape[1])
    for rows in _chunks(q.shape[0], chunk):
        torch.bmm(_probabilities(q[rows], k[rows], scale, probs[rows]), v[rows], out=out[rows])
    return out, probs


@_stored_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape[:2] + v.shape[2:]), q.new_empty(q.shape[0], q.shape[1], k.shape[1])


@torch.library.custom_op("cvt::stored_attention_backward", mutates_args=())
def _stored_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor, scale: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grad_scores_buffer = probs.new_empty(min(chunk, q.shape[0]), *probs.shape[1:])  # reused: stays in cache
    for rows in _chunks(q.shape[0], chunk):
        _attention_chunk_grads(rows, probs[rows], grad_out, q, k, v, scale, grad_scores_buffer, (grad_q, grad_k, grad_v))
    return grad_q, grad_k, grad_v


@_stored_attention_backward.register_fake
def _(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor, scale: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _stored_attention_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, ctx.scale, ctx.chunk = inputs
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the probabilities, which nothing uses
    ctx.save_for_backward(q, k, v, output[1])


def _stored_attention_grads(ctx: Any, grad: torch.Tensor, _grad_probs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return (*_stored_attention_backward(grad, *ctx.saved_tensors, ctx.scale, ctx.chunk), None, None)


_stored_attention.register_autograd(_stored_attention_grads, setup_context=_stored_attention_setup)


@torch.library.custom_op("cvt::key_major_attention", mutates_args=())
def _key_major_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale) v`` over (batch, N, head_dim) tensors with few keys, the scores computed
    and kept transposed, (keys, queries), the softmax across queries: (output, probabilities^T).

    bf16 ``softmax`` over short rows (50 keys in CvT's last stage) runs at a fraction of its speed
    over a long inner dimension. In this layout the backward's matmuls take their operands as stored,
    and, as in `_recomputed_attention`, the scale sits inside the matmuls and softmax's backward runs
    in place.
    """
    probs_t = _probabilities(k, q, scale, k.new_empty(k.shape[0], k.shape[1], q.shape[1]), dim=-2)
    return torch.bmm(probs_t.transpose(1, 2), v), probs_t


@_key_major_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape[:2] + v.shape[2:]), k.new_empty(k.shape[0], k.shape[1], q.shape[1])


@torch.library.custom_op("cvt::key_major_attention_backward", mutates_args=())
def _key_major_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs_t: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_v = torch.bmm(probs_t, grad_out)
    grad_scores_t = torch.bmm(v, grad_out.transpose(1, 2))
    torch._softmax_backward_data(grad_scores_t, probs_t, -2, probs_t.dtype, grad_input=grad_scores_t)
    grad_q = _scaled_bmm(grad_scores_t.transpose(1, 2), k, scale, torch.empty_like(q))
    grad_k = _scaled_bmm(grad_scores_t, q, scale, torch.empty_like(k))
    return grad_q, grad_k, grad_v


@_key_major_attention_backward.register_fake
def _(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs_t: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _key_major_attention_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, ctx.scale = inputs
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the probabilities, which nothing uses
    ctx.save_for_backward(q, k, v, output[1])


def _key_major_attention_grads(ctx: Any, grad: torch.Tensor, _grad_probs_t: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return (*_key_major_attention_backward(grad, *ctx.saved_tensors, ctx.scale), None)


_key_major_attention.register_autograd(_key_major_attention_grads, setup_context=_key_major_attention_setup)


def _chunks(length: int, chunk: int) -> Iterator[slice]:
    return (slice(start, start + chunk) for start in range(0, length, chunk))


def _heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, N, heads * d) -> (B, heads, N, d), a view (as the model's `_split_heads`).
    return tokens.unflatten(-1, (heads, -1)).transpose(1, 2)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    # (B, heads, N, d) -> dense (B, N, heads * d) tokens; a view when ``x`` is a view of such tokens.
    return x.transpose(1, 2).flatten(2).contiguous()


@torch.library.custom_op("cvt::flash_attention", mutates_args=())
def _flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU flash kernel on (B, N, heads * d) tokens: (output tokens, logsumexp).

    Opaque to inductor, which otherwise copies q, k, v and the output between the token layout and
    others around the kernel (benchmarks/RESULTS.md).
    """
    out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _heads(q, heads), _heads(k, heads), _heads(v, heads), scale=scale
    )
    return _tokens(out), logsumexp.contiguous()


@_flash_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The logsumexp is float32 whatever the inputs' dtype, as SDPA's.
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[0], heads, q.shape[1], dtype=torch.float32)


@torch.library.custom_op("cvt::flash_attention_backward", mutates_args=())
def _flash_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
    heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(_heads(t, heads) for t in (grad, q, k, v, out)), logsumexp, 0.0, False, scale=scale
    )
    return tuple(_tokens(g) for g in grads)  # type: ignore[return-value]


@_flash_attention_backward.register_fake
def _(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
    heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))  # type: ignore[return-value]


def _flash_attention_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, ctx.heads, ctx.scale = inputs
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the logsumexp, which nothing uses
    ctx.save_for_backward(q, k, v, *output)


def _flash_attention_grads(ctx: Any, grad: torch.Tensor, _grad_logsumexp: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return (*_flash_attention_backward(grad, *ctx.saved_tensors, ctx.heads, ctx.scale), None, None)


_flash_attention.register_autograd(_flash_attention_grads, setup_context=_flash_attention_setup)


class _DenseChannelsLastGrad(torch.autograd.Function):
    """Identity forward; backward hands on the gradient as a dense channels-last tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def dense_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, whose gradient, in CPU training, reaches the ops before it dense and channels-last.

    A map whose tokens are then concatenated after a cls token gets its gradient back as a slice of
    the concatenation's, which is not dense; oneDNN's BatchNorm backward is several times slower on
    such a gradient than the copy that makes it dense (benchmarks/RESULTS.md).
    """
    if uses_cpu_kernels(x) and torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _DenseChannelsLastGrad.apply(x)
    return x


@torch.library.custom_op("cvt::depthwise_conv", mutates_args=())
def _depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    """A depthwise convolution of a channels-last map, channels-last out; opaque to inductor, which
    otherwise copies the map into another layout for each of the three convolutions' backward (its
    channels-last choice is made per graph, and the backward graph has no forward convolution:
    benchmarks/RESULTS.md)."""
    return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1]).contiguous(memory_format=torch.channels_last)


@_depthwise_conv.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    size = [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(x.shape[2:], weight.shape[2:], stride, padding)]
    return x.new_empty(x.shape[0], x.shape[1], *size).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("cvt::depthwise_conv_backward", mutates_args=())
def _depthwise_conv_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: Sequence[bool], stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `_depthwise_conv` for x, weight and bias that ``needs`` asks for, in that order
    (an empty tensor for the others)."""
    needs_x, needs_weight, needs_bias = needs
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad.contiguous(memory_format=torch.channels_last), x, weight, [weight.shape[0]] if needs_bias else None,
        stride, padding, [1, 1], False, [0, 0], x.shape[1], list(needs),
    )
    return (
        grad_x.contiguous(memory_format=torch.channels_last) if needs_x else _no_grad_for(x),
        grad_weight.as_strided(weight.shape, weight.stride()) if needs_weight else _no_grad_for(weight),
        grad_bias if needs_bias else _no_grad_for(weight),
    )


@_depthwise_conv_backward.register_fake
def _(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: Sequence[bool], stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fake_grads(x, weight, needs, torch.channels_last)


def _depthwise_conv_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, _bias, ctx.stride, ctx.padding = inputs
    ctx.save_for_backward(x, weight)


def _depthwise_conv_grads(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    needs = _grads_needed(ctx)
    grads = _depthwise_conv_backward(grad, *ctx.saved_tensors, needs, ctx.stride, ctx.padding)
    return (*_grads_for_autograd(grads, needs), None, None)


_depthwise_conv.register_autograd(_depthwise_conv_grads, setup_context=_depthwise_conv_setup)


def depthwise_conv(
    x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv(x)`` for a depthwise convolution; with ``weight`` and ``bias``, the same convolution with
    those instead (an eval-mode BatchNorm folded in).

    oneDNN's bf16 depthwise backward is far slower strided than not (benchmarks/RESULTS.md). Every
    stride-th output of the stride-1 convolution is the same sum, and its backward gives the same
    gradients, so bf16 training on CPU takes that path.
    """
    weight, bias = (conv.weight, conv.bias) if weight is None else (weight, bias)
    x = to_autocast_dtype(x)  # the custom op is unknown to autocast; a no-op for the model's own inputs
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    subsample = uses_cpu_kernels(x) and x.dtype == torch.bfloat16 and needs_grad and conv.stride != (1, 1)
    stride = (1, 1) if subsample else conv.stride
    if _opaque_under_compile(x) and conv.groups == x.shape[1] and conv.dilation == (1, 1):
        out = _depthwise_conv(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, conv.padding)
    else:
        out = F.conv2d(x, weight, bias, stride, conv.padding, conv.dilation, conv.groups)
    # Every stride-th output as a 1x1 average pooling: dense channels-last both ways, which BatchNorm's
    # bf16 kernels and the convolution's backward need (a strided slice would hand on a strided view,
    # and get back a gradient scattered into a zeroed contiguous, not channels-last, tensor).
    return F.avg_pool2d(out, 1, conv.stride) if subsample else out


def _tag_compile_caches() -> None:
    """Add this module's digest to ``torch.compile``'s cache key tag (process-wide, appended to a
    tag the user set).

    Inductor's caches key a graph by the ops it calls, not by what our custom ops' registered
    backwards trace into: after an upgrade that changes those, a cached backward graph would call the
    ops as the old version did (a crash on a changed signature, or the old arithmetic). The digest
    changes with this file, so a changed module compiles afresh; other graphs only gain a constant.
    """
    config = getattr(torch.compiler, "config", None)  # torch >= 2.6
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    tag = "cvt-kernels-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag}+{tag}" if config.cache_key_tag else tag


_tag_compile_caches()

"""The fast model computes the published function.

``cvt.models.cvt`` takes shortcuts for speed (SDPA, QuickGELU folded into the linears, BatchNorm
folded into the depthwise convolutions in eval mode, channels-last views, oneDNN kernels). This file
compares it with a literal, slow transcription of the published semantics (reference_cvt.py) and checks that
both give the same logits and gradients from the same state dict. The reference is deliberately
naive: explicit ``q @ k^T * scale``, softmax, ``x * sigmoid(1.702 x)``, Conv2d then BatchNorm2d,
LayerNorm cast to float32 and back.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import cvt.models.kernels as kernels_module
from cvt.models.cvt import ConvProjection, create_model
from cvt.models.kernels import portable_kernels
from cvt.models.spec import CvtSpec

from reference_cvt import RefConvBn, RefCvt

# Logits of the fast model in fp32 eval mode may differ from the reference by float rounding only.
EVAL_ATOL = 2e-5
# Train mode: gradients agree to this fraction of each gradient tensor's largest entry (or of 1% of
# the largest gradient anywhere, for tensors whose true gradient is zero, such as proj_k's bias: a
# constant added to every key leaves the softmax unchanged).
GRAD_RTOL = 1e-4
# bf16 autocast keeps ~8 mantissa bits per matmul input: the logits may move by this fraction of the
# fp32 logits' range (max - min over the batch). Measured ~1-2% on these models; 5% leaves room.
BF16_RTOL_OF_RANGE = 0.05

# A bf16 op computed two ways (attention, a token linear's gradients): outputs and gradients may differ
# by this fraction of the largest entry (measured up to ~1.5%).
BF16_RTOL_OF_MAX = 0.03

NUM_CLASSES = 7


SMALL = dict(dim_embed=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), drop_path_rate=(0.0, 0.0, 0.0))


def small_spec(method: str = "dw_bn", cls_token: bool = True) -> CvtSpec:
    return CvtSpec(**SMALL, qkv_proj_method=(method,) * 3, cls_token=(False, False, cls_token))


def randomized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor matters: norms and biases off their init values, BatchNorm running statistics
    away from 0/1, so a folding or scaling mistake anywhere shows up in the logits."""
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.1 * torch.randn_like(value)
        elif value.dim() == 1:  # LayerNorm / BatchNorm weights
            state[key] = 1.0 + 0.2 * torch.randn_like(value)
        else:
            # Larger than the init's std .02, so attention is far from uniform and a wrong scale
            # (head width instead of stage width) moves the logits by ~1e-3, 100x the tolerance.
            state[key] = value + 0.05 * torch.randn_like(value)
    return state


def model_pair(spec: CvtSpec, act: str = "quick_gelu") -> tuple[nn.Module, RefCvt]:
    fast = create_model(spec, NUM_CLASSES, act=act)
    state = randomized_state(fast)
    fast.load_state_dict(state)
    ref = RefCvt(spec, NUM_CLASSES, act)
    ref.load_state_dict(state, strict=True)
    return fast, ref


INPUTS = [(1, 224, 224), (3, 224, 224), (1, 160, 208), (3, 160, 208)]


@pytest.fixture(params=["cpu", "cpu-amx", "portable"])
def kernels(request, monkeypatch):
    """Every kernel path of the fast model: the CPU one as a CPU without AMX takes it (oneDNN layouts
    and fused ops) and as one with AMX does (`cpu_has_amx`), whichever CPU runs the test, and the
    portable one CUDA takes (F.linear, SDPA), forced here on CPU so its arithmetic is tested without a
    GPU."""
    monkeypatch.setattr(kernels_module, "cpu_has_amx", lambda: request.param == "cpu-amx")
    if request.param == "portable":
        with portable_kernels():
            yield request.param
    else:
        yield request.param


# --------------------------------------------------------------------------------------------------
# Eval mode
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_eval_logits_equal_the_reference(method, cls_token, kernels):
    fast, ref = model_pair(small_spec(method, cls_token))
    fast.eval()
    ref.eval()
    with torch.no_grad():
        for batch, height, width in INPUTS:
            x = torch.randn(batch, 3, height, width)
            expected = ref(x)
            got = fast(x)
            assert got.shape == (batch, NUM_CLASSES)
            torch.testing.assert_close(got, expected, rtol=0, atol=EVAL_ATOL)


def test_inference_mode_equals_no_grad():
    """``torch.inference_mode`` may take other kernels than ``no_grad``; both must be exact."""
    fast, ref = model_pair(small_spec())
    fast.eval()
    ref.eval()
    x = torch.randn(3, 3, 160, 208)
    with torch.no_grad():
        expected = ref(x)
    with torch.inference_mode():
        got = fast(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=EVAL_ATOL)


class _CalledFunctions(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.called: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.called.add(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amx", [True, False])
def test_token_linears_follow_the_cpu_capability(monkeypatch, amx):
    """With AMX the token linears take F.linear, without it the oneDNN 1x1 convolution."""
    monkeypatch.setattr(kernels_module, "cpu_has_amx", lambda: amx)
    x, weight, bias = torch.randn(2, 5, 8), torch.randn(4, 8), torch.randn(4)
    with _CalledFunctions() as mode:
        out = kernels_module.token_linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=0, atol=1e-6)
    assert (F.linear in mode.called) == amx
    assert (F.conv2d in mode.called) == (not amx)


def test_amx_is_read_from_the_cpu():
    cpuinfo = Path("/proc/cpuinfo")
    flags = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")] if cpuinfo.exists() else []
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    # The kernel lists amx_tile only where it supports AMX; a sandbox may still refuse it to the process.
    assert kernels_module.cpu_has_amx() == ("amx_tile" in flags[0].split() and torch.cpu._init_amx())


@pytest.mark.parametrize("cpuid, granted", [(True, True), (True, False), (False, True)])
def test_amx_counts_only_when_the_cpu_has_it_and_the_kernel_grants_it(monkeypatch, cpuid, granted):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: cpuid)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: granted)
    assert kernels_module._amx_tiles() == (cpuid and granted)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_without_the_private_onednn_op_eval_logits_are_unchanged(monkeypatch, act):
    """The fused oneDNN kernels are a private torch op; a torch without it takes the public path."""
    fast, ref = model_pair(small_spec(), act=act)
    fast.eval()
    ref.eval()
    x = torch.randn(3, 3, 160, 208)
    with torch.no_grad():
        fused = fast(x)
        monkeypatch.setattr(kernels_module, "_HAS_ONEDNN_POINTWISE", False)
        public = fast(x)
        expected = ref(x)
    torch.testing.assert_close(public, expected, rtol=0, atol=EVAL_ATOL)
    torch.testing.assert_close(fused, expected, rtol=0, atol=EVAL_ATOL)


# bf16 inference in a process whose oneDNN has no bf16 kernels (ONEDNN_MAX_CPU_ISA=AVX2: an AVX2 CPU,
# say AMD's Zen 3), on the oneDNN token linears a CPU without AMX takes: the model eagerly, and the
# compiled path's fused op. Prints whether oneDNN had bf16 after all, then the model's largest logit
# difference to fp32 over the fp32 logit range.
_BF16_WITHOUT_ONEDNN_BF16 = """
import torch, torch.nn.functional as F
import cvt.models.kernels as kernels
from cvt.models.cvt import create_model
kernels._CPU_HAS_AMX = False
torch.manual_seed(0)
model = create_model({"DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 1, 2]}, num_classes=7).eval()
x = torch.randn(2, 3, 64, 64)
tokens, weight = torch.randn(2, 5, 8).bfloat16(), torch.randn(6, 8).bfloat16()
with torch.no_grad():
    fp32 = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x).float()
    fused = torch.ops.cvt.token_conv_pointwise(tokens, weight, None, "gelu")
    torch.testing.assert_close(fused, F.gelu(F.linear(tokens, weight)))
print(kernels._ONEDNN_BF16, ((bf16 - fp32).abs().max() / (fp32.max() - fp32.min())).item())
"""


def test_bf16_inference_runs_where_onednn_has_no_bf16_kernels():
    """The fused oneDNN kernel raised in bf16 there ("bf16 path needs the cpu support avx_ne_convert or
    avx512bw, avx512vl and avx512dq"); the public convolution, which falls back by itself, runs instead."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", _BF16_WITHOUT_ONEDNN_BF16], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    had_bf16, off_by = out.stdout.split()
    if had_bf16 == "True":
        pytest.skip("this torch's oneDNN ignores ONEDNN_MAX_CPU_ISA")
    assert float(off_by) <= BF16_RTOL_OF_RANGE


def test_hugging_face_activation_equals_the_reference():
    fast, ref = model_pair(small_spec(), act="gelu")
    fast.eval()
    ref.eval()
    x = torch.randn(3, 3, 160, 208)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=EVAL_ATOL)


def test_cvt13_eval_logits_equal_the_reference():
    spec = CvtSpec()  # CvT-13, the published spec
    fast = create_model(spec, 1000)
    state = randomized_state(fast)
    fast.load_state_dict(state)
    ref = RefCvt(spec, 1000)
    ref.load_state_dict(state, strict=True)
    fast.eval()
    ref.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=EVAL_ATOL)


# --------------------------------------------------------------------------------------------------
# Train mode: batch statistics in BatchNorm, gradients through every shortcut
# --------------------------------------------------------------------------------------------------


def _assert_grads_close(fast: nn.Module, ref: nn.Module) -> None:
    ref_params = dict(ref.named_parameters())
    floor = 0.01 * max(p.grad.abs().max().item() for p in ref.parameters())
    for name, param in fast.named_parameters():
        expected = ref_params[name].grad
        assert param.grad is not None and expected is not None, name
        tol = GRAD_RTOL * max(expected.abs().max().item(), floor)
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_train_outputs_and_gradients_equal_the_reference(method, cls_token, kernels):
    fast, ref = model_pair(small_spec(method, cls_token))
    fast.train()
    ref.train()
    x = torch.randn(3, 3, 160, 208)
    target = torch.randint(0, NUM_CLASSES, (3,))
    got = fast(x)
    expected = ref(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=EVAL_ATOL)
    F.cross_entropy(got, target).backward()
    F.cross_entropy(expected, target).backward()
    _assert_grads_close(fast, ref)
    # Train-mode BatchNorm updated the same running statistics.
    ref_buffers = dict(ref.named_buffers())
    for name, buffer in fast.named_buffers():
        torch.testing.assert_close(buffer, ref_buffers[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# bf16 autocast: close to fp32, within a stated tolerance
# --------------------------------------------------------------------------------------------------


def _assert_bf16_close(got: torch.Tensor, fp32: torch.Tensor) -> None:
    assert got.dtype in (torch.float32, torch.bfloat16, torch.float16)
    scale = (fp32.max() - fp32.min()).item()
    err = (got.float() - fp32).abs().max().item()
    assert err <= BF16_RTOL_OF_RANGE * scale, f"bf16 logits off by {err:.4g}, fp32 logit range {scale:.4g}"


def test_fp16_autocast_eval_runs_on_cpu():
    """CPU autocast in float16 (which the CLI does not offer, a library caller may) takes the plain
    convolutions: oneDNN's fused inference kernels have no fp16 path on most CPUs."""
    fast, ref = model_pair(small_spec())
    fast.eval()
    ref.eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            got = fast(x)
        _assert_bf16_close(got, ref(x))


@pytest.mark.parametrize("method", ["dw_bn", "linear"])
def test_bf16_autocast_eval_is_close_to_fp32(method, kernels):
    fast, ref = model_pair(small_spec(method))
    fast.eval()
    ref.eval()
    x = torch.randn(3, 3, 160, 208)
    with torch.no_grad():
        fp32 = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(x)
    _assert_bf16_close(got, fp32)


def test_bf16_autocast_train_is_close_to_fp32(kernels):
    fast, ref = model_pair(small_spec())
    fast.train()
    ref.train()
    x = torch.randn(3, 3, 160, 208)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(x)
    _assert_bf16_close(got, ref(x))
    got.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


def test_bf16_strided_projection_trains_like_the_strided_convolution():
    """In bf16 training the strided depthwise convolution runs as a stride-1 one, subsampled (a faster
    backward on CPU): the same outputs and gradients bit for bit, the same BatchNorm running statistics
    to float rounding (the batch variance is summed in another order)."""
    fast = create_model(small_spec(), NUM_CLASSES).stage1.blocks[0].attn.conv_proj_k.train()
    ref = RefConvBn(32, 3, 2, 1).train()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 32, 13, 10, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fast(x_fast), ref(x_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(fast.conv.weight.grad, ref.conv.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(fast.bn.running_mean, ref.bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast.bn.running_var, ref.bn.running_var, rtol=1e-6, atol=1e-7)


def test_bf16_frozen_projection_convolves_strided():
    """A frozen projection (eval mode, no parameter needing a gradient, as FINETUNE.FROZEN_LAYERS
    leaves it) under bf16 autocast with autograd on needs no backward: it convolves strided, not at
    stride 1 and then subsampled (four times the work), and gives the reference's output."""
    fast = create_model(small_spec(), NUM_CLASSES).stage1.blocks[0].attn.conv_proj_k.eval().requires_grad_(False)
    ref = RefConvBn(32, 3, 2, 1).eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 32, 13, 10, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), _CalledFunctions() as mode:
        out = fast(x)
    assert F.avg_pool2d not in mode.called
    with torch.no_grad():
        _assert_bf16_close(out, ref(x.float()))


def _autograd_node_names(out: torch.Tensor) -> set[str]:
    """The kinds of backward node that produced ``out``, all the way back to the leaves."""
    names, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(
    "batch, heads, queries, keys, kept, node",
    [
        (5, 1, 1500, 800, 2**30, "cvt_stored_attention"),
        (3, 2, 1600, 700, 2**30, "cvt_stored_attention"),
        (4, 3, 197, 50, 2**30, "cvt_key_major_attention"),
        (4, 3, 197, 90, 2**30, "cvt_stored_attention"),
        (5, 1, 1500, 800, 5 * 1500 * 800 * 2, "cvt_recomputed_attention"),
        (4, 3, 197, 90, 0, "BmmBackward0"),
    ],
)
def test_bf16_training_attention_paths(monkeypatch, batch, heads, queries, keys, kept, node):
    """In eager bf16 CPU training, attention over few keys (CvT's last stage) runs as
    `cvt::key_major_attention`, scores transposed; else, where freed memory is reused for a tensor of
    all the probabilities (``kept``: below that many bytes), as `cvt::stored_attention`, chunks of
    images whose probabilities the backward reuses; else large scores per image (CvT's first stage)
    as `cvt::recomputed_attention`, whose backward recomputes them, and small ones through autograd.
    Each within bf16 rounding of the published arithmetic under autocast (explicit bf16 matmuls and
    softmax) and of SDPA, in the output and in every gradient. The first case ends on a shorter chunk."""
    monkeypatch.setattr(kernels_module, "_kept_allocation_bytes", kept)
    dim = 64 * heads
    q, k, v = (
        torch.randn(batch, n, dim).unflatten(-1, (heads, -1)).transpose(1, 2).to(torch.bfloat16) for n in (queries, keys, keys)
    )
    grad = torch.randn(batch, heads, queries, 64, dtype=torch.bfloat16)
    scale = dim**-0.5

    def explicit(q, k, v):
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1), v)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def ours(q, k, v):
        return kernels_module.attention(q, k, v, scale, 0.0)

    results = {}
    for name, fn in [("ours", ours), ("explicit", explicit), ("sdpa", sdpa)]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        with torch.profiler.profile() as profile:
            out.backward(grad)
        if name == "ours" and node.startswith("cvt_"):  # no zero gradient made for an op's unused output
            assert not {"aten::zeros", "aten::fill_"} & {event.name for event in profile.events()}
        results[name] = [out] + [t.grad for t in leaves]
        if name == "ours":
            assert any(node in name for name in _autograd_node_names(out))
    for expected_name in ("explicit", "sdpa"):
        for got, expected, what in zip(results["ours"], results[expected_name], ("out", "q", "k", "v")):
            err = (got.float() - expected.float()).abs().max().item()
            bound = BF16_RTOL_OF_MAX * expected.float().abs().max().item()
            assert err <= bound, f"{what} vs {expected_name}: {err:.3g}"


def test_stored_attention_computes_what_recomputed_attention_does():
    """Keeping the probabilities for the backward changes no arithmetic: the output and every gradient
    equal the recomputing op's bit for bit (chunks of two images, a shorter last chunk)."""
    q, k, v = (torch.randn(5, n, 16, dtype=torch.bfloat16) for n in (40, 30, 30))
    grad = torch.randn(5, 40, 16, dtype=torch.bfloat16)
    results = []
    for op in (torch.ops.cvt.stored_attention, torch.ops.cvt.recomputed_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = op(*leaves, 0.25, 2)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.backward(grad)
        results.append([out] + [t.grad for t in leaves])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "batch, heads, queries, keys, op",
    [(5, 1, 1500, 800, "cvt::recomputed_attention"), (4, 3, 197, 50, "cvt::key_major_attention"),
     (4, 3, 784, 196, "cvt::recomputed_attention")],
)
def test_bf16_inference_attention_paths(batch, heads, queries, keys, op):
    """In bf16 CPU inference, attention runs over few keys key-major (CvT's last stage), else in
    chunks of images with the scale inside the matmul and the softmax in place in a reused buffer:
    within bf16 rounding of the explicit bf16 arithmetic and of SDPA."""
    q, k, v = (torch.randn(batch, heads, n, 64, dtype=torch.bfloat16) for n in (queries, keys, keys))
    scale = (64 * heads) ** -0.5
    with torch.no_grad(), torch.profiler.profile() as profile:
        got = kernels_module.attention(q, k, v, scale, 0.0)
    assert op in {event.name for event in profile.events()}
    explicit = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1), v)
    for expected in (explicit, F.scaled_dot_product_attention(q, k, v, scale=scale)):
        err = (got.float() - expected.float()).abs().max().item()
        assert err <= BF16_RTOL_OF_MAX * expected.float().abs().max().item()


@pytest.mark.parametrize("tokens, path", [(50, "cvt_token_conv"), (300, "ConvolutionBackward0")])
def test_bf16_training_token_linear_takes_matmul_grads_on_few_tokens(monkeypatch, tokens, path):
    """In bf16 CPU training without AMX, a token linear over few tokens per image computes its
    gradients as matmuls (`cvt::token_conv`'s backward), over many as the 1x1 convolution's backward:
    the same forward bit for bit, gradients within bf16 rounding of fp32 ``F.linear``'s."""
    monkeypatch.setattr(kernels_module, "cpu_has_amx", lambda: False)
    x = torch.randn(3, tokens, 48)
    weight, bias = 0.2 * torch.randn(96, 48), torch.randn(96)
    grad = torch.randn(3, tokens, 96)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels_module.token_linear(*leaves)
        with torch.no_grad():
            conv_out = kernels_module.token_linear(x, weight, bias)
    assert any(path in name for name in _autograd_node_names(out))
    torch.testing.assert_close(out, conv_out, rtol=0, atol=0)
    with torch.profiler.profile() as profile:
        out.backward(grad.to(out.dtype))
    ran = {event.name for event in profile.events()}
    assert ("aten::convolution_backward" in ran) == (tokens > kernels_module._MATMUL_GRADS_MAX_TOKENS)
    assert ("aten::mm" in ran) == (tokens <= kernels_module._MATMUL_GRADS_MAX_TOKENS)
    expected = [t.clone().requires_grad_() for t in (x, weight, bias)]
    F.linear(*expected).backward(grad)
    for got, want in zip(leaves, expected):
        err = (got.grad - want.grad).abs().max().item()
        assert err <= BF16_RTOL_OF_MAX * want.grad.abs().max().item()


class _OpOutputs(TorchDispatchMode):
    """The outputs of every call of one op (``namespace::name``) while active, backward included."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op, self.outputs = op, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name().split(".")[0] == self.op:
            self.outputs.append(out)
        return out


def _backward_of(op, leaves: list[torch.Tensor], frozen: int, backward_op: str) -> tuple[list[torch.Tensor], set[str]]:
    """The gradients ``op(*leaves)`` hands back with leaf ``frozen`` not needing one, the outputs of
    ``backward_op`` (unneeded ones empty), and the aten ops the backward ran."""
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i != frozen)
    out = op(*leaves)
    with _OpOutputs(backward_op) as mode, torch.profiler.profile() as profile:
        out.backward(torch.ones_like(out))
    (computed,) = mode.outputs
    return list(computed), {event.name for event in profile.events()}


@pytest.mark.parametrize("dtype, tokens", [(torch.bfloat16, 50), (torch.bfloat16, 300), (torch.float32, 300)])
@pytest.mark.parametrize("frozen", [0, 1, 2])
def test_token_conv_backward_computes_only_the_gradients_needed(dtype, tokens, frozen):
    """`cvt::token_conv`'s backward computes the gradients of the inputs that need one (a frozen weight
    or bias, an input nothing trainable made, gets none computed), in both of its routes (matmuls over
    few tokens in bf16, the 1x1 convolution's backward otherwise), and the same ones as with all three."""
    x, weight, bias = torch.randn(3, tokens, 48, dtype=dtype), torch.randn(96, 48, dtype=dtype), torch.randn(96, dtype=dtype)
    expected = [t.clone().requires_grad_() for t in (x, weight, bias)]
    kernels_module._token_conv(*expected).backward(torch.ones(3, tokens, 96, dtype=dtype))
    leaves = [t.clone() for t in (x, weight, bias)]
    computed, ran = _backward_of(kernels_module._token_conv, leaves, frozen, "cvt::token_conv_backward")
    assert computed[frozen].numel() == 0 and leaves[frozen].grad is None
    if tokens <= kernels_module._MATMUL_GRADS_MAX_TOKENS and frozen < 2:
        assert "aten::convolution_backward" not in ran
    for i in {0, 1, 2} - {frozen}:
        torch.testing.assert_close(leaves[i].grad, expected[i].grad, rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [0, 1, 2])
def test_depthwise_conv_backward_computes_only_the_gradients_needed(frozen):
    """`cvt::depthwise_conv` (the projections under ``torch.compile``): its backward computes only the
    gradients needed, the same as with all three."""
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, 1, 3, 3), torch.randn(8)

    def conv(x, weight, bias):
        return kernels_module._depthwise_conv(x, weight, bias, [2, 2], [1, 1])

    expected = [t.clone().requires_grad_() for t in (x, weight, bias)]
    conv(*expected).backward(torch.ones(2, 8, 5, 4))
    leaves = [t.clone() for t in (x, weight, bias)]
    computed, _ = _backward_of(conv, leaves, frozen, "cvt::depthwise_conv_backward")
    assert computed[frozen].numel() == 0 and leaves[frozen].grad is None
    for i in {0, 1, 2} - {frozen}:
        torch.testing.assert_close(leaves[i].grad, expected[i].grad, rtol=0, atol=0)


def test_compile_caches_are_keyed_by_the_kernels_source(monkeypatch):
    """Inductor's caches do not see what the custom ops' backwards trace into: the kernels module's
    digest in torch.compile's cache key tag makes a changed module compile afresh instead of reusing a
    stale backward graph (which crashed on a changed op signature). A user's own tag is kept."""
    digest = hashlib.sha256(Path(kernels_module.__file__).read_bytes()).hexdigest()[:16]
    assert f"cvt-kernels-{digest}" in torch.compiler.config.cache_key_tag.split("+")
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "mine")
    kernels_module._tag_compile_caches()
    kernels_module._tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == f"mine+cvt-kernels-{digest}"


def test_dense_grad_hands_back_a_dense_channels_last_gradient():
    """A map whose tokens follow a cls token gets its gradient as a slice of the concatenation's;
    `dense_grad` hands the ops before it the same values, dense and channels-last (BatchNorm's
    backward is several times slower on the slice)."""
    x_map = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    seen: list[torch.Tensor] = []
    before = x_map * 2.0
    before.register_hook(seen.append)
    cls = torch.randn(2, 1, 4)
    tokens = torch.cat((cls, kernels_module.map_to_tokens(kernels_module.dense_grad(before))), dim=1)
    weight = torch.randn(2, 16, 4)
    (tokens * weight).sum().backward()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(seen[0], kernels_module.tokens_to_map(weight[:, 1:], 3, 5), rtol=0, atol=0)

# --------------------------------------------------------------------------------------------------
# torch.compile: one graph, no breaks, in train and eval mode
# --------------------------------------------------------------------------------------------------


def test_compiles_to_one_graph_in_train_and_eval():
    """fullgraph=True fails on any graph break. The 'aot_eager' backend traces forward and backward
    like inductor does but skips code generation, so this takes seconds; benchmarks/bench_model.py
    runs the real compiler (inductor) with fullgraph=True."""
    fast, ref = model_pair(small_spec())
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 96, 96)
    fast.train()
    ref.train()
    out, expected = compiled(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=EVAL_ATOL)
    out.sum().backward()
    expected.sum().backward()
    _assert_grads_close(fast, ref)
    fast.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=EVAL_ATOL)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _assert_bf16_close(compiled(x), ref(x))


def test_compiled_training_ops_keep_the_custom_op_contract():
    """The opaque ops compiled CPU training and inference run (kernels.py's cvt:: ops): their fake
    implementations give the real shapes, strides and dtypes (inductor plans its buffers from them),
    and their autograd registration is sound (torch.library.opcheck)."""
    tokens, weight, bias = torch.randn(2, 5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.randn(6)
    for args in [(tokens, weight, bias.requires_grad_()), (tokens, weight, None)]:
        torch.library.opcheck(torch.ops.cvt.token_conv.default, args)
    q, k, v = (torch.randn(2, n, 12, requires_grad=True) for n in (5, 7, 7))
    torch.library.opcheck(torch.ops.cvt.flash_attention.default, (q, k, v, 3, 0.3))
    # bf16 training's ops, eager and compiled: the token linear's matmul gradients, and attention over
    # (batch * heads, N, head_dim) tensors, two images at a time (a shorter last chunk) or key-major.
    bf16_args = tuple(t.detach().bfloat16().requires_grad_() for t in (tokens, weight, bias))
    torch.library.opcheck(torch.ops.cvt.token_conv.default, bf16_args)
    q_bf16, k_bf16, v_bf16 = (torch.randn(3, n, 4, dtype=torch.bfloat16, requires_grad=True) for n in (5, 7, 7))
    torch.library.opcheck(torch.ops.cvt.recomputed_attention.default, (q_bf16, k_bf16, v_bf16, 0.5, 2))
    torch.library.opcheck(torch.ops.cvt.stored_attention.default, (q_bf16, k_bf16, v_bf16, 0.5, 2))
    torch.library.opcheck(torch.ops.cvt.key_major_attention.default, (q_bf16, k_bf16, v_bf16, 0.5))
    with torch.no_grad():  # the inference-only ops, in both dtypes compiled inference takes them
        for dtype in [torch.float32, torch.bfloat16]:
            for args in [(tokens, weight, bias, "silu"), (tokens, weight, None, "gelu")]:
                args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args)
                torch.library.opcheck(torch.ops.cvt.token_conv_pointwise.default, args)
        q, k, v = (t.detach().bfloat16() for t in (q, k, v))
        torch.library.opcheck(torch.ops.cvt.flash_attention.default, (q, k, v, 3, 0.3))
        q_bf16, k_bf16, v_bf16 = (t.detach() for t in (q_bf16, k_bf16, v_bf16))
        torch.library.opcheck(torch.ops.cvt.recomputed_attention.default, (q_bf16, k_bf16, v_bf16, 0.5, 2))
        torch.library.opcheck(torch.ops.cvt.key_major_attention.default, (q_bf16, k_bf16, v_bf16, 0.5))
    x_map = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    for stride, conv_bias in [((1, 1), None), ((2, 2), None), ((2, 2), torch.randn(6, requires_grad=True))]:
        weight = torch.randn(6, 1, 3, 3, requires_grad=True)
        torch.library.opcheck(torch.ops.cvt.depthwise_conv.default, (x_map, weight, conv_bias, stride, (1, 1)))


@pytest.mark.slow
def test_inductor_training_step_equals_the_reference_through_the_opaque_ops(monkeypatch):
    """With the real compiler: a train-mode step gives the reference's logits, gradients and
    BatchNorm statistics, and the compiled code (forward and backward) calls the opaque token
    linear, attention and depthwise ops instead of letting inductor lay out their tensors. As a CPU
    without AMX runs it: with AMX the token linears are F.linear, whichever CPU runs the test."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(kernels_module, "cpu_has_amx", lambda: False)
    fast, ref = model_pair(small_spec())
    fast.train()
    ref.train()
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(3, 3, 96, 96)
    target = torch.randint(0, NUM_CLASSES, (3,))

    def step() -> torch.Tensor:
        out = compiled(x)
        F.cross_entropy(out, target).backward()
        return out

    got, code = run_and_get_code(step)
    expected = ref(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=EVAL_ATOL)
    F.cross_entropy(expected, target).backward()
    _assert_grads_close(fast, ref)
    ref_buffers = dict(ref.named_buffers())
    for name, buffer in fast.named_buffers():
        torch.testing.assert_close(buffer, ref_buffers[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    generated = "\n".join(code)
    for op in ["token_conv", "flash_attention", "depthwise_conv"]:
        for direction in ["", "_backward"]:
            assert f"torch.ops.cvt.{op}{direction}.default(" in generated, op + direction


@pytest.mark.slow
def test_inductor_bf16_training_step_runs_the_eager_bf16_ops(monkeypatch):
    """A compiled bf16 autocast train step gives our eager model's logits and gradients within bf16
    rounding, and its code calls the ops eager bf16 training takes (the token linears with matmul
    gradients, recomputed and key-major attention, the depthwise convolutions) rather than SDPA's
    kernels and inductor's layouts. The score threshold is lowered so that this small model's first
    stage recomputes, as CvT-13's does at 224 px."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(kernels_module, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(kernels_module, "_LARGE_SCORE_BYTES_PER_IMAGE", 2**16)
    fast, _ = model_pair(small_spec())
    fast.train()
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(3, 3, 96, 96)
    target = torch.randint(0, NUM_CLASSES, (3,))

    def step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), target).backward()
        return out, {name: p.grad.clone() for name, p in fast.named_parameters()}

    state = {k: v.clone() for k, v in fast.state_dict().items()}
    (got, got_grads), code = run_and_get_code(step, compiled)
    fast.load_state_dict(state)  # the same BatchNorm statistics for the eager step
    expected, expected_grads = step(fast)
    assert (got.float() - expected.float()).abs().max() <= BF16_RTOL_OF_MAX * expected.float().abs().max()
    floor = 0.01 * max(g.abs().max().item() for g in expected_grads.values())
    for name, grad in expected_grads.items():
        err = (got_grads[name].float() - grad.float()).abs().max().item()
        assert err <= 2 * BF16_RTOL_OF_MAX * max(grad.abs().max().item(), floor), name
    generated = "\n".join(code)
    for op in ["token_conv", "recomputed_attention", "key_major_attention", "depthwise_conv"]:
        for direction in ["", "_backward"]:
            assert f"torch.ops.cvt.{op}{direction}.default(" in generated, op + direction
    assert "scaled_dot_product" not in generated


@pytest.mark.slow
def test_inductor_inference_without_freezing_equals_the_reference_through_the_opaque_ops(monkeypatch):
    """Compiled no-grad inference without inductor's freezing (TRAIN.COMPILE's evaluation model), in
    fp32 and under bf16 autocast, gives the reference's logits, and its code calls the opaque ops, the
    MLP's activation fused into the first linear, instead of letting inductor lay out the token maps;
    the q, k and v projections of a block read one map (`kernels.stored_once`), not a copy each. As a
    CPU without AMX runs it (with AMX the token linears are F.linear)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(kernels_module, "cpu_has_amx", lambda: False)
    fast, ref = model_pair(small_spec())
    fast.eval()
    ref.eval()
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(3, 3, 96, 96)
    with inductor_config.patch(freezing=False), torch.no_grad():
        got, code = run_and_get_code(compiled, x)
        torch.testing.assert_close(got, ref(x), rtol=0, atol=EVAL_ATOL)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16, code_bf16 = run_and_get_code(compiled, x)
            _assert_bf16_close(got_bf16, ref(x))
    bf16_attention = ["recomputed_attention", "key_major_attention"]
    for generated, attention_ops in [("\n".join(code), ["flash_attention"]), ("\n".join(code_bf16), bf16_attention)]:
        for op in ["token_conv", "token_conv_pointwise", *attention_ops, "depthwise_conv"]:
            assert f"torch.ops.cvt.{op}.default(" in generated, op
        maps = re.findall(r"torch\.ops\.cvt\.depthwise_conv\.default\((?:reinterpret_tensor\()?(\w+)", generated)
        assert len(maps) == 3 * sum(SMALL["depth"])  # q, k, v per block, in call order
        assert all(len(set(maps[i : i + 3])) == 1 for i in range(0, len(maps), 3)), maps


@pytest.mark.slow
def test_inductor_bf16_inference_with_freezing_keeps_the_bf16_attention_ops():
    """With inductor's freezing, compiled bf16 inference leaves the token linears and convolutions to
    inductor's prepacked kernels but keeps eager bf16's attention ops (SDPA is slower there), and
    stays within bf16 rounding of the reference."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    fast, ref = model_pair(small_spec())
    fast.eval()
    ref.eval()
    x = torch.randn(3, 3, 96, 96)
    with inductor_config.patch(freezing=True), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, code = run_and_get_code(torch.compile(fast, fullgraph=True), x)
    with torch.no_grad():
        _assert_bf16_close(got, ref(x))
    generated = "\n".join(code)
    assert "torch.ops.cvt.recomputed_attention.default(" in generated
    assert "torch.ops.cvt.key_major_attention.default(" in generated
    assert "torch.ops.cvt.token_conv" not in generated


@pytest.mark.parametrize("portable", [False, True])
def test_eval_projection_folds_batchnorm_only_on_the_cpu_kernels_path(portable):
    """In eval mode the CPU kernels' path folds the projection's BatchNorm into the convolution (one
    pass over the map). The portable path, CUDA's, runs the convolution and the BatchNorm: there the
    fold's several small kernels per call cost more than the pass they save. The same function."""
    torch.manual_seed(0)
    projection = ConvProjection(32, kernel_size=3, stride=2, padding=1).eval()
    bn = projection.bn
    with torch.no_grad():
        for tensor, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.5, 2), (bn.weight, 0.5, 2), (bn.bias, -1, 1)):
            tensor.uniform_(low, high)
    x = torch.randn(2, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    with portable_kernels() if portable else contextlib.nullcontext(), torch.no_grad(), torch.profiler.profile() as profile:
        out = projection(x)
    ran = {event.name for event in profile.events()}
    assert ("aten::batch_norm" in ran) == portable
    assert ("aten::rsqrt" in ran) == (not portable)
    conv = F.conv2d(x, projection.conv.weight, None, stride=2, padding=1, groups=32)
    expected = F.batch_norm(conv, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

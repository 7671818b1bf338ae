"""Engine pieces in isolation: optimizer groups, LR scaling and schedule, the epoch loop, evaluation,
RNG and metrics bookkeeping. Tiny models on random tensors; no files except where a test needs one."""
from __future__ import annotations

import copy
import io
import json
import math
import os
import random
import subprocess
import sys
import warnings

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cvt.config import load_config
from cvt.training.state import load_optimizer_state, capture_rng, restore_rng, truncate_metrics
from cvt.training.distributed import all_reduce_sum, init_distributed, select_device
from cvt.training.loop import (LoopSettings, autocast_dtype, build_criterion, eval_autocast_dtype, evaluate,
                               train_one_epoch)
from cvt.training.optim import build_optimizer, build_scheduler, no_decay_names, param_groups, scaled_lr
from cvt.errors import UserError
from cvt.models import create_model

from helpers import TINY_SPEC

CPU = torch.device("cpu")


def _cfg(*opts: object):
    return load_config(None, [str(o) for o in ("NAME", "unit", *opts)])


def _tiny(method: str = "dw_bn", num_classes: int = 3) -> nn.Module:
    spec = dict(TINY_SPEC, QKV_PROJ_METHOD=[method] * 3, DROP_PATH_RATE=[0.0, 0.0, 0.0])
    return create_model(spec, num_classes=num_classes)


def _settings(**changes) -> LoopSettings:
    base = LoopSettings(device=CPU, amp_dtype=None, channels_last=False, accum_steps=1,
                        clip_grad_norm=0.0, nonfinite_loss="stop", print_freq=1000)
    return LoopSettings(**{**base.__dict__, **changes})


def _batches(n: int, size: int, num_classes: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, num_classes, (size,), generator=g), [])
            for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------


def test_no_decay_groups_follow_the_release_list():
    model = _tiny()
    names = no_decay_names(model, ["bn", "bias", "ln"])
    all_names = {n for n, _ in model.named_parameters()}
    assert "stage2.cls_token" in names  # model.no_weight_decay()
    assert "stage0.blocks.0.attn.conv_proj_q.bn.weight" in names  # 'bn' by module type
    assert {"stage0.blocks.0.norm1.weight", "stage1.patch_embed.norm.weight", "norm.weight"} <= names  # 'ln'
    assert {n for n in all_names if n.endswith(".bias")} <= names  # 'bias'
    decayed = all_names - names
    assert "stage0.blocks.0.attn.conv_proj_k.conv.weight" in decayed  # depthwise: only with 'dw'
    assert {"stage0.patch_embed.proj.weight", "head.weight", "stage1.blocks.0.mlp.fc1.weight"} <= decayed
    assert all(n.endswith(".weight") for n in decayed)

    with_dw = no_decay_names(model, ["dw"])
    assert {n for n in all_names if ".conv_proj_" in n and n.endswith("conv.weight")} == with_dw - {"stage2.cls_token"}
    # Any other entry matches as a piece of the name.
    assert no_decay_names(model, ["head"]) == {"stage2.cls_token", "head.weight", "head.bias"}


def test_param_groups_carry_the_decay():
    model = _tiny()
    decay, no_decay = param_groups(model, 0.05, ["bn", "bias", "ln"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    exempt = no_decay_names(model, ["bn", "bias", "ln"])
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in no_decay["params"]} == exempt


@pytest.mark.parametrize("scale, world, accum, expected", [(True, 1, 1, 1e-3), (True, 8, 1, 8e-3),
                                                           (True, 4, 2, 8e-3), (False, 8, 2, 1e-3)])
def test_lr_scaling(scale, world, accum, expected):
    cfg = _cfg("TRAIN.LR", 1e-3, "TRAIN.SCALE_LR", scale, "TRAIN.ACCUM_STEPS", accum)
    assert scaled_lr(cfg, world) == pytest.approx(expected)


def test_optimizers_from_config():
    model = _tiny()
    sgd = build_optimizer(_cfg("TRAIN.OPTIMIZER", "sgd", "TRAIN.MOMENTUM", 0.8, "TRAIN.NESTEROV", True), model, 0.1, CPU)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"]
    adamw = build_optimizer(_cfg("TRAIN.OPTIMIZER", "adamW", "TRAIN.WD", 0.05, "TRAIN.OPTIMIZER_ARGS.betas", (0.8, 0.9)),
                            model, 0.1, CPU)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["fused"]
    assert tuple(adamw.param_groups[0]["betas"]) == (0.8, 0.9)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert isinstance(build_optimizer(_cfg("TRAIN.OPTIMIZER", "adam"), model, 0.1, CPU), torch.optim.Adam)
    with pytest.raises(UserError, match="OPTIMIZER_ARGS"):
        build_optimizer(_cfg("TRAIN.OPTIMIZER", "sgd", "TRAIN.OPTIMIZER_ARGS.bogus", 1), model, 0.1, CPU)


def test_fused_adamw_default_gives_way_to_a_foreach_choice():
    model = _tiny()
    cuda = torch.device("cuda")  # only its type is read: fused AdamW is the default
    adamw = build_optimizer(_cfg("TRAIN.OPTIMIZER", "adamW", "TRAIN.OPTIMIZER_ARGS.foreach", True), model, 0.1, cuda)
    assert adamw.param_groups[0]["foreach"] and not adamw.param_groups[0]["fused"]
    assert build_optimizer(_cfg("TRAIN.OPTIMIZER", "adamW"), model, 0.1, cuda).param_groups[0]["fused"]
    with pytest.raises(UserError, match="OPTIMIZER_ARGS"):  # torch's RuntimeError, as one line
        build_optimizer(_cfg("TRAIN.OPTIMIZER", "adamW", "TRAIN.OPTIMIZER_ARGS.foreach", True,
                             "TRAIN.OPTIMIZER_ARGS.fused", True), model, 0.1, CPU)


@pytest.mark.parametrize("saved_fused", [False, True])
def test_resumed_optimizer_keeps_this_devices_kernel_choice(saved_fused):
    """A checkpoint written on a GPU (fused AdamW) resumed on a CPU, and the reverse."""
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)

    def adamw(fused: bool) -> torch.optim.AdamW:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)

    saved = adamw(saved_fused)
    model(x).sum().backward()
    saved.step()
    resumed = adamw(not saved_fused)
    load_optimizer_state(resumed, saved.state_dict())
    assert bool(resumed.param_groups[0]["fused"]) == (not saved_fused)
    assert resumed.state_dict()["state"][0]["step"] == 1
    resumed.step()  # the loaded state suits the kernel
    assert resumed.state_dict()["state"][0]["step"] == 2


def test_one_visible_gpu_serves_any_local_rank(monkeypatch):
    """Clusters that bind one GPU per process show each process its own as cuda:0; two processes on a
    one-GPU node without such a binding are a mistake."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert select_device(3) == torch.device("cuda", 0) and chosen == [0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(UserError, match="LOCAL_RANK 1 but only 1 GPU"):
        select_device(1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="LOCAL_RANK 3 but only 2 GPU"):
        select_device(3)


def test_cosine_schedule_with_warmup():
    cfg = _cfg(
        "TRAIN.END_EPOCH", 100, "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", 5,
        "TRAIN.LR_SCHEDULER.ARGS.warmup_lr", 1e-6, "TRAIN.LR_SCHEDULER.ARGS.min_lr", 1e-5,
    )
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(cfg, optimizer)

    def lr_at(epoch: int) -> float:
        scheduler.step(epoch)
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(1e-6)
    assert lr_at(1) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 5)  # linear warmup
    assert lr_at(5) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 5 / 100)))
    assert lr_at(50) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(100) == pytest.approx(1e-5)
    with pytest.raises(UserError, match="TRAIN.LR_SCHEDULER.METHOD"):
        build_scheduler(_cfg("TRAIN.LR_SCHEDULER.METHOD", "MultiStep"), optimizer)


def test_the_plateau_schedule_builds_without_timm_s_resume_warning():
    """timm warns that a resumed plateau schedule restarts its logic; checkpoint.pth here keeps it
    (cvt.training.state), so the warning would mislead: it is not shown."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_scheduler(_cfg("TRAIN.LR_SCHEDULER.ARGS.sched", "plateau"), optimizer)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def _cosine_lrs(*opts: object) -> list[float]:
    """The learning rate of epochs 0-19 of a 10-epoch cosine schedule from 1e-3 without warmup."""
    cfg = _cfg("TRAIN.END_EPOCH", 10, "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", 0, "TRAIN.LR_SCHEDULER.ARGS.min_lr", 0.0, *opts)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(cfg, optimizer)
    lrs = []
    for epoch in range(20):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_schedule_noise_and_cycle_keys_reach_timm():
    plain = _cosine_lrs()
    noisy = _cosine_lrs("TRAIN.LR_SCHEDULER.ARGS.noise", [0.5], "TRAIN.LR_SCHEDULER.ARGS.noise_pct", 0.5)
    assert noisy[:5] == plain[:5]  # noise starts at half the run
    assert all(n != p for n, p in zip(noisy[5:10], plain[5:10]))
    assert all(abs(n / p - 1) <= 0.5 for n, p in zip(noisy[5:10], plain[5:10]))  # noise_pct bounds it
    assert _cosine_lrs("TRAIN.LR_SCHEDULER.ARGS.noise", [0.5], "TRAIN.LR_SCHEDULER.ARGS.noise_pct", 0.5) == noisy
    assert _cosine_lrs("TRAIN.LR_SCHEDULER.ARGS.noise", [0.5], "SEED", 1) != noisy  # seeded with SEED
    assert plain[10] == 0.0  # one cycle, then min_lr
    two_cycles = _cosine_lrs("TRAIN.LR_SCHEDULER.ARGS.lr_cycle_limit", 2)
    assert two_cycles[10] == pytest.approx(1e-4)  # a restart, at timm's cycle_decay 0.1
    assert two_cycles[19] < 0.1e-4  # the second cycle as long as the first: nearly 0 at its end
    longer = _cosine_lrs("TRAIN.LR_SCHEDULER.ARGS.lr_cycle_limit", 2, "TRAIN.LR_SCHEDULER.ARGS.lr_cycle_mul", 2.0)
    assert longer[19] > 0.5e-4  # twice as long: not half way down yet


# --------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------


def test_accumulation_equals_one_full_batch():
    """Two half batches accumulated give the full batch's mean gradient, hence the same SGD step.

    The 'linear' projection has no BatchNorm, whose batch statistics would differ between a batch
    of 8 and two of 4; with it the two runs differ only by float summation order."""
    torch.manual_seed(0)
    full_model = _tiny("linear")
    accum_model = copy.deepcopy(full_model)
    full = _batches(2, 8)
    halves = [(x[i:i + 4], y[i:i + 4], []) for x, y, _ in full for i in (0, 4)]
    for model, batches, accum in ((full_model, full, 1), (accum_model, halves, 2)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        result = train_one_epoch(model, batches, nn.CrossEntropyLoss(), opt, _settings(accum_steps=accum),
                                 epoch=0, scaler=torch.amp.GradScaler("cpu", enabled=False))
        assert result.steps == 2 and result.images == 16
    for (name, a), b in zip(full_model.state_dict().items(), accum_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class _NanOnBatch(nn.Module):
    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, output, target):
        loss = nn.functional.cross_entropy(output, target)
        self.calls += 1
        return loss * float("nan") if self.calls == self.bad_call else loss


def test_nonfinite_loss_stop_names_epoch_and_step():
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match=r"epoch 4, step 1"):
        train_one_epoch(model, _batches(3, 4), _NanOnBatch(2), opt, _settings(), epoch=4,
                        scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_nonfinite_loss_skip_leaves_weights_alone():
    model = _tiny()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_one_epoch(model, _batches(1, 4), _NanOnBatch(1), opt, _settings(nonfinite_loss="skip"), epoch=0,
                             scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert result.skipped_steps == 1 and result.images == 0
    params = dict(model.named_parameters())
    for name, value in before.items():
        if name in params:  # BatchNorm running stats move in the forward pass; weights must not
            assert torch.equal(value, params[name]), name


def test_stop_request_ends_the_epoch_after_the_current_step():
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_one_epoch(model, _batches(5, 4), nn.CrossEntropyLoss(), opt, _settings(), epoch=0,
                             scaler=torch.amp.GradScaler("cpu", enabled=False), stop_requested=lambda: True)
    assert result.interrupted and result.steps == 1 and result.images == 4


def test_ema_follows_each_step_and_clipping_runs():
    from timm.utils import ModelEmaV3

    model = _tiny()
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, _batches(2, 4), nn.CrossEntropyLoss(), opt, _settings(clip_grad_norm=0.01), epoch=0,
                    scaler=torch.amp.GradScaler("cpu", enabled=False), ema=ema)
    weight = "head.weight"
    assert not torch.equal(ema.module.state_dict()[weight], model.state_dict()[weight])


def test_bfloat16_autocast_trains_on_cpu():
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = train_one_epoch(model, _batches(2, 4), nn.CrossEntropyLoss(), opt, _settings(amp_dtype=torch.bfloat16,
                             channels_last=True), epoch=0, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert math.isfinite(result.loss)
    assert model.head.weight.dtype == torch.float32


class _HostSyncs(TorchFunctionMode):
    """Records, in order, every call that makes the host wait for the device on CUDA (reading a value
    back, or copying Python data to the loop's device), from any code, torch's own included, and a
    marker each time the loader hands out a batch, and at its end. On CPU nothing waits; the calls are the same."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS or (name in ("tensor", "as_tensor") and "device" in kwargs):
            self.events.append(name)
        return func(*args, **kwargs)

    def loader(self, batches: list):
        recorder = self

        class Loader:
            def __len__(self) -> int:
                return len(batches)

            def __iter__(self):
                for batch in batches:
                    recorder.events.append("batch")
                    yield batch
                recorder.events.append("end")  # the loop asked for one more: the epoch's batches are done

        return Loader()

    def per_batch(self) -> list[list[str]]:
        """The calls made while each batch was processed, then (last) those after the loop."""
        groups: list[list[str]] = []
        for event in self.events:
            if event in ("batch", "end"):
                groups.append([])
            elif groups:
                groups[-1].append(event)
        return groups


@pytest.mark.parametrize("amp, accum", [("float16", 1), ("none", 2)])
def test_one_host_sync_per_optimizer_step(amp, accum, monkeypatch):
    # The CUDA design: a step queues its work and reads back one thing, the shared non-finite/stop
    # flags (`.tolist()`); nothing else waits for the device, not the fp16 GradScaler (fused AdamW
    # takes its scale and inf flag on the device), clipping or the EMA. The progress line's loss
    # (`.item()`) is read only when a line is due: here at the epoch's last batch only, however slow
    # the machine (a line is also due after QUIET_LIMIT_S quiet seconds: a loaded machine got one mid-epoch).
    from timm.utils import ModelEmaV3

    from cvt.training import loop

    monkeypatch.setattr(loop._Progress, "QUIET_LIMIT_S", math.inf)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fp16 = amp == "float16"
    settings = _settings(amp_dtype=torch.float16 if fp16 else None, channels_last=True, accum_steps=accum,
                         clip_grad_norm=1.0, print_freq=1000)
    syncs = _HostSyncs()
    batches = _batches(6, 4)
    with syncs:
        result = train_one_epoch(model, syncs.loader(batches), nn.CrossEntropyLoss(), opt, settings, epoch=0,
                                 scaler=torch.amp.GradScaler("cpu", enabled=fp16), ema=ModelEmaV3(model, decay=0.9))
    assert result.steps == 6 // accum and math.isfinite(result.loss)
    *steps, last, after_loop = syncs.per_batch()
    for index, calls in enumerate(steps):
        last_of_step = (index + 1) % accum == 0
        assert calls == (["tolist"] if last_of_step else []), (index, calls)
    assert last == ["tolist", "item"]  # the final progress line
    assert after_loop == ["tensor", "tolist"]  # the epoch's totals, once


def test_evaluate_counts_every_image_and_skips_empty_batches():
    model = _tiny(num_classes=7).eval()
    batches = _batches(3, 5, num_classes=7)
    batches.insert(1, (torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long), [("x.png", "truncated")]))
    metrics = evaluate(model, batches, _settings())
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _, _ in batches if len(x)])
    targets = torch.cat([y for _, y, _ in batches])
    top5 = logits.topk(5, dim=1).indices
    assert metrics["images"] == 15
    assert metrics["top1"] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    assert metrics["top5"] == pytest.approx(100 * (top5 == targets[:, None]).any(1).float().mean().item())
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)


def _release_scores(logits, targets, valid, real):
    """The release's test() with RealLabelsImagenet, written out: a boolean column mask (index order),
    plain cross-entropy, top-k over the kept columns; ReaL counts an image with labels when any of its
    top-k is one of them."""
    mask = [i in set(valid) for i in range(logits.shape[1])] if valid else None
    out = logits[:, mask] if mask else logits
    pred = out.topk(5, 1).indices
    correct = {k: [] for k in (1, 5)}
    for p, labels in zip(pred.tolist(), real or []):
        if labels:
            for k in (1, 5):
                correct[k].append(any(c in labels for c in p[:k]))
    return {
        "loss": nn.functional.cross_entropy(out, targets).item(),
        "top1": 100 * (pred[:, 0] == targets).float().mean().item(),
        "top5": 100 * (pred == targets[:, None]).any(1).float().mean().item(),
        **({f"real_top{k}": 100 * float(np.mean(correct[k])) for k in (1, 5)} if real else {}),
    }


def test_valid_labels_and_real_labels_score_as_the_release():
    from cvt.data.labels import RealLabels

    model = _tiny(num_classes=20).eval()
    valid = [1, 3, 4, 8, 9, 12, 15, 19]  # the test folder holds these 8 classes, in index order
    batches = _batches(3, 6, num_classes=len(valid), seed=1)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _, _ in batches])
    targets = torch.cat([y for _, y, _ in batches])
    metrics = evaluate(model, batches, _settings(), valid_labels=valid)
    for key, value in _release_scores(logits, targets, valid, None).items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key

    g = torch.Generator().manual_seed(2)
    real_lists = [sorted(set(torch.randint(0, 20, (int(n),), generator=g).tolist()))
                  for n in torch.randint(0, 4, (18,), generator=g)]
    width = max(map(len, real_lists))
    real = RealLabels(targets=torch.randint(0, 20, (18,), generator=g),
                      labels=torch.tensor([r + [-1] * (width - len(r)) for r in real_lists]))
    indexed = [(x, torch.arange(i * 6, i * 6 + 6), []) for i, (x, _, _) in enumerate(batches)]  # sample indices
    metrics = evaluate(model, indexed, _settings(), real_labels=real)
    expected = _release_scores(logits, real.targets, None, real_lists)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key
    assert metrics["real_images"] == sum(1 for r in real_lists if r)
    # Counts, not per-shard means: two shards (as two processes get) add up to the whole exactly.
    shards = [evaluate(model, indexed[i::2], _settings(), real_labels=real) for i in (0, 1)]
    for key in ("real_top1", "real_top5"):
        hits = sum(round(m[key] * m["real_images"] / 100) for m in shards)
        assert hits == round(metrics[key] * metrics["real_images"] / 100)


def test_evaluation_runs_in_float32_unless_test_amp():
    """The release tests without autocast: AMP.ENABLED (the recipes' setting) leaves evaluation in float32."""
    model = _tiny().eval()
    batches = _batches(2, 4)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _, _ in batches])
    expected = nn.functional.cross_entropy(logits, torch.cat([y for _, y, _ in batches])).item()
    fp32 = evaluate(model, batches, LoopSettings.from_config(_cfg("AMP.ENABLED", True), CPU))
    assert fp32["loss"] == pytest.approx(expected, rel=1e-6)
    bf16 = evaluate(model, batches, LoopSettings.from_config(_cfg("AMP.ENABLED", True, "TEST.AMP", True), CPU))
    assert bf16["loss"] != pytest.approx(expected, rel=1e-6)  # autocast only when asked


def test_gradient_scaler_overflow_skips_are_counted():
    """A float16-range overflow makes the scaler skip the step and lower its scale, as in the release;
    the epoch counts those steps. A scale of 2**127 overflows float32 too, so this runs on the CPU."""
    model = _tiny("linear")
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    result = train_one_epoch(model, _batches(3, 4), nn.CrossEntropyLoss(), opt, _settings(), epoch=0, scaler=scaler)
    assert result.overflow_steps == round(math.log2(2.0**127 / scaler.get_scale())) > 0
    assert result.steps == 3 and result.skipped_steps == 0
    if result.overflow_steps == 3:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    modest = train_one_epoch(model, _batches(3, 4), nn.CrossEntropyLoss(), opt, _settings(), epoch=1,
                             scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    assert modest.overflow_steps == 0
    plain = train_one_epoch(model, _batches(1, 4), nn.CrossEntropyLoss(), opt, _settings(), epoch=2,
                            scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert plain.overflow_steps is None  # no scaler, nothing to count


def test_autocast_dtype_and_criterion_choice():
    assert autocast_dtype(_cfg("AMP.ENABLED", False), CPU) is None
    assert autocast_dtype(_cfg("AMP.ENABLED", True), CPU) == torch.bfloat16
    with pytest.raises(UserError, match="float16"):
        autocast_dtype(_cfg("AMP.ENABLED", True, "AMP.DTYPE", "float16"), CPU)
    # On CUDA 'auto' is the release's float16 with a gradient scaler on every GPU; bfloat16 one key away.
    cuda = torch.device("cuda")
    assert autocast_dtype(_cfg("AMP.ENABLED", True), cuda) == torch.float16
    assert autocast_dtype(_cfg("AMP.ENABLED", True, "AMP.DTYPE", "bfloat16"), cuda) == torch.bfloat16
    settings = LoopSettings.from_config(_cfg("AMP.ENABLED", True), cuda)
    assert settings.uses_grad_scaler and settings.eval_amp_dtype is None  # evaluation in float32
    assert eval_autocast_dtype(_cfg("AMP.ENABLED", True, "TEST.AMP", True), cuda) == torch.float16

    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    assert isinstance(build_criterion(_cfg(), None), nn.CrossEntropyLoss)
    assert isinstance(build_criterion(_cfg("LOSS.LABEL_SMOOTHING", 0.1), None), LabelSmoothingCrossEntropy)
    assert isinstance(build_criterion(_cfg("LOSS.LABEL_SMOOTHING", 0.1), object()), SoftTargetCrossEntropy)
    with pytest.raises(UserError, match="LOSS.LOSS"):
        build_criterion(_cfg("LOSS.LOSS", "bce"), None)


# --------------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------------


def test_rng_states_survive_a_weights_only_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    buffer = io.BytesIO()
    torch.save({"rng": capture_rng()}, buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    buffer.seek(0)
    states = torch.load(buffer, weights_only=True)["rng"]
    assert restore_rng(states, rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not restore_rng(states, rank=1)  # no state saved for that rank


def test_truncate_metrics_keeps_earlier_epochs_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": e, "val_top1": e}) for e in range(4)]
    path.write_text("\n".join(lines) + '\n{"epoch": 4, "val_t')
    truncate_metrics(path, 2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]
    truncate_metrics(tmp_path / "absent.jsonl", 0)
    assert not (tmp_path / "absent.jsonl").exists()


def test_single_process_without_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = init_distributed(60)
    assert (env.rank, env.world_size, env.is_main, env.distributed, env.device) == (0, 1, True, False, CPU)
    t = torch.ones(2)
    assert torch.equal(all_reduce_sum(t), torch.ones(2))


# --------------------------------------------------------------------------------------------------
# CPU threads, progress lines, the run's log
# --------------------------------------------------------------------------------------------------


_REPEATED_TENSOR_FAULTS = """
import resource, torch
from cvt.models import kernels
from cvt.training.session import keep_freed_memory
def faults_of(tensors):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(tensors):
        torch.ones(2**24)  # 64 MiB, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of(2)
by_default = faults_of(5)
kept = keep_freed_memory()
faults_of(30)  # the heap settles
print(by_default, kept, faults_of(5), kernels._kept_allocation_bytes)
"""


def _huge_pages_always() -> bool:
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _huge_pages_always(),
                    reason="glibc's malloc, 4 KiB pages (huge pages fault far less often)")
def test_keep_freed_memory_stops_big_tensors_faulting_their_pages_in_anew():
    """In a fresh process (the setting lasts for the process): by default glibc maps every big tensor
    anew and each of its pages faults; once told to keep freed memory, tensors reuse freed memory, and
    the model's kernels are told below which size."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", _REPEATED_TENSOR_FAULTS], env=env, capture_output=True, text=True, check=True)
    by_default, threshold, after, told_kernels = map(int, out.stdout.split())
    assert told_kernels == threshold  # the kernels know which tensors reuse freed memory
    if threshold < 2**26:
        pytest.skip(f"this glibc took an mmap threshold of {threshold} bytes, below the test's 64 MiB tensors")
    assert by_default > 5 * 10_000 and after == 0, out.stdout


def test_cpu_threads_one_for_a_demo_sized_model_else_the_usable_cores(monkeypatch, caplog):
    from cvt.training import session

    monkeypatch.setattr(session, "usable_cores", lambda: 6)
    demo = load_config("cvt-digits")
    small = create_model(dict(demo.MODEL.SPEC), num_classes=10)
    assert session.choose_cpu_threads(0, small, (32, 32), 64) == 1
    with torch.device("meta"):  # shapes only: CvT-13 at 224, batch 32
        large = create_model("cvt-13")
    assert session.choose_cpu_threads(0, large, (224, 224), 32) == 6
    assert session.choose_cpu_threads(3, small, (32, 32), 64) == 3  # CPU_THREADS set: taken as it is

    before = torch.get_num_threads()
    caplog.set_level("INFO", logger="cvt")
    with session.cpu_threads(0, small, (32, 32), 64, CPU) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before  # the caller's count back
    assert "CPU threads: 1 (chosen for this model's size" in caplog.text
    with session.cpu_threads(3, small, (32, 32), 64, torch.device("meta")) as threads:
        assert threads == torch.get_num_threads() == before  # not on the CPU: left alone
    with pytest.raises(UserError, match="CPU_THREADS"):
        _cfg("CPU_THREADS", -1)


def test_progress_lines_carry_rate_and_eta_and_come_at_least_every_few_seconds(monkeypatch, caplog):
    from cvt.training import loop

    now = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])

    def two_seconds_a_batch():
        for batch in _batches(6, 2):
            now[0] += 2.0
            yield batch

    class Loader(list):
        def __iter__(self):
            return two_seconds_a_batch()

    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level("INFO", logger="cvt")
    train_one_epoch(model, Loader(range(6)), nn.CrossEntropyLoss(), opt, _settings(print_freq=1000), epoch=0,
                    scaler=torch.amp.GradScaler("cpu", enabled=False))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0 [")]
    # PRINT_FREQ 1000 alone would print the last step only; 5 quiet seconds add the one at 6 s.
    assert [line.split(" loss ")[0] for line in lines] == ["epoch 0 [3/6]", "epoch 0 [6/6]"]
    assert lines[0].endswith(" 1 img/s, ETA 0:06") and lines[1].endswith("ETA 0:00")


def test_an_error_that_ends_a_run_is_in_its_log(tmp_path):
    from cvt.training.session import run_logging

    with pytest.raises(UserError), run_logging(tmp_path, is_main=True):
        raise UserError("DATASET.ROOT: folder /nope not found; set DATASET.ROOT")
    with pytest.raises(ZeroDivisionError), run_logging(tmp_path, is_main=True):
        1 / 0
    text = (tmp_path / "log.txt").read_text()
    assert "ERROR stopped by an error: DATASET.ROOT: folder /nope not found" in text
    assert "Traceback" in text and "ZeroDivisionError" in text  # a bug keeps its traceback


def test_gradients_have_their_parameters_strides():
    """DDP copies each gradient into a bucket view laid out as its parameter and warns on every rank
    ("Grad strides do not match bucket view strides") where the two differ."""
    for memory_format in (torch.preserve_format, torch.channels_last):
        model = _tiny().to(memory_format=memory_format)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        for name, param in model.named_parameters():
            assert param.grad.stride() == param.stride(), (memory_format, name)

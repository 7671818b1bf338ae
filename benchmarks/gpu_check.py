"""Every CUDA claim of the project, checked in one short run: numbers, training, launch, speed.

    python benchmarks/gpu_check.py --device cuda --json gpu_check.json      # on a GPU: ~5 min
    python benchmarks/gpu_check.py --device cpu --no-write                  # the same logic, tiny: ~1 min

Sections, in order, with the time each takes on one H100/H200 (the budget skips a section that no
longer fits, and stops a running one when it is spent, reporting what it skipped):

  logits   ~15 s  CvT-13 with random weights and random BatchNorm statistics: CUDA logits against the
                  CPU's fp32 logits (TF32 off, within 1e-4 of max(1, |logit|)), under bf16 (5e-2) and
                  fp16 (1e-2) autocast, and the gradients of one fp32 training step (1e-3 per tensor)
  syncs    ~10 s  host syncs per optimizer step of train_one_epoch (fp16, GradScaler, fused AdamW,
                  clipping, EMA) under CUDA's sync debug mode: exactly one, the flags' .tolist()
  demo     ~90 s  the digits demo through the library (load_config + train), 6 epochs: fp16 with a
                  GradScaler and bf16, val top-1 rises to 90%; fp16 under DETERMINISTIC stopped by
                  SIGINT in epoch 1 and resumed ends with an uninterrupted run's weights, bit for bit
  torchrun ~40 s  `torchrun --nproc_per_node 1` on the demo for one epoch, and NCCL itself in a
                  one-rank group (collectives and a DDP step): one rank never builds a process group
  perf     ~40 s  against transformers' CvtForImageClassification, one process, interleaved, bf16
                  autocast for both, batch 64 at 224: training step >= 2x the peer's throughput,
                  inference >= 2x; peak training memory at 384, batch 64 <= 0.6x; MFU of the training
                  step against the GPU's bf16 peak (known for H100, H200, A100)
  compiled ~150 s the same two ratios with our model under torch.compile with CUDA graphs (mode
                  reduce-overhead, TRAIN.COMPILE_MODE's), the peer eager; and the digits demo trained
                  for 2 epochs with TRAIN.COMPILE and that mode (bf16)

Then one verdict table is printed and appended, with GPU, driver, torch and transformers versions, to
benchmarks/RESULTS.md (unless --no-write), and written as JSON to --json. Exit status: 0 when every
section ran and every check passed, 1 otherwise (a failed check, a section skipped or stopped). On
the CPU the sections run at tiny sizes (fp16, the sync count and the speed targets need CUDA and are
skipped or reported without a verdict); tests/test_gpu_check.py runs it so.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
# The check is of this tree, whatever else is installed; the subprocesses inherit it.
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
# cuBLAS reads this once, when CUDA starts; the DETERMINISTIC demo runs later in this process need it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import append_to_section, cpu_model, git_revision, interleaved, markdown_table, median, synchronizer  # noqa: E402

from cvt.files import atomic_write_text  # noqa: E402

HEADING = "GPU check"
SECTIONS = ("logits", "syncs", "demo", "torchrun", "perf", "compiled")
COMPILE_MODE = "reduce-overhead"
# The CPU run's model. Stage i needs more than i blocks: the peer indexes its per-block drop-path
# rates by stage number.
TINY_SPEC = {"NUM_STAGES": 3, "DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "DEPTH": [1, 2, 3]}
# Dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets, by a part of the device name; the
# first match wins, so the specific names come first.
BF16_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
              ("H200", 989e12), ("A100", 312e12))


@dataclass(frozen=True)
class Sizes:
    """How big each section runs, and how long it is expected to take (for the budget)."""

    spec: str | dict  # the model of the logits and perf sections
    size: int
    logits_batch: int
    demo_epochs: int
    demo_top1_floor: float  # final val top-1 (%) the demo must reach
    perf_batch: int
    rounds: int
    warmup: int
    memory_size: int
    memory_batch: int
    seconds: dict[str, float]


CUDA_SIZES = Sizes("cvt-13", 224, 8, 6, 90.0, 64, 10, 3, 384, 64,
                   {"logits": 15, "syncs": 10, "demo": 90, "torchrun": 40, "perf": 40, "compiled": 150})
CPU_SIZES = Sizes(TINY_SPEC, 32, 2, 2, 85.0, 2, 2, 1, 32, 2,
                  {"logits": 3, "syncs": 1, "demo": 40, "torchrun": 30, "perf": 8, "compiled": 60})


@dataclass
class Check:
    section: str
    name: str
    value: str
    limit: str  # what passes; "" for a figure reported without a target
    status: str  # "pass", "FAIL" or "info"
    detail: str = ""


class BudgetSpent(BaseException):
    """The --budget-s deadline passed (raised by SIGALRM in whatever was running). Not an Exception,
    so that the handlers recording a part's failure let it through."""


@dataclass
class Report:
    device: torch.device
    sizes: Sizes
    deadline: float
    checks: list[Check] = field(default_factory=list)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, section: str, name: str, value: float | str, limit: str = "", ok: bool | None = None,
            detail: str = "", fmt: str = ".3g") -> None:
        shown = format(value, fmt) if isinstance(value, float) else str(value)
        status = "info" if ok is None else ("pass" if ok else "FAIL")
        self.checks.append(Check(section, name, shown, limit, status, detail))
        print(f"  [{status}] {name}: {shown}{f' (limit {limit})' if limit else ''}{f'; {detail}' if detail else ''}",
              flush=True)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def verdict(self) -> str:
        if any(c.status == "FAIL" for c in self.checks):
            return "FAIL"
        return "pass" if all(s["status"] == "done" for s in self.sections.values()) else "incomplete"


# --------------------------------------------------------------------------------------------------
# logits: CUDA against CPU fp32
# --------------------------------------------------------------------------------------------------


def random_model(spec: str | dict, seed: int = 0) -> nn.Module:
    """The layout with random weights and random BatchNorm statistics (so the folded BatchNorm of eval
    mode computes something other than the identity), no stochastic depth."""
    from cvt.models.cvt import create_model

    torch.manual_seed(seed)
    model = create_model(spec, 1000, drop_path_rate=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
            module.weight.data.uniform_(0.8, 1.2, generator=g)
            module.bias.data.normal_(0, 0.1, generator=g)
    return model


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference over the reference's scale (at least 1: small logits compare absolutely)."""
    return ((out.float().cpu() - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def check_logits(report: Report) -> None:
    device, sizes = report.device, report.sizes
    reference = random_model(sizes.spec).eval()
    on_device = copy.deepcopy(reference).to(device)
    x = torch.randn(sizes.logits_batch, 3, sizes.size, sizes.size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = reference(x)
        with true_fp32():
            error = relative_error(on_device(x.to(device)), ref)
        report.add("logits", "fp32 logits (TF32 off) vs CPU fp32", error, "<= 1e-4", error <= 1e-4,
                   detail=f"batch {sizes.logits_batch} at {sizes.size}px")
        for dtype, tolerance in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            name = f"{str(dtype).split('.')[-1]} autocast logits vs CPU fp32"
            if dtype == torch.float16 and device.type != "cuda":
                report.add("logits", name, "skipped", detail="fp16 autocast is CUDA-only here (AMP.DTYPE float16)")
                continue
            with torch.autocast(device.type, dtype=dtype):
                error = relative_error(on_device(x.to(device)), ref)
            report.add("logits", name, error, f"<= {tolerance:g}", error <= tolerance)
    check_gradients(report, reference.train(), on_device.train(), x)


def check_gradients(report: Report, reference: nn.Module, on_device: nn.Module, x: torch.Tensor) -> None:
    """One fp32 training step's gradients (BatchNorm on batch statistics): the worst tensor's
    |g_device - g_cpu| / |g_cpu| (norms; a tensor whose gradient is next to nothing is measured
    against a thousandth of the largest one's instead, so rounding noise on nothing is not a failure)."""
    y = torch.arange(x.shape[0]) % 1000
    F.cross_entropy(reference(x), y).backward()
    with true_fp32():
        F.cross_entropy(on_device(x.to(report.device)), y.to(report.device)).backward()
    worst, worst_name = 0.0, ""
    device_params = dict(on_device.named_parameters())
    floor = 1e-3 * max(p.grad.norm().item() for p in reference.parameters())
    for name, param in reference.named_parameters():
        grad, device_grad = param.grad, device_params[name].grad.cpu()
        error = ((device_grad - grad).norm() / max(grad.norm().item(), floor, 1e-30)).item()
        if error > worst:
            worst, worst_name = error, name
    report.add("logits", "fp32 training-step gradients vs CPU", worst, "<= 1e-3", worst <= 1e-3,
               detail=f"worst tensor {worst_name or '-'}")


# --------------------------------------------------------------------------------------------------
# syncs: host syncs per optimizer step (CUDA's sync debug mode)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cuda_sync_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Every synchronizing CUDA operation as a recorded warning (CUDA's sync debug mode)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")


def syncs_per_batch(
    device: torch.device, counting: Callable[[], contextlib.AbstractContextManager[list]]
) -> tuple[list[int], list]:
    """Host syncs while each batch of one fp16 epoch is processed (GradScaler, fused AdamW, clipping,
    EMA), as `counting` records them; and what it recorded."""
    from timm.utils import ModelEmaV3

    from cvt.models.cvt import create_model
    from cvt.training import loop
    from cvt.training.loop import LoopSettings, train_one_epoch

    model = create_model(TINY_SPEC, 10, drop_path_rate=0.0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    settings = LoopSettings(device=device, amp_dtype=torch.float16, channels_last=True, accum_steps=1,
                            clip_grad_norm=1.0, nonfinite_loss="stop", print_freq=10**6)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), []) for _ in range(6)]
    marks: list[int] = []  # syncs seen when each batch was handed out, and at the end

    # A progress line (a loss read: a sync) is also due after QUIET_LIMIT_S quiet seconds: a slow first
    # step (CUDA's lazy kernel loading) would add one mid-epoch. Only the epoch's last line is counted.
    with counting() as seen, mock.patch.object(loop._Progress, "QUIET_LIMIT_S", math.inf):
        class Loader:
            def __len__(self) -> int:
                return len(batches)

            def __iter__(self) -> Iterator[tuple]:
                for batch in batches:
                    marks.append(len(seen))
                    yield batch
                marks.append(len(seen))

        train_one_epoch(model, Loader(), nn.CrossEntropyLoss(), optimizer, settings, epoch=0,
                        scaler=torch.amp.GradScaler(device.type), ema=ModelEmaV3(model, decay=0.9))
    return [b - a for a, b in zip(marks, marks[1:])], list(seen)


def check_syncs(report: Report) -> None:
    if report.device.type != "cuda":
        report.add("syncs", "host syncs per optimizer step", "skipped",
                   detail="needs CUDA's sync debug mode; on CPU tests/test_engine.py counts the calls")
        return
    per_step, seen = syncs_per_batch(report.device, cuda_sync_warnings)
    # The last step also reads the loss for the epoch's final progress line: a second sync, expected.
    ok = per_step[:-1] == [1] * (len(per_step) - 1) and per_step[-1] == 2
    sources = sorted({str(w.message).splitlines()[0][:80] for w in seen})
    report.add("syncs", "host syncs per optimizer step", " ".join(map(str, per_step)), "1 each (the last: 2)", ok,
               detail="; ".join(sources))


# --------------------------------------------------------------------------------------------------
# demo: the digits demo through the library, fp16 + GradScaler (with resume) and bf16
# --------------------------------------------------------------------------------------------------


def demo_config(out: Path, epochs: int, *extra: object) -> Any:
    from cvt.config import load_config

    opts = ["OUTPUT_DIR", out, "TRAIN.END_EPOCH", epochs, "TENSORBOARD", False, "TRAIN.AUTO_RESUME", True, *extra]
    return load_config("cvt-digits", [str(o) for o in opts])


def top1s(result: dict[str, Any]) -> list[float]:
    lines = (Path(result["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["val_top1"] for line in lines]


def interrupt_after(steps: int) -> Any:
    """SIGINT to this process after `steps` optimizer steps: train() finishes the step and stops."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = [0]

    def hook(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        count[0] += 1
        if count[0] == steps:
            os.kill(os.getpid(), signal.SIGINT)

    return register_optimizer_step_post_hook(hook)


def check_demo(report: Report, scratch: Path) -> None:
    """Three independent parts, so that one failing (say, an op without a deterministic CUDA kernel)
    does not hide the others."""
    cuda = report.device.type == "cuda"
    # fp16 needs a GPU: on the CPU the same runs go in fp32 (AMP off), the loop's other path.
    fp16 = ("AMP.ENABLED", True, "AMP.DTYPE", "float16") if cuda else ("AMP.ENABLED", False)
    name = "fp16 + GradScaler" if cuda else "fp32 (CPU stand-in for fp16)"
    bf16 = ("AMP.ENABLED", True, "AMP.DTYPE", "bfloat16")
    attempt(report, "demo", f"{name}: trains", lambda: check_rise(report, name, scratch / "fp16", fp16))
    attempt(report, "demo", f"{name}: resume", lambda: check_resume(report, name, scratch, fp16))
    attempt(report, "demo", "bf16: trains", lambda: check_rise(report, "bf16", scratch / "bf16", bf16))


def attempt(report: Report, section: str, name: str, part: Callable[[], None]) -> None:
    """`part`, with an exception it raises recorded as a failed check named `name`."""
    try:
        part()
    except (Exception, SystemExit) as e:
        report.add(section, name, "error", "no error", False, detail=f"{type(e).__name__}: {str(e).strip()[:300]}")


def check_rise(report: Report, name: str, out: Path, amp: tuple) -> None:
    from cvt.training.run import train

    top1 = top1s(train(demo_config(out, report.sizes.demo_epochs, *amp)))
    floor = report.sizes.demo_top1_floor
    ok = len(top1) == report.sizes.demo_epochs and top1[-1] > top1[0] and top1[-1] >= floor
    report.add("demo", f"{name}: val top-1 by epoch", " ".join(f"{t:.1f}" for t in top1),
               f"rises, ends >= {floor:g}", ok)


def check_resume(report: Report, name: str, scratch: Path, amp: tuple) -> None:
    """Under DETERMINISTIC: a run stopped by SIGINT in epoch 1 and resumed ends with the weights of an
    uninterrupted run, bit for bit (the checkpoint carries weights, optimizer, scaler and every
    generator, the CUDA one included)."""
    from cvt.training.run import TrainingInterrupted, train

    epochs, exact = report.sizes.demo_epochs, ("DETERMINISTIC", True, *amp)
    straight = train(demo_config(scratch / "straight", epochs, *exact))
    handle = interrupt_after(30)  # the demo takes 22 steps an epoch: mid epoch 1
    try:
        train(demo_config(scratch / "resumed", epochs, *exact))
        interrupted = False
    except TrainingInterrupted:
        interrupted = True
    finally:
        handle.remove()
    resumed = train(demo_config(scratch / "resumed", epochs, *exact))
    a = torch.load(straight["final_state"], weights_only=True)
    b = torch.load(resumed["final_state"], weights_only=True)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    lines = (Path(resumed["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["epoch"] for line in lines]
    ok = interrupted and not differ and logged == list(range(epochs))
    largest = max((a[k].float() - b[k].float()).abs().max().item() for k in differ) if differ else 0.0
    report.add("demo", f"{name}: stopped in epoch 1, resumed = uninterrupted (DETERMINISTIC)",
               "equal" if ok else "differ", "bit-exact weights, each epoch once", ok,
               detail=f"interrupted {interrupted}, epochs logged {logged}, tensors differing {len(differ)}"
               + (f" (largest difference {largest:.2g})" if differ else ""))


# --------------------------------------------------------------------------------------------------
# torchrun: the launcher on the demo, and NCCL in a one-rank group
# --------------------------------------------------------------------------------------------------


def run_child(command: list[str], report: Report, cap_s: float) -> subprocess.CompletedProcess:
    """`command` in its own process group, killed whole (torchrun and its workers) when the budget is
    spent (BudgetSpent) or after `cap_s` seconds (TimeoutExpired: it hung, a failure)."""
    budget_first = report.left_s() - 2 < cap_s
    timeout = max(1.0, min(cap_s, report.left_s() - 2))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):  # the group may have gone already: keep the first error
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired) and budget_first:
            raise BudgetSpent from None
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def check_torchrun(report: Report, scratch: Path) -> None:
    attempt(report, "torchrun", "torchrun on the demo", lambda: check_launch(report, scratch / "torchrun"))
    attempt(report, "torchrun", "collectives", lambda: check_collectives(report))


def check_launch(report: Report, out: Path) -> None:
    proc = run_child(torchrun("-m", "cvt.cli", "train", "OUTPUT_DIR", str(out), "TRAIN.END_EPOCH", "1",
                              "TENSORBOARD", "False"), report, 300)
    metrics = list(out.glob("*/*/metrics.jsonl"))
    epochs = len(metrics[0].read_text().splitlines()) if metrics else 0
    on_device = f"on {report.device.type}" in proc.stdout
    report.add("torchrun", "torchrun --nproc_per_node 1, demo, 1 epoch", f"exit {proc.returncode}, {epochs} epoch",
               f"exit 0, 1 epoch, on {report.device.type}", proc.returncode == 0 and epochs == 1 and on_device,
               detail="" if proc.returncode == 0 else proc.stdout.strip()[-300:])


def check_collectives(report: Report) -> None:
    """One rank never builds a process group in the library (nothing to share), so NCCL is checked
    here on its own: a one-rank group joined as the library joins it."""
    proc = run_child(torchrun(__file__, "--collectives-child", "--device", report.device.type), report, 120)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    ok = result.get("all_reduce") == [1.0, 1.0] and result.get("ddp_grads_finite") is True
    backend = result.get("backend", "nccl" if report.device.type == "cuda" else "gloo")
    report.add("torchrun", f"{backend}: one-rank group, all_reduce + all_gather + DDP step", "ok" if ok else "failed",
               "ok", ok, detail="" if ok else proc.stdout.strip()[-300:])


def collectives_child(device_type: str) -> None:
    """Under torchrun: join a process group as the library does (NCCL bound to this rank's GPU, Gloo
    on CPU), then an all-reduce, an all-gather and one DDP training step. Prints JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cvt.models.cvt import create_model
    from cvt.training.distributed import select_device

    device = select_device(int(os.environ["LOCAL_RANK"])) if device_type == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        ones = torch.ones(2, device=device)
        dist.all_reduce(ones)
        gathered: list[Any] = [None]
        dist.all_gather_object(gathered, {"rank": dist.get_rank()})
        model = DistributedDataParallel(create_model(TINY_SPEC, 10).to(device),
                                        device_ids=[device.index] if device.type == "cuda" else None)
        F.cross_entropy(model(torch.randn(4, 3, 32, 32, device=device)), torch.arange(4, device=device)).backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        print(json.dumps({"backend": backend, "all_reduce": ones.tolist(), "gathered": gathered,
                          "ddp_grads_finite": finite}))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# perf: against transformers, interleaved, one process
# --------------------------------------------------------------------------------------------------


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in BF16_PEAKS if part in name), None)


def check_perf(report: Report) -> None:
    from bench_model import PeerLogits, build_models, check_same_function, make_optimizer, step_memory, train_step

    device, sizes = report.device, report.sizes
    ours, peer_model = build_models(device, sizes.spec)
    diff = check_same_function(ours, peer_model, device, sizes.size)
    report.add("perf", "same function as the peer (GELU, TF32 off)", diff, "<= 1e-3", diff <= 1e-3)
    peer = PeerLogits(peer_model)
    x = torch.randn(sizes.perf_batch, 3, sizes.size, sizes.size, device=device)
    y = torch.randint(0, 1000, (sizes.perf_batch,), device=device)
    compare_steps(report, "perf", "", ours, peer, x, y)
    del x, y
    check_memory(report, {"ours": ours, "peer": peer}, step_memory, train_step, make_optimizer)


def compare_steps(report: Report, section: str, label: str, ours: nn.Module, peer: nn.Module, x: torch.Tensor,
                  y: torch.Tensor) -> None:
    """Our training step and inference against the peer's, interleaved, bf16 autocast, fused AdamW:
    throughput ratios (target 2x on CUDA) and the MFU of our training step."""
    from bench_model import inference_step, make_optimizer, train_step

    from cvt.models.complexity import model_summary

    device, sizes, sync = report.device, report.sizes, synchronizer(report.device)
    targets = device.type == "cuda"  # the targets are CUDA's; on CPU the figures only show the logic runs
    shape = f"batch {x.shape[0]}, {x.shape[-1]}px"
    for mode in ("training step", "inference"):
        for model in (ours, peer):
            model.train(mode == "training step")
        steps = {name: train_step(m, make_optimizer(m, "fused"), x, y, device, "bf16") if mode == "training step"
                 else inference_step(m, x, device, "bf16") for name, m in (("ours", ours), ("peer", peer))}
        times = {k: median(v) for k, v in interleaved(steps, sizes.rounds, sizes.warmup, sync).items()}
        ratio = times["peer"] / times["ours"]
        report.add(section, f"{mode} bf16{label}, {shape}: peer time / ours", ratio, ">= 2" if targets else "",
                   ratio >= 2 if targets else None, fmt=".2f",
                   detail=f"ours {x.shape[0] / times['ours']:.0f} img/s, peer {x.shape[0] / times['peer']:.0f} img/s")
        if mode == "training step":
            spec = getattr(ours, "_orig_mod", ours).spec
            gmacs = model_summary(spec.to_dict(), 1000, (x.shape[-2], x.shape[-1]))["gmacs"]
            achieved = 3 * 2 * gmacs * 1e9 * x.shape[0] / times["ours"]  # forward + backward (2x forward)
            peak = bf16_peak(device)
            report.add(section, f"MFU of our training step (bf16{label})",
                       "unknown GPU" if peak is None else f"{achieved / peak:.1%}",
                       detail=f"{achieved / 1e12:.1f} TFLOP/s from {gmacs:.2f} GMACs/image x 3"
                       + ("" if peak is None else f", peak {peak / 1e12:.0f} TFLOP/s"))


def check_memory(report: Report, models: dict[str, nn.Module], step_memory: Callable, train_step: Callable,
                 make_optimizer: Callable) -> None:
    device, sizes = report.device, report.sizes
    x = torch.randn(sizes.memory_batch, 3, sizes.memory_size, sizes.memory_size, device=device)
    y = torch.randint(0, 1000, (sizes.memory_batch,), device=device)
    used: dict[str, float] = {}
    for name, model in models.items():
        model.train()
        optimizer = make_optimizer(model, "fused")
        used[name] = step_memory(train_step(model, optimizer, x, y, device, "bf16"), optimizer, device)["step_bytes"]
        del optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratio = used["ours"] / used["peer"] if used["peer"] > 0 else math.nan  # CPU RSS may not grow at all
    cuda = device.type == "cuda"
    report.add("perf", f"peak training memory bf16, batch {sizes.memory_batch}, {sizes.memory_size}px: ours / peer",
               ratio, "<= 0.6" if cuda else "", ratio <= 0.6 if cuda else None, fmt=".2f",
               detail=f"ours {used['ours'] / 2**20:.0f} MiB, peer {used['peer'] / 2**20:.0f} MiB above weights and state"
               + ("" if cuda else " (in-process RSS: indicative only)"))


# --------------------------------------------------------------------------------------------------
# compiled: torch.compile with CUDA graphs (TRAIN.COMPILE_MODE reduce-overhead), the model and the demo
# --------------------------------------------------------------------------------------------------


def check_compiled(report: Report, scratch: Path) -> None:
    """On a GPU an eager step at batch 64 waits on kernel launches; CUDA graphs replay the step's
    kernels without them. The peer stays eager: what a user of either gets without writing code."""
    if report.device.type == "cuda":
        attempt(report, "compiled", "demo: trains", lambda: check_compiled_demo(report, scratch / "compiled"))
    else:
        report.add("compiled", "demo with TRAIN.COMPILE", "skipped",
                   detail="CUDA graphs need CUDA; tests/test_train_e2e.py trains compiled on CPU")
    attempt(report, "compiled", "compiled steps", lambda: check_compiled_steps(report))


def check_compiled_demo(report: Report, out: Path) -> None:
    from cvt.training.run import train

    epochs, floor = 2, report.sizes.demo_top1_floor
    opts = ("TRAIN.COMPILE", True, "TRAIN.COMPILE_MODE", COMPILE_MODE, "AMP.ENABLED", True, "AMP.DTYPE", "bfloat16")
    top1 = top1s(train(demo_config(out, epochs, *opts)))
    report.add("compiled", f"TRAIN.COMPILE_MODE {COMPILE_MODE}, bf16: demo val top-1 by epoch",
               " ".join(f"{t:.1f}" for t in top1), f"{epochs} epochs, ends >= {floor:g}",
               len(top1) == epochs and top1[-1] >= floor)


def check_compiled_steps(report: Report) -> None:
    from bench_model import PeerLogits, build_models

    device, sizes = report.device, report.sizes
    ours, peer = build_models(device, sizes.spec)
    x = torch.randn(sizes.perf_batch, 3, sizes.size, sizes.size, device=device)
    y = torch.randint(0, 1000, (sizes.perf_batch,), device=device)
    compiled = torch.compile(ours, mode=COMPILE_MODE, dynamic=False)
    compare_steps(report, "compiled", f", ours compiled ({COMPILE_MODE})", compiled, PeerLogits(peer), x, y)


# --------------------------------------------------------------------------------------------------
# Running the sections within the budget, and the report
# --------------------------------------------------------------------------------------------------


def run_sections(report: Report, names: list[str], scratch: Path) -> None:
    runners: dict[str, Callable[[], None]] = {
        "logits": lambda: check_logits(report),
        "syncs": lambda: check_syncs(report),
        "demo": lambda: check_demo(report, scratch),
        "torchrun": lambda: check_torchrun(report, scratch),
        "perf": lambda: check_perf(report),
        "compiled": lambda: check_compiled(report, scratch),
    }
    for name in names:
        needed = report.sizes.seconds[name]
        if report.left_s() < needed:
            reason = f"budget: {report.left_s():.0f} s left, needs ~{needed:g} s"
            report.sections[name] = {"status": "skipped", "reason": reason}
            print(f"== {name}: skipped ({report.sections[name]['reason']})", flush=True)
            continue
        print(f"== {name} (~{needed:g} s)", flush=True)
        report.sections[name] = {"status": "running"}
        start = time.monotonic()
        try:
            runners[name]()
            report.sections[name]["status"] = "done"
        except BudgetSpent:
            report.sections[name].update(status="stopped", reason="budget spent mid-section")
        except (Exception, SystemExit) as e:  # a failing section is a finding, not the end of the run
            message = f"{type(e).__name__}: {str(e).strip()[:300]}"
            report.add(name, f"{name} section ran", "error", "no error", False, detail=message)
            report.sections[name].update(status="error", reason=message)
        report.sections[name]["seconds"] = round(time.monotonic() - start, 1)


def versions(device: torch.device) -> dict[str, str]:
    info = {"date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "device": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
        info["CUDA"] = str(torch.version.cuda)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    for package in ("transformers", "timm"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = "not installed"
    # The host CPU too: a GPU host with AMX is where issue 16's AMX measurement can run (amx_check.sh).
    info.update({"host CPU": f"{cpu_model()}, {os.cpu_count()} logical"},
                python=platform.python_version(), repo=git_revision())
    return info


def render(report: Report, info: dict[str, str], elapsed: float, budget: float) -> str:
    rows = [[c.section, c.name, c.value, c.limit or "—", c.status, c.detail] for c in report.checks]
    rows += [[name, "(section)", s["status"], "—", "skipped", s.get("reason", "")]
             for name, s in report.sections.items() if s["status"] in ("skipped", "stopped")]
    return "\n".join([
        f"#### Run {info['date (UTC)']}, {info.get('GPU', info['device'])}: {report.verdict}",
        "",
        "; ".join(f"{k}: {v}" for k, v in info.items() if k != "date (UTC)") + f"; {elapsed:.0f} s of a {budget:g} s budget",
        "",
        markdown_table(["section", "check", "value", "limit", "result", "detail"], rows),
    ])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same logic at tiny sizes")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop by then, reporting what was skipped (default 420)")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--collectives-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def on_alarm(signum: int, frame: object) -> None:
    raise BudgetSpent


def main() -> int:
    args = parse_args()
    if args.collectives_child:
        collectives_child(args.device)
        return 0
    start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available (use --device cpu to check the logic)")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report(device, CUDA_SIZES if device.type == "cuda" else CPU_SIZES, start + args.budget_s)
    info = versions(device)
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, math.ceil(args.budget_s - (time.monotonic() - start))))
    with tempfile.TemporaryDirectory(prefix="cvt-gpu-check-") as scratch:
        os.environ.setdefault("CVT_CACHE_DIR", str(Path(scratch) / "cache"))  # the demo's digits, written once
        try:
            run_sections(report, args.sections, Path(scratch))
        except BudgetSpent:  # between two sections: the ones not reached are not in the report
            print("budget spent", flush=True)
        finally:
            signal.alarm(0)
    elapsed = time.monotonic() - start
    text = render(report, info, elapsed, args.budget_s)
    print("\n" + text)
    if args.json:
        payload = {"verdict": report.verdict, "versions": info, "budget_s": args.budget_s, "elapsed_s": round(elapsed, 1),
                   "sizes": asdict(report.sizes), "sections": report.sections, "checks": [asdict(c) for c in report.checks]}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    if args.write:
        append_to_section(HEADING, text)
    return 0 if report.verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())

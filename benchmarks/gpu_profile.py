"""Where a CUDA training step and inference go: kernel tables and variants, ours and the peer's.

    python benchmarks/gpu_profile.py | tee gpu_profile.txt         # on a GPU: ~3 min
    python benchmarks/gpu_profile.py --device cpu --batch 2 --large-batch 2 --size 32 --steps 1 --skip-compile   # its logic

For gpu_check's perf section (CvT-13, bf16 autocast, fused AdamW, batch 64 at 224): each step's wall
time against the time the GPU spent in kernels (a step much longer than its kernels waits on the host:
launches, Python), the kernels that take the time, the step at a larger batch (a launch-bound step gets
cheaper per image), and our model under variants that change one thing each (cuDNN autotuning, the
depthwise convolutions in NCHW, torch.compile). TF32 stays off, as in gpu_check. Prints text; nothing
is asserted or appended.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_model import PeerLogits, build_models, inference_step, make_optimizer, train_step  # noqa: E402
from common import synchronizer  # noqa: E402


def step_seconds(step: Callable[[], object], sync: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def kernel_table(step: Callable[[], object], device: torch.device, steps: int, rows: int) -> tuple[float, str]:
    """Seconds of device kernels per step, and the kernels taking the most time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronizer(device)()
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in averages
                  if str(getattr(e, "device_type", "")).endswith("CUDA"))
    return busy_us / 1e6 / steps, averages.table(sort_by=sort, row_limit=rows, max_name_column_width=70)


@contextlib.contextmanager
def nchw_depthwise() -> Iterator[None]:
    """The projections' depthwise convolutions on NCHW maps (the model hands them channels-last)."""
    from cvt.models import cvt as network

    original = network.depthwise_conv

    def in_nchw(x, conv, weight=None, bias=None):  # type: ignore[no-untyped-def]
        out = original(x.contiguous(), conv, weight, bias)
        return out.contiguous(memory_format=torch.channels_last)

    network.depthwise_conv = in_nchw
    try:
        yield
    finally:
        network.depthwise_conv = original


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--large-batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--skip-compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = synchronizer(device)
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), torch.__version__, flush=True)

    ours, peer_model = build_models(device)
    peer = PeerLogits(peer_model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step_of(model: torch.nn.Module, mode: str) -> Callable[[], object]:
        model.train(mode == "train")
        if mode == "train":
            return train_step(model, make_optimizer(model, "fused"), x, y, device, "bf16")
        return inference_step(model, x, device, "bf16")

    def timed(label: str, model: torch.nn.Module, mode: str, profile_rows: int = 0) -> None:
        step = step_of(model, mode)
        start = time.perf_counter()
        step()  # a compiled model compiles here
        sync()
        first = time.perf_counter() - start
        seconds = step_seconds(step, sync, args.steps, warmup=2)
        line = f"{label:<34} {mode:<5} {seconds * 1e3:8.1f} ms/step  {args.batch / seconds:7.0f} img/s"
        line += f"  (first step {first:.1f} s)" if first > 5 * seconds + 1 else ""
        if profile_rows:
            busy, table = kernel_table(step, device, 3, profile_rows)
            line += f"  kernels {busy * 1e3:.1f} ms/step ({busy / seconds:.0%} of wall)"
            print(line, flush=True)
            print(table, flush=True)
        else:
            print(line, flush=True)

    for mode in ("train", "infer"):
        timed("ours eager", ours, mode, args.rows)
        timed("peer eager", peer, mode, args.rows // 2)
    with cudnn_benchmark():
        for mode in ("train", "infer"):
            timed("ours eager, cudnn.benchmark", ours, mode)
            timed("peer eager, cudnn.benchmark", peer, mode)
    with nchw_depthwise():
        for mode in ("train", "infer"):
            timed("ours eager, NCHW depthwise", ours, mode, 12 if mode == "train" else 0)

    big = torch.randn(args.large_batch, 3, args.size, args.size, device=device)
    big_y = torch.randint(0, 1000, (args.large_batch,), device=device)
    for name, model in (("ours", ours), ("peer", peer)):
        model.train()
        step = train_step(model, make_optimizer(model, "fused"), big, big_y, device, "bf16")
        seconds = step_seconds(step, sync, max(2, args.steps // 2), warmup=2)
        print(f"{name} eager, batch {args.large_batch:<6}             train {seconds * 1e3:8.1f} ms/step  "
              f"{args.large_batch / seconds:7.0f} img/s", flush=True)
    del big, big_y

    if not args.skip_compile:
        compiled = torch.compile(ours)
        for mode in ("train", "infer"):
            timed("ours torch.compile", compiled, mode, 15 if mode == "train" else 0)


if __name__ == "__main__":
    main()

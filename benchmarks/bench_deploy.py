"""Inference speed of CvT-13 at 224 as deployed: eager fp32, eager bf16 autocast, torch.compile (fp32)
and the ONNX file `cvt export --format onnx` writes, run by ONNX Runtime on the CPU.

The ONNX file is written by `cvt.weights.deploy.deploy`, so it is verified against the model before it
is timed. All contenders run in one process with the same thread count (ONNX Runtime's intra-op pool
is given it too), interleaved round by round (`common.interleaved`), at batch 1 (latency) and batch
16 (throughput). Reported: the median per batch, per image, images per second, and the time relative
to eager fp32.

    python benchmarks/bench_deploy.py                     # 2 threads, 7 rounds, appends to RESULTS.md
    python benchmarks/bench_deploy.py --rounds 3 --clock cpu --note "machine loaded"
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common import (
    RESULTS, append_to_section, interleaved, load_average, machine_info, markdown_table, median, run_heading, synchronizer,
)

from cvt.config import load_config
from cvt.models.cvt import create_model
from cvt.weights.deploy import OnnxClassifier, deploy

SECTION = "Deployment speed"
CONTENDERS = ("eager fp32", "eager bf16", "torch.compile fp32", "ONNX Runtime fp32")


def eager(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], object]:
    def step() -> torch.Tensor:
        cast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            return model(x)

    return step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each contender first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and ONNX Runtime's intra-op threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall time, or process CPU time (all threads)")
    p.add_argument("--no-write", dest="write", action="store_false", help=f"print only, do not append to {RESULTS.name}")
    p.add_argument("--note", default="", help="a line to record with the results")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    info = machine_info(device, torch.get_num_threads())
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)

    model = create_model("cvt-13").eval()
    cfg = load_config("cvt-13-224x224", ["TEST.IMAGE_SIZE", f"[{args.size}, {args.size}]"])
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cvt-13.onnx"
        start = time.perf_counter()
        diff = deploy(model, "onnx", path, cfg)
        notes.append(f"ONNX export + verification {time.perf_counter() - start:.0f} s, max |logit diff| {diff:.2g}")
        runtime = OnnxClassifier(path, threads=args.threads)
        compiled = torch.compile(model, dynamic=False)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        rows = []
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            start = time.perf_counter()
            eager(compiled, x, None)()
            notes.append(f"torch.compile first call at batch {batch} {time.perf_counter() - start:.0f} s")
            fns = dict(zip(CONTENDERS, (eager(model, x, None), eager(model, x, torch.bfloat16), eager(compiled, x, None),
                                        lambda x=x: runtime(x))))
            times = interleaved(fns, args.rounds, args.warmup, synchronizer(device), clock)
            base = median(times["eager fp32"])
            for name in CONTENDERS:
                t = median(times[name])
                spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
                rows.append([name, str(batch), f"{t * 1e3:.1f}", spread, f"{t * 1e3 / batch:.1f}", f"{batch / t:.1f}", f"{t / base:.2f}"])
                print(" | ".join(rows[-1]), flush=True)
    info["load average at end"] = load_average()
    report = render(args, info, rows, notes)
    print("\n" + report)
    if args.write:
        append_to_section(SECTION, report)
        print(f"\nappended to {RESULTS}")


def render(args: argparse.Namespace, info: dict[str, str], rows: list[list[str]], notes: list[str]) -> str:
    lines = run_heading(f"CvT-13 at {args.size}, cpu", info, args,
                        "relative = time / eager fp32 time (below 1: faster). " + "; ".join(notes) + ".")
    header = ["contender", "batch", "ms / batch (median)", "range (ms)", "ms / image", "images / s", "relative"]
    lines.append(markdown_table(header, rows))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

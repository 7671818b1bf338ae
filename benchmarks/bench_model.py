"""Speed of this project's CvT-13 against transformers' ``CvtForImageClassification``.

Both models are timed in one process, interleaved (A B, B A, ...), after warmup, with the same
architecture (the peer's ``CvtConfig`` is built from our spec), the same weights (copied through the
key mapping, and checked: our model switched to exact GELU gives the peer's logits), the same inputs,
the same thread count and the same optimizer. Reported: the median per call and the ratio
``peer time / our time`` (above 1: we are faster).

    python benchmarks/bench_model.py                       # CPU: eager + compile + memory, 224 and 384
    python benchmarks/bench_model.py --sizes 224 --no-compile --no-memory
    python benchmarks/bench_model.py --sizes 224 --no-memory --freezing --amx-branch off   # issue 16, both
    python benchmarks/bench_model.py --sizes 224 --no-memory --freezing --amx-branch on    #   AMX branches
    python benchmarks/bench_model.py --sizes 224 --no-memory --keep-freed-memory   # malloc as the cvt command has it
    python benchmarks/bench_model.py --device cuda --batch 64 --memory-size 384 --memory-batch 64 \
        --memory-dtype bf16 --compile-dtypes bf16       # the CUDA targets (AMP: bf16 autocast)

Peak memory of a training step: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the
resident set over one step (VmHWM after resetting it through /proc/self/clear_refs, minus the RSS
before the step), each model in a fresh subprocess, with glibc told to serve every block over 64 KiB
by mmap so that freed memory leaves the process at once and the RSS follows live tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import (
    RESULTS, append_to_section, gemm_rates, interleaved, load_average, machine_info, markdown_table, median, run_heading,
    synchronizer,
)

from cvt.models.complexity import model_summary
from cvt.models.convert import hf_config_from_spec, official_to_hf
from cvt.models import kernels
from cvt.models.cvt import create_model
from cvt.training.session import keep_freed_memory

NUM_CLASSES = 1000

# The targets of the performance issues: minimum ``reference / ours`` time ratios (batch 16 on CPU), the
# least share of the machine's GEMM rate, or for memory the maximum ``ours / peer`` peak ratio.
# Keys: (device, size, dtype, mode, our variant, what ours is timed against).
SPEED_TARGETS: dict[tuple[str, int, str, str, str, str], float] = {
    ("cpu", 224, "fp32", "infer", "eager", "peer eager"): 1.5,
    ("cpu", 224, "fp32", "train", "eager", "peer eager"): 1.25,
    ("cpu", 224, "bf16", "infer", "eager", "peer eager"): 2.0,
    ("cpu", 224, "bf16", "train", "eager", "peer eager"): 1.5,
    # torch.compile must pay: faster than our own eager model.
    ("cpu", 224, "fp32", "infer", "compiled", "ours eager"): 1.0,
    ("cpu", 224, "fp32", "train", "compiled", "ours eager"): 1.0,
    ("cuda", 224, "bf16", "train", "eager", "peer eager"): 2.0,
    ("cuda", 224, "bf16", "infer", "eager", "peer eager"): 2.0,
}
GEMM_SHARE_TARGETS: dict[tuple[str, int, str, str, str], float] = {("cpu", 224, "bf16", "infer", "eager"): 0.4}
# How a row's speed is read against the machine (`Row.gemm_share`).
GEMM_SHARE_DEFINITION = (
    "the published model's FLOPs (2 x multiply-adds x batch; 3 forward passes for a training step) per second, "
    "over this machine's GEMM rate in the same dtype, same threads (the faster route: see the machine line)"
)
MEMORY_TARGETS: dict[tuple[str, int, int], float] = {("cuda", 384, 64): 0.6}


# --------------------------------------------------------------------------------------------------
# The two models
# --------------------------------------------------------------------------------------------------


def build_models(
    device: torch.device, spec: str | dict = "cvt-13", num_classes: int = NUM_CLASSES
) -> tuple[nn.Module, nn.Module]:
    """Our CvT (CvT-13 unless told) and the transformers port with the same config and weights."""
    from transformers import CvtConfig, CvtForImageClassification

    ours = create_model(spec, num_classes)
    config = hf_config_from_spec(ours.spec.to_dict(), num_classes)
    config.pop("architectures")
    peer = CvtForImageClassification(CvtConfig(**config))
    peer.load_state_dict(official_to_hf(ours.state_dict()), strict=True)
    return ours.to(device), peer.to(device)


class PeerLogits(nn.Module):
    """The port returns an output object; unwrap the logits so both models are called alike."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def check_same_function(ours: nn.Module, peer: nn.Module, device: torch.device, size: int = 224) -> float:
    """The architectures match: with exact GELU (the port's activation) our model gives the peer's
    logits from the copied weights. Returns the largest difference."""
    ours.eval().set_activation("gelu")
    peer.eval()
    x = torch.randn(2, 3, size, size, device=device)
    # cuDNN convolutions default to TF32, whose 10-bit rounding differs between the two layouts
    # (channels-last, BatchNorm folded, against NCHW then BatchNorm): compare in true fp32.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            diff = (ours(x) - peer(pixel_values=x).logits).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    ours.set_activation("quick_gelu")
    if diff > 1e-3:
        raise SystemExit(f"our model with GELU differs from the peer by {diff:.3g}: the comparison would not be fair")
    return diff


# --------------------------------------------------------------------------------------------------
# Timed steps
# --------------------------------------------------------------------------------------------------


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: nn.Module, implementation: str) -> torch.optim.Optimizer:
    """AdamW as the recipe has it (weight decay .05), one implementation for both models. A tiny
    learning rate: the weights barely move over the timed steps, so the work stays the same."""
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05, **flags)


def inference_step(model: nn.Module, x: torch.Tensor, device: torch.device, dtype: str) -> Callable[[], object]:
    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return model(x)

    return step


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: str
) -> Callable[[], object]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()

    return step


@dataclass
class Row:
    device: str
    size: int
    dtype: str
    mode: str
    variant: str  # how our model ran: "eager" or "compiled"
    reference: str  # what ours is timed against: "peer eager", "peer compiled" or "ours eager"
    ours_s: float
    peer_s: float
    batch: int
    ours_min_s: float
    peer_min_s: float
    clock: str  # "wall" or "cpu": images/s only mean something for wall time
    flops: float  # the published model's FLOPs per call (see `step_flops`)
    gemm_rate: float  # this machine's best GEMM FLOP/s in this dtype, same threads and clock

    def gemm_share(self, seconds: float) -> str:
        return f"{self.flops / seconds / self.gemm_rate:.0%}"

    @property
    def ratio(self) -> float:
        return self.peer_s / self.ours_s

    @property
    def target(self) -> float | None:
        return SPEED_TARGETS.get((self.device, self.size, self.dtype, self.mode, self.variant, self.reference))

    @property
    def share_target(self) -> float | None:
        return GEMM_SHARE_TARGETS.get((self.device, self.size, self.dtype, self.mode, self.variant))

    def _time(self, seconds: float) -> str:
        if self.clock == "cpu":
            return f"{seconds * 1e3:.0f} ms CPU"
        return f"{seconds * 1e3:.0f} ms ({self.batch / seconds:.1f} img/s)"

    def cells(self) -> list[str]:
        target, share_target = self.target, self.share_target
        targets = ([] if target is None else [f">= {target}x"]) + (
            [] if share_target is None else [f">= {share_target:.0%} of GEMM"]
        )
        passed = (target is None or self.ratio >= target) and (
            share_target is None or self.flops / self.ours_s / self.gemm_rate >= share_target
        )
        return [
            f"{self.mode} {self.dtype} {self.size}px",
            f"ours {self.variant} vs {self.reference}",
            self._time(self.ours_s),
            self._time(self.peer_s),
            f"{self.ratio:.2f}x",
            f"{self.peer_min_s / self.ours_min_s:.2f}x",
            f"{self.gemm_share(self.ours_s)} / {self.gemm_share(self.peer_s)}",
            ", ".join(targets) or "—",
            ("pass" if passed else "FAIL") if targets else "—",
        ]


def step_flops(size: int, mode: str, batch: int) -> float:
    """FLOPs of one call: the published CvT-13's multiply-adds at ``size`` (convolutions, linears,
    attention; `model_summary`) times 2, times the batch; a training step counts 3 forward passes
    (the backward computes two products per forward one). The same count for both models: what the
    function needs, not what either implementation spends."""
    forward = 2e9 * model_summary("cvt-13", NUM_CLASSES, (size, size))["gmacs"] * batch
    return 3 * forward if mode == "train" else forward


def compare(
    name: str,
    fns: dict[str, Callable[[], object]],
    args: argparse.Namespace,
    sync: Callable[[], None],
) -> dict[str, float]:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved(fns, args.rounds, args.warmup, sync, clock)
    medians = {k: median(v) for k, v in times.items()}
    spread = ", ".join(f"{k} {min(v) * 1e3:.0f}-{max(v) * 1e3:.0f} ms" for k, v in times.items())
    print(f"  {name}: " + ", ".join(f"{k} {s * 1e3:.0f} ms" for k, s in medians.items()) + f"  (range: {spread})", flush=True)
    return {**medians, **{f"{k} min": min(v) for k, v in times.items()}}


# --------------------------------------------------------------------------------------------------
# Peak memory of one training step, each model in a fresh process
# --------------------------------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one warmup step, then the measured step. Prints JSON."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, peer = build_models(device)
    model = ours if args.memory_child == "ours" else PeerLogits(peer)
    del ours, peer
    model.train()
    optimizer = make_optimizer(model, args.adamw)
    x = torch.randn(args.memory_batch, 3, args.memory_size, args.memory_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.memory_batch,), device=device)
    print(json.dumps(step_memory(train_step(model, optimizer, x, y, device, args.memory_dtype), optimizer, device)))


def step_memory(step: Callable[[], object], optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, float]:
    """Peak memory of one training step, after a warmup step: ``peak_bytes`` in all and ``step_bytes``
    above what was held before the step (weights, optimizer state, inputs). On CPU the RSS is only
    meaningful in a fresh process set up as `measure_memory` does."""
    step()  # optimizer state and allocator pools exist from here on
    optimizer.zero_grad(set_to_none=True)
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _rss_bytes("VmRSS")
        step()
        result["peak_bytes"] = _rss_bytes("VmHWM")
    result["step_bytes"] = result["peak_bytes"] - base
    return result


def measure_memory(which: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [
        sys.executable, __file__, "--memory-child", which, "--device", args.device, "--threads", str(args.threads),
        "--memory-size", str(args.memory_size), "--memory-batch", str(args.memory_batch),
        "--memory-dtype", args.memory_dtype, "--adamw", args.adamw,
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"memory measurement of {which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs="*", default=[224, 384], help="eager runs at these sizes (none: skip)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds per comparison")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each model first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="wall time, or process CPU time (all threads; steadier on a shared machine, same ratios at one thread)",
    )
    p.add_argument("--adamw", default="fused", choices=["fused", "foreach", "for-loop"], help="AdamW implementation, for both models")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile runs")
    p.add_argument("--compile-size", type=int, default=224)
    p.add_argument("--compile-dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--compile-peer", action="store_true", help="also time the peer compiled (slow to compile)")
    p.add_argument("--compile-mode", default=None, help="torch.compile's mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--freezing", action="store_true", help="torch._inductor.config.freezing for the compiled inference")
    p.add_argument(
        "--amx-branch", default="auto", choices=["auto", "on", "off"],
        help="the token-linear path `cpu_has_amx` picks: as detected, or forced (F.linear 'on', oneDNN 1x1 conv 'off')",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak memory measurement")
    p.add_argument("--memory-size", type=int, default=224)
    p.add_argument("--memory-batch", type=int, default=16)
    p.add_argument("--memory-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc's malloc keeps freed memory, as `cvt train/test/predict` set it (both models)")
    p.add_argument("--no-write", dest="write", action="store_false", help=f"print only, do not append to {RESULTS.name}")
    p.add_argument("--note", default="", help="a line to record with the results")
    p.add_argument("--memory-child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    return p.parse_args()


def eager_rows(
    ours: nn.Module, peer: nn.Module, args: argparse.Namespace, device: torch.device, gemm: dict[str, float]
) -> list[Row]:
    """Both models eager, every size x mode x dtype asked; `gemm`: the machine's rate per dtype."""
    sync = synchronizer(device)
    rows: list[Row] = []
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size, device=device)
        y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
        for mode in args.modes:
            for dtype in args.dtypes:
                ours.train(mode == "train")
                peer.train(mode == "train")
                if mode == "infer":
                    fns = {"ours": inference_step(ours, x, device, dtype), "peer": inference_step(peer, x, device, dtype)}
                else:
                    fns = {
                        "ours": train_step(ours, make_optimizer(ours, args.adamw), x, y, device, dtype),
                        "peer": train_step(peer, make_optimizer(peer, args.adamw), x, y, device, dtype),
                    }
                m = compare(f"{mode} {dtype} {size}px eager", fns, args, sync)
                rows.append(
                    Row(device.type, size, dtype, mode, "eager", "peer eager", m["ours"], m["peer"], args.batch,
                        m["ours min"], m["peer min"], args.clock, step_flops(size, mode, args.batch), gemm[dtype])
                )
    return rows


def compiled_rows(
    ours: nn.Module, peer: nn.Module, args: argparse.Namespace, device: torch.device, gemm: dict[str, float]
) -> tuple[list[Row], list[str]]:
    """Ours compiled (fullgraph=True) against our own eager model and the peer eager (and compiled, if
    asked), at the compile size; also returns how long each first (compiling) call took."""
    # Cold compilation, as a user's first run sees it: an empty cache folder, so no compiled graph or
    # kernel of an earlier run is reused.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cvt-bench-inductor-")
    sync = synchronizer(device)
    size = args.compile_size
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    # Freezing (weights as constants, so inductor may prepack them and fold what depends on them only)
    # applies to graphs compiled without autograd: the inference ones.
    from torch._inductor import config as inductor_config

    inductor_config.freezing = args.freezing
    # fullgraph=True: a graph break anywhere in our model is an error, not a silent slowdown.
    contenders = {
        "ours compiled": torch.compile(ours, fullgraph=True, mode=args.compile_mode),
        "ours eager": ours,
        "peer eager": peer,
    }
    if args.compile_peer:
        contenders["peer compiled"] = torch.compile(peer)
    rows: list[Row] = []
    compile_lines: list[str] = []
    for mode in args.modes:
        for dtype in args.compile_dtypes:
            ours.train(mode == "train")
            peer.train(mode == "train")
            fns: dict[str, Callable[[], object]] = {}
            for name, model in contenders.items():
                if mode == "train":
                    # The optimizer holds the parameters of the module under the compiled wrapper.
                    plain = ours if name.startswith("ours") else peer
                    fns[name] = train_step(model, make_optimizer(plain, args.adamw), x, y, device, dtype)
                else:
                    fns[name] = inference_step(model, x, device, dtype)
            # The first call compiles (forward, and backward in training); time it on its own.
            for name in [n for n in fns if n.endswith("compiled")]:
                sync()
                start = time.perf_counter()
                fns[name]()
                sync()
                compile_lines.append(f"{name.replace(' compiled', '')} {mode} {dtype} {size}px: first call {time.perf_counter() - start:.1f} s")
                print(f"  {compile_lines[-1]}", flush=True)
            m = compare(f"{mode} {dtype} {size}px compiled", fns, args, sync)
            for reference in [n for n in fns if n != "ours compiled"]:
                rows.append(
                    Row(device.type, size, dtype, mode, "compiled", reference, m["ours compiled"], m[reference],
                        args.batch, m["ours compiled min"], m[f"{reference} min"], args.clock,
                        step_flops(size, mode, args.batch), gemm[dtype])
                )
    return rows, compile_lines


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.amx_branch != "auto":
        kernels._CPU_HAS_AMX = args.amx_branch == "on"  # what an AMX CPU would take, or not, on any CPU
    info = machine_info(device, torch.get_num_threads())
    kept = keep_freed_memory() if args.keep_freed_memory else 0
    info["malloc"] = f"keeps freed memory (keep_freed_memory: mmap threshold {kept >> 20} MiB)" if kept else "default"
    info["token linears"] = "F.linear (AMX branch)" if kernels.cpu_has_amx() else "oneDNN 1x1 conv (no-AMX branch)"
    info["token linears"] += f", {'forced' if args.amx_branch != 'auto' else 'as detected'}"
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    routes = gemm_rates(device, clock=clock)
    gemm = {dtype: max(rates.values()) for dtype, rates in routes.items()}
    for dtype, rates in routes.items():
        info[f"{dtype} GEMM"] = ", ".join(f"{route} {rate / 1e9:.0f} GFLOP/s" for route, rate in rates.items())
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)

    ours, peer_model = build_models(device)
    diff = check_same_function(ours, peer_model, device)
    print(f"same architecture and weights: our model with GELU matches the peer to {diff:.2g}", flush=True)
    peer = PeerLogits(peer_model)
    rows = eager_rows(ours, peer, args, device, gemm)
    compile_lines: list[str] = []
    if args.compile:
        compiled, compile_lines = compiled_rows(ours, peer, args, device, gemm)
        rows += compiled
    del ours, peer, peer_model  # the memory runs use fresh processes; free this one's memory first

    memory: dict[str, dict[str, float]] = {}
    if args.memory:
        for which in ("ours", "peer"):
            memory[which] = measure_memory(which, args)
            print(f"  memory {which}: {memory[which]}", flush=True)

    info["load average at end"] = load_average()
    report = render(args, info, rows, compile_lines, memory)
    print("\n" + report)
    if args.write:
        append_to_section("Model speed", report)
        print(f"\nappended to {RESULTS}")


def render(
    args: argparse.Namespace,
    info: dict[str, str],
    rows: list[Row],
    compile_lines: list[str],
    memory: dict[str, dict[str, float]],
) -> str:
    lines = run_heading(
        f"{args.device}, batch {args.batch}", info, args,
        "ratio = reference time / our time (the verdict uses the ratio of medians). "
        f"Share of GEMM rate = {GEMM_SHARE_DEFINITION}. AdamW ({args.adamw}) for both.",
    )
    header = [
        "measurement", "variants", "ours (median)", "reference (median)", "ratio", "ratio of minima",
        "share of GEMM rate, ours / reference", "target", "result",
    ]
    lines.append(markdown_table(header, [row.cells() for row in rows]))
    if compile_lines:
        how = f"fullgraph=True for ours, mode {args.compile_mode or 'default'}, freezing {'on' if args.freezing else 'off'}"
        lines += ["", f"torch.compile ({how}), first call including compilation: " + "; ".join(compile_lines) + "."]
    if memory:
        ours_b, peer_b = memory["ours"]["step_bytes"], memory["peer"]["step_bytes"]
        ratio = ours_b / peer_b
        target = MEMORY_TARGETS.get((args.device, args.memory_size, args.memory_batch))
        verdict = "" if target is None else f", target <= {target}x: {'pass' if ratio <= target else 'FAIL'}"
        how = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS growth over the step"
        lines += [
            "",
            f"Peak memory of one {args.memory_dtype} training step at {args.memory_size}px, batch {args.memory_batch} "
            f"({how}, fresh process per model): ours {ours_b / 2**20:.0f} MiB, peer {peer_b / 2**20:.0f} MiB, "
            f"ours/peer {ratio:.2f}x{verdict}. Peak totals incl. weights and optimizer state: "
            f"ours {memory['ours']['peak_bytes'] / 2**20:.0f} MiB, peer {memory['peer']['peak_bytes'] / 2**20:.0f} MiB.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

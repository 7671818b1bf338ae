"""Shared by the benchmark scripts: machine description, interleaved timing, RESULTS.md sections.

Benchmarks are scripts, never tests: speed depends on the machine and its load, so the numbers are
recorded with both (see ``machine_info``) instead of being asserted.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from cvt.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"


def _cpuinfo_first_values() -> dict[str, str]:
    """The first value of every key in /proc/cpuinfo (the first CPU's), or {} where there is none."""
    values: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            values.setdefault(key, value)
    except OSError:
        pass
    return values


# The instruction sets that decide which kernels are fast: the /proc/cpuinfo flag behind each name.
CPU_FEATURES = {"AVX-512": "avx512f", "AVX512_BF16": "avx512_bf16", "AMX": "amx_tile", "AMX_BF16": "amx_bf16"}


def cpu_features() -> str:
    """Which of `CPU_FEATURES` the CPU has, e.g. 'AVX-512, AVX512_BF16, no AMX, no AMX_BF16'
    ('flags unknown' where /proc/cpuinfo has none)."""
    flags = _cpuinfo_first_values().get("flags")
    if flags is None:
        return "flags unknown"
    present = set(flags.split())
    return ", ".join(name if flag in present else f"no {name}" for name, flag in CPU_FEATURES.items())


def cpu_model() -> str:
    """The CPU's marketing name, plus family/model numbers when the name is generic (VMs often
    report just "AMD EPYC"; family 26 is Zen 5, 25 Zen 3/4, 23 Zen 1/2), and the instruction sets that
    decide the kernels (AVX-512, AVX512_BF16, AMX), so that runs on different machines read side by side."""
    info = _cpuinfo_first_values()
    name = info.get("model name") or platform.processor() or "unknown CPU"
    family = info.get("cpu family")
    numbers = f"family {family}, model {info.get('model', '')}; " if family else ""
    return f"{name} ({numbers}{cpu_features()})"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}{' + uncommitted src changes' if dirty else ''}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_info(device: torch.device, threads: int) -> dict[str, str]:
    """Everything a reader needs to judge the numbers. The load average matters: on a shared
    machine other processes compete for the same cores, which slows both models alike (the runs are
    interleaved) but moves the absolute times."""
    import timm
    import transformers

    info = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": cpu_model(),
        "logical CPUs": str(os.cpu_count()),
        "torch threads": str(threads),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "repo": git_revision(),
        "load average at start": load_average(),
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
    return info


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in rounds: every round runs each function once.

    The order rotates from round to round (A B, B A, ...), so slow drifts of the machine (thermal,
    other processes) fall on every contender alike. Warmup calls (allocator pools, oneDNN primitive
    caches, lazy initialisation) are not timed. ``clock`` is wall time by default; process CPU time
    (``time.process_time``) is less disturbed by other processes on a shared machine.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync()
            start = clock()
            fns[name]()
            sync()
            times[name].append(clock() - start)
    return times


# Square matrices of this size: large enough that a GEMM runs at the machine's peak rate, small
# enough that a fp32 product takes well under a second on two cores.
GEMM_SIZE = 2048
GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_rates(
    device: torch.device, rounds: int = 5, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict[str, float]]:
    """FLOP/s of a `GEMM_SIZE` square matrix product per dtype in `GEMM_DTYPES` and per route torch
    offers: ``torch.mm`` (the BLAS in fp32, oneDNN in bf16 on CPU) and, on CPU, oneDNN's 1x1
    convolution of a channels-last map (the same product; on some CPUs oneDNN's fp32 kernels run at
    twice the BLAS's rate). Median of `rounds`, timed by `interleaved`, at the current thread count:
    the machine's ceiling, against which a model's speed is read (``model FLOPs / time / rate``) so
    that runs on machines with and without AMX or AVX512_BF16 compare."""
    fns: dict[str, Callable[[], object]] = {}
    for name, dtype in GEMM_DTYPES.items():
        a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=dtype) for _ in range(2))
        fns[f"{name} torch.mm"] = lambda a=a, b=b: torch.mm(a, b)
        if device.type == "cpu":
            # As `cvt.models.kernels.token_linear` sees tokens: a (1, M, K) batch as a (1, K, 1, M) map.
            a_map, b_kernel = a.unsqueeze(0).transpose(1, 2).unsqueeze(2), b.t().contiguous()[:, :, None, None]
            fns[f"{name} oneDNN 1x1 conv"] = lambda x=a_map, w=b_kernel: torch.nn.functional.conv2d(x, w)
    times = interleaved(fns, rounds, 2, synchronizer(device), clock)
    rates: dict[str, dict[str, float]] = {name: {} for name in GEMM_DTYPES}
    for key, t in times.items():
        dtype, route = key.split(" ", 1)
        rates[dtype][route] = 2 * GEMM_SIZE**3 / median(t)
    return rates


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def append_to_section(heading: str, text: str, path: Path = RESULTS) -> None:
    """Append ``text`` at the end of the ``## heading`` section of RESULTS.md, creating the file or
    the section if missing. Other sections (other people's results) are left as they are."""
    content = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    title = f"## {heading}"
    match = re.search(rf"^{re.escape(title)}\s*$", content, flags=re.MULTILINE)
    if match is None:
        content = content.rstrip("\n") + f"\n\n{title}\n\n{text.strip()}\n"
    else:
        following = re.search(r"^## ", content[match.end():], flags=re.MULTILINE)
        end = match.end() + following.start() if following else len(content)
        section = content[:end].rstrip("\n")
        rest = content[end:]
        content = f"{section}\n\n{text.strip()}\n" + (f"\n{rest}" if rest else "")
    atomic_write_text(path, content)


def run_heading(title: str, info: dict[str, str], args: object, protocol: str) -> list[str]:
    """The opening lines of a run's RESULTS.md entry: its title and date, the machine, and how it was
    timed (`args` carries rounds, warmup, clock and an optional note; `protocol` says how to read it)."""
    clock = "process CPU time" if getattr(args, "clock") == "cpu" else "wall time"
    note = getattr(args, "note", "")
    return [
        f"#### Run {info['date (UTC)']}, {title}",
        "",
        "; ".join(f"{k}: {v}" for k, v in info.items() if k != "date (UTC)"),
        "",
        f"Median of {getattr(args, 'rounds')} interleaved rounds after {getattr(args, 'warmup')} warmup calls, "
        f"{clock}; {protocol}" + (f" Note: {note}" if note else ""),
        "",
    ]

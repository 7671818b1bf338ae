"""Does the demo keep its speed when another program wants the same cores? `cvt train` (the digits
demo, shortened) alone and beside CPU-bound competitors, for several thread settings.

Each run is a fresh `cvt train` subprocess on a shared dataset cache. Its rate is the median img/s of
the epochs after the first (warm-up); a run too slow to finish them within --timeout is stopped and
rated by its last progress line instead. A competitor is a busy Python loop pinned to the cores the
benchmark may use, started before the run and killed after it.

    python benchmarks/bench_threads.py                        # appended to benchmarks/RESULTS.md
    python benchmarks/bench_threads.py --no-write --epochs 3 --competitors 1

Target: beside one competitor, the default setting within 2x of its rate alone.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import append_to_section, cpu_model, git_revision, load_average

HEADING = "CPU threads under competition"
BUSY_LOOP = "while True: pass"
RATE_IN_LOG = re.compile(r"\] loss \S+ lr \S+ (\d+) img/s")


def variants(cores: int) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Name -> (environment additions, config overrides). OMP_WAIT_POLICY '' leaves OpenMP's own
    default (spin, then sleep), which is what a run got before CPU_THREADS existed."""
    return {
        f"old default: {cores} threads, OpenMP's spin-wait": ({"OMP_WAIT_POLICY": ""}, ["CPU_THREADS", str(cores)]),
        f"{cores} threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["CPU_THREADS", str(cores)]),
        "1 thread": ({}, ["CPU_THREADS", "1"]),
        "new default (CPU_THREADS 0)": ({}, []),
    }


def _rate(folder: Path) -> tuple[float, str]:
    """(img/s, where it came from): completed epochs after the first, else the last progress line."""
    metrics = next(folder.glob("*/*/metrics.jsonl"), None)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics else []
    later = [r["images_per_sec"] for r in records if r["epoch"] >= 1]
    if later:
        return statistics.median(later), f"{len(later)} epoch(s)"
    log = next(folder.glob("*/*/log.txt"), None)
    rates = RATE_IN_LOG.findall(log.read_text()) if log else []
    return (float(rates[-1]), "progress line, stopped") if rates else (0.0, "no step finished")


def run_demo(env_extra: dict[str, str], overrides: list[str], epochs: int, timeout: float, cache: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update({k: v for k, v in env_extra.items() if v}, CVT_CACHE_DIR=str(cache))
    with tempfile.TemporaryDirectory(prefix="cvt-threads-") as scratch:
        command = [sys.executable, "-m", "cvt.cli", "train", "OUTPUT_DIR", scratch, "TRAIN.END_EPOCH", str(epochs),
                   "PRINT_FREQ", "2", "TENSORBOARD", "False", *overrides]
        try:
            subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=True)
        except subprocess.TimeoutExpired:
            pass
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"cvt train failed (exit {e.returncode}):\n{e.stderr[-3000:]}") from e
        return _rate(Path(scratch))


def start_competitors(count: int) -> list[subprocess.Popen]:
    cores = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    for proc in procs:
        os.sched_setaffinity(proc.pid, cores)
    time.sleep(0.5)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="demo epochs per run (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run is stopped (default 60)")
    parser.add_argument("--competitors", type=int, default=1, help="busy processes beside a run (default 1)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    machine = f"{cpu_model()}, {cores} usable CPUs, torch {torch.__version__}, repo {git_revision()}"
    print(machine, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cvt-threads-cache-") as cache:
        run_demo({}, ["CPU_THREADS", "1"], 1, 600, Path(cache))  # writes the dataset once
        for name, (env_extra, overrides) in variants(cores).items():
            load = load_average()
            alone, alone_from = run_demo(env_extra, overrides, args.epochs, args.timeout, Path(cache))
            competitors = start_competitors(args.competitors)
            try:
                contended, contended_from = run_demo(env_extra, overrides, args.epochs, args.timeout, Path(cache))
            finally:
                stop(competitors)
            slowdown = alone / contended if contended else float("inf")
            rows.append(f"| {name} | {alone:.0f} ({alone_from}) | {contended:.0f} ({contended_from}) | "
                        f"{slowdown:.1f}x | {load} |")
            print(rows[-1], flush=True)
    if not args.no_write:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        table = "\n".join([
            f"#### Run {when}: {args.epochs} epochs, {args.competitors} competitor(s); {machine}",
            "",
            "| setting | img/s alone | img/s beside competitor(s) | slowdown | load average before |",
            "|---|---|---|---|---|",
            *rows,
        ])
        append_to_section(HEADING, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

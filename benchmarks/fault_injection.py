"""Kill the demo's training at random moments and check that the reruns end where an uninterrupted run ends.

The demo (`cvt train`: the digits experiment) runs under DETERMINISTIC with TRAIN.AUTO_RESUME on (the
packaged demo starts afresh by default) twice, in separate run folders:

1. once, uninterrupted;
2. started, SIGKILLed at a random moment, restarted with the same command, killed again, ... `--kills`
   times, then run to the end. The moments are `--kills` points drawn uniformly over the uninterrupted
   run's duration; each attempt is killed after the gap between its point and the previous one. So
   the kills spread over the whole run and can land anywhere: while importing, mid-step, in
   evaluation, while a checkpoint is being written.

Then: metrics.jsonl must hold every epoch exactly once, every epoch's metrics (timings aside) and the
final val top-1 must equal the uninterrupted run's, and final_state.pth / model_best.pth must be equal
tensor for tensor.

    python benchmarks/fault_injection.py                           # 5 kills, appended to RESULTS.md
    python benchmarks/fault_injection.py --kills 3 --no-write TRAIN.END_EPOCH 6

Exit status 1 when anything differs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import append_to_section, cpu_model, git_revision, load_average

from cvt.weights.read import read_checkpoint

HEADING = "Fault injection"
TIMING_KEYS = ("images_per_sec", "epoch_time_s")


@dataclass
class Kill:
    after_s: float  # seconds after the start of the attempt
    epoch_before: int  # epochs completed per checkpoint.pth before the attempt
    epoch_after: int  # and after the kill


class Demo:
    """`cvt train OUTPUT_DIR <folder> DETERMINISTIC True TRAIN.AUTO_RESUME True [overrides]`."""

    def __init__(self, out: Path, cache: Path, overrides: list[str]) -> None:
        self.out = out
        self.stderr = out.with_suffix(".stderr")  # every attempt's, appended: a pipe could fill up
        self.command = [sys.executable, "-m", "cvt.cli", "train", "OUTPUT_DIR", str(out), "DETERMINISTIC", "True",
                        "TRAIN.AUTO_RESUME", "True", *overrides]
        self.env = {**os.environ, "CVT_CACHE_DIR": str(cache)}

    def start(self) -> subprocess.Popen:
        with open(self.stderr, "a") as stderr:
            return subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=stderr)

    def check(self, proc: subprocess.Popen) -> None:
        if proc.returncode != 0:
            raise SystemExit(f"cvt train failed (exit {proc.returncode}):\n{self.stderr.read_text()[-3000:]}")

    def run(self) -> float:
        """Run to the end; the wall time."""
        start = time.perf_counter()
        proc = self.start()
        proc.wait()
        self.check(proc)
        return time.perf_counter() - start

    @property
    def folder(self) -> Path:
        return next(self.out.glob("*/*/config.yaml")).parent  # OUTPUT_DIR/<dataset>/<experiment>

    def epochs_done(self) -> int:
        checkpoints = list(self.out.glob("*/*/checkpoint.pth"))
        return int(read_checkpoint(checkpoints[0]).extra["epoch"]) if checkpoints else 0

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.folder / "metrics.jsonl").read_text().splitlines()]


def kill_repeatedly(demo: Demo, kills: int, straight_s: float, rng: random.Random) -> list[Kill]:
    """Start the run, SIGKILL it, restart, ... `kills` times, as the module docstring says. An attempt
    that ends by itself before its kill time finishes the run early (fewer kills)."""
    moments = sorted(rng.uniform(0.0, straight_s) for _ in range(kills))
    done: list[Kill] = []
    for delay in (b - a for a, b in zip([0.0, *moments], moments)):
        before = demo.epochs_done()
        proc = demo.start()
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done.append(Kill(after_s=delay, epoch_before=before, epoch_after=demo.epochs_done()))
            print(f"killed after {delay:.1f} s: checkpoint at epoch {done[-1].epoch_after} (was {before})", flush=True)
            continue
        demo.check(proc)
        print(f"attempt finished before its kill at {delay:.1f} s", flush=True)
        break
    return done


def same_tensors(a: Path, b: Path) -> bool:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides for the demo")
    args = parser.parse_args()

    machine = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, repo {git_revision()}, "
               f"load average {load_average()}")
    print(machine, flush=True)
    with tempfile.TemporaryDirectory(prefix="cvt-faults-") as scratch_dir:
        scratch = Path(scratch_dir)
        straight = Demo(scratch / "straight", scratch / "cache", args.overrides)
        killed = Demo(scratch / "killed", scratch / "cache", args.overrides)
        straight_s = straight.run()  # also writes the digits dataset into the shared cache
        epochs = len(straight.records())
        print(f"uninterrupted: {epochs} epochs in {straight_s:.1f} s", flush=True)

        start = time.perf_counter()
        kills = kill_repeatedly(killed, args.kills, straight_s, random.Random(args.seed))
        final_attempt_s = killed.run()
        killed_s = time.perf_counter() - start

        reference, resumed = straight.records(), killed.records()
        epochs_once = [r["epoch"] for r in resumed] == list(range(epochs))
        metrics_equal = [without_timing(r) for r in resumed] == [without_timing(r) for r in reference]
        top1 = (reference[-1]["val_top1"], resumed[-1]["val_top1"])
        weights_equal = same_tensors(straight.folder / "final_state.pth", killed.folder / "final_state.pth")
        best_equal = same_tensors(straight.folder / "model_best.pth", killed.folder / "model_best.pth")
        leftovers = sorted(p.name for p in killed.folder.glob(".*.tmp"))

    ok = epochs_once and metrics_equal and top1[0] == top1[1] and weights_equal and best_equal and not leftovers
    yes = {True: "yes", False: "NO"}
    summary = (
        f"{len(kills)} kills at {', '.join(f'{k.after_s:.1f} s' for k in kills) or '-'} "
        f"(checkpoint epochs after each: {', '.join(str(k.epoch_after) for k in kills) or '-'}); "
        f"{epochs} epochs; uninterrupted {straight_s:.1f} s, killed and rerun {killed_s:.1f} s in all "
        f"(last attempt {final_attempt_s:.1f} s). Every epoch once in metrics.jsonl: {yes[epochs_once]}; "
        f"per-epoch metrics equal: {yes[metrics_equal]}; final val top-1 {top1[0]:.2f}% vs {top1[1]:.2f}%: "
        f"{yes[top1[0] == top1[1]]}; final_state.pth equal: {yes[weights_equal]}; model_best.pth equal: "
        f"{yes[best_equal]}; temporary files left: {', '.join(leftovers) or 'none'}."
    )
    print(summary)
    print("PASS" if ok else "FAIL")
    if not args.no_write:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        overrides = f"; overrides {' '.join(args.overrides)}" if args.overrides else ""
        append_to_section(HEADING, f"- {when}: {summary} {'PASS' if ok else 'FAIL'} ({machine}{overrides}; "
                                   f"`python benchmarks/fault_injection.py --kills {args.kills} --seed {args.seed}`)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

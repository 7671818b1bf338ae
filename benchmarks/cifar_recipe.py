"""What the CIFAR-10 from-scratch recipe (cvt-cifar10-32) costs on a CPU: a shortened run.

The project's machines hold no copy of CIFAR-10, so the data is random images written in the python
version's format (cifar-10-batches-py); the accuracy means nothing, the time per image does. One
`cvt train` subprocess trains TRAIN.END_EPOCH epochs of the recipe on `--images` training images
(float32: AMP's bfloat16 is slower on a CPU for these widths) and evaluates once.

    python benchmarks/cifar_recipe.py                  # 1 epoch of 1,000 images, appended to RESULTS.md
    python benchmarks/cifar_recipe.py --images 2000 --no-write
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import append_to_section, cpu_model, git_revision, load_average

HEADING = "CIFAR-10 recipe"
FULL_RUN_IMAGES = 50_000 * 300  # the recipe: 300 epochs of the 50,000 training images


def write_random_cifar10(root: Path, train_images: int, test_images: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = -(-train_images // 5)
    for name, count in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test_images)]:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, count).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"class{i}".encode() for i in range(10)]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="training images (split over the 5 batch files)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("overrides", nargs="*", metavar="KEY VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvt-cifar-") as scratch:
        write_random_cifar10(Path(scratch) / "data", args.images, 500)
        command = [sys.executable, "-m", "cvt.cli", "train", "--cfg", "cvt-cifar10-32", "DATASET.ROOT", str(Path(scratch) / "data"),
                   "OUTPUT_DIR", str(Path(scratch) / "out"), "TRAIN.END_EPOCH", "1", "WORKERS", "0", "AMP.ENABLED", "false",
                   "TENSORBOARD", "false", *args.overrides]
        load = load_average()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"cvt train failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        record = json.loads(next((Path(scratch) / "out").glob("*/*/metrics.jsonl")).read_text().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    images = record["images_per_sec"] * record["epoch_time_s"]
    ms_per_image = 1000 * record["epoch_time_s"] / images
    full_cpu_days = ms_per_image / 1000 * FULL_RUN_IMAGES / 86400
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()} " \
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}, repo {git_revision()}"
    line = (f"- {when}: 1 epoch of {int(round(images))} images: {record['epoch_time_s']:.1f} s training "
            f"({ms_per_image:.1f} ms/image, {record['images_per_sec']:.1f} img/s), {seconds:.1f} s wall, "
            f"{cpu / 60:.2f} CPU-minutes in all; the full recipe (300 x 50,000 images) would take about "
            f"{full_cpu_days:.0f} days at this rate (load average {load}; {machine}"
            + (f"; overrides {' '.join(args.overrides)}" if args.overrides else "") + ")")
    print(line)
    if not args.no_write:
        known = f"## {HEADING}" in (Path(__file__).parent / "RESULTS.md").read_text(encoding="utf-8")
        intro = "" if known else ("`benchmarks/cifar_recipe.py`: a shortened run of `cvt-cifar10-32` on random images in "
                                  "CIFAR-10's format (no copy of CIFAR-10 here, so no accuracy); float32, 1 process, "
                                  "WORKERS 0. The recipe is meant for one GPU; these figures say what a CPU costs.\n\n")
        append_to_section(HEADING, intro + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

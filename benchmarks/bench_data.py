"""Images/s of the CvT-13 training data pipeline on a folder of JPEGs.

Generates a JPEG folder in a temporary directory (by default 512 images of random sizes around
400x350 in 10 classes), then times one pass over it through ``cvt.data.build_loader(cfg, 'train')``
with the published CvT-13 recipe (timm RandAugment rand-m9-mstd0.5-inc1, random erasing .25, colour
jitter .4, bicubic RandomResizedCrop, hflip .5), for each worker count asked. For reference it also
times the plain pipeline the project's loader wraps (torchvision ImageFolder, the same timm
transform, a default DataLoader), and, per image in the main process, where the time goes: JPEG
decoding, the augmentation, and decoding in PIL's draft mode at half scale. Draft mode would change
what RandomResizedCrop sees (it crops from a smaller image, so large crops lose resolution), so it
is reported only, never used.

    python benchmarks/bench_data.py                 # workers 0 and 2, 512 images
    python benchmarks/bench_data.py --workers 0 1 2 --images 1024 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import RESULTS, append_to_section, load_average, machine_info, markdown_table

from cvt.config import load_config
from cvt.data import build_loader
from cvt.data.transforms import build_transform


def make_jpeg_folder(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """root/train/class_k/*.jpg: smooth random images (upsampled noise plus gradients), so file
    sizes and decode times are like photos' rather than like incompressible noise."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        width = int(rng.integers(300, 501))
        height = int(rng.integers(250, 451))
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
        pixels = np.clip(np.asarray(image, dtype=np.float32) + ramp + rng.normal(0, 8, (height, width, 3)), 0, 255)
        folder = root / "train" / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)


def images_per_second(batches: Iterable) -> float:
    """Images/s of one pass over a loader, from its first request to its last batch."""
    start = time.perf_counter()
    count = sum(images.shape[0] for images, *_ in batches)
    return count / (time.perf_counter() - start)


def project_loader(root: Path, workers: int, batch: int) -> Callable[[], Iterable]:
    cfg = load_config(
        "cvt-13-224x224",
        ["DATASET.ROOT", str(root), "WORKERS", str(workers), "TRAIN.BATCH_SIZE_PER_GPU", str(batch)],
    )
    loader, _ = build_loader(cfg, "train")
    epochs = iter(range(1_000_000))

    def next_epoch() -> Iterable:
        loader.set_epoch(next(epochs))  # a new order each pass, as in training
        return loader

    return next_epoch


def plain_loader(root: Path, workers: int, batch: int) -> Callable[[], Iterable]:
    """torchvision ImageFolder + the same transform + a default DataLoader: what the project's
    fault-tolerant loader adds over it is what this comparison shows."""
    from torchvision.datasets import ImageFolder

    cfg = load_config("cvt-13-224x224", ["DATASET.ROOT", str(root)])
    dataset = ImageFolder(str(root / "train"), transform=build_transform(cfg, is_train=True))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    return lambda: loader


def per_image_costs(root: Path, limit: int, threads: int) -> dict[str, float]:
    """Milliseconds per image in this process: decode, the transform (with one torch thread, as in a
    DataLoader worker, and with `threads`, as in the main process with WORKERS 0), and draft-mode
    decode."""
    cfg = load_config("cvt-13-224x224", ["DATASET.ROOT", str(root)])
    transform = build_transform(cfg, is_train=True)
    files = sorted((root / "train").rglob("*.jpg"))[:limit]

    def decode(path: Path, draft: bool = False) -> Image.Image:
        with Image.open(path) as image:
            if draft:
                # Half scale at most (PIL picks the smallest 1/2^k scale still >= this size).
                image.draft("RGB", (image.width // 2, image.height // 2))
            return image.convert("RGB")

    def timed(fn: Callable[[Path], object]) -> float:
        fn(files[0])  # lazy initialisation out of the timing
        start = time.perf_counter()
        for path in files:
            fn(path)
        return (time.perf_counter() - start) / len(files) * 1e3

    decoded = {path: decode(path) for path in files}
    costs = {"JPEG decode": timed(decode)}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        costs[f"CvT-13 transform, {n} torch thread{'s' if n > 1 else ''}"] = timed(lambda p: transform(decoded[p]))
    torch.set_num_threads(threads)
    costs["half-scale draft decode (changes the crops: report only)"] = timed(lambda p: decode(p, draft=True))
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--rounds", type=int, default=3, help="passes over the folder per loader, interleaved")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the main process")
    p.add_argument("--no-write", dest="write", action="store_false", help=f"print only, do not append to {RESULTS.name}")
    p.add_argument("--note", default="")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"), torch.get_num_threads())
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)

    with tempfile.TemporaryDirectory(prefix="cvt-bench-data-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make_jpeg_folder(root, args.images, args.classes)
        size_kib = sum(f.stat().st_size for f in root.rglob("*.jpg")) / len(list(root.rglob("*.jpg"))) / 1024
        print(f"made {args.images} JPEGs ({size_kib:.0f} KiB each on average) in {time.perf_counter() - start:.1f} s", flush=True)

        loaders: dict[str, Callable[[], Iterable]] = {}
        for workers in args.workers:
            loaders[f"cvt build_loader, workers {workers}"] = project_loader(root, workers, args.batch)
            loaders[f"plain ImageFolder + DataLoader, workers {workers}"] = plain_loader(root, workers, args.batch)
        first: dict[str, float] = {}
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for name, loader in loaders.items():  # starts the (persistent) workers
            first[name] = images_per_second(loader())
            print(f"  {name}: first pass {first[name]:.1f} img/s", flush=True)
        for r in range(args.rounds):
            names = list(loaders)
            for name in names[r % len(names):] + names[: r % len(names)]:
                rates[name].append(images_per_second(loaders[name]()))
                print(f"  {name}: {rates[name][-1]:.1f} img/s", flush=True)
        costs = per_image_costs(root, min(args.images, 128), args.threads)
        print("  per image in the main process: " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items()), flush=True)
        del loaders  # stop persistent workers before the folder goes

    info["load average at end"] = load_average()
    rows = [[name, f"{statistics.median(rates[name]):.1f}", f"{first[name]:.1f}"] for name in rates]
    lines = [
        f"#### Run {info['date (UTC)']}, {args.images} JPEGs (~400x350, {size_kib:.0f} KiB), batch {args.batch}",
        "",
        "; ".join(f"{k}: {v}" for k, v in info.items() if k != "date (UTC)"),
        "",
        f"CvT-13 training transform (cvt-13-224x224.yaml). images/s: median of {args.rounds} interleaved "
        "passes over the folder after a first one (which starts the persistent workers); each pass "
        "includes waiting for its first batch." + (f" Note: {args.note}" if args.note else ""),
        "",
        markdown_table(["loader", "images/s", "first pass, images/s"], rows),
        "",
        "Per image, in one process: " + "; ".join(f"{k} {v:.2f} ms" for k, v in costs.items()) + ".",
    ]
    report = "\n".join(lines)
    print("\n" + report)
    if args.write:
        append_to_section("Data pipeline", report)
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()

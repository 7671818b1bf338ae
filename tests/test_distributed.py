"""Two Gloo processes on the CPU, launched as users do (`bash run.sh -g 2 ...`), against one process:

(a) training with 2 processes x B/2 images equals training with 1 process x B (the same global
    batches), to float tolerance;
(b) testing gives exactly the same top-1, top-5 and loss, on an odd number of test images so the two
    shards are unequal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvt.config import save_config
from cvt.training.run import test as run_test  # not named test_*: pytest would collect it
from cvt.training.run import train

from helpers import VAL_PER_CLASS, config, free_ports, make_image_folder

# What makes the two runs comparable: SGD (Adam's first steps amplify float noise to +-lr); no
# BatchNorm (per-process batch statistics over B/2 images differ from those over B): 'linear'
# projections; no randomness that depends on the rank: no drop path, full-image crops of images
# that are mirror-symmetric (so the random flip changes nothing); LR not scaled by the process count.
COMPARABLE = (
    "MODEL.SPEC.QKV_PROJ_METHOD", ["linear"] * 3, "MODEL.SPEC.DROP_PATH_RATE", [0.0, 0.0, 0.0],
    "AUG.SCALE", (1.0, 1.0), "AUG.RATIO", (1.0, 1.0), "TRAIN.OPTIMIZER", "sgd", "TRAIN.LR", 0.05,
    "TRAIN.SCALE_LR", False, "TENSORBOARD", False, "TRAIN.END_EPOCH", 2,
    # The EMA copies the model before DDP makes the ranks' weights equal: every rank must build the
    # same initial weights, or the ranks' EMA models (evaluated together) differ.
    "TRAIN.EMA.ENABLED", True, "TRAIN.EMA.DECAY", 0.9,
    # One thread in every process: oneDNN splits a convolution's sums differently for another thread
    # count, and the test loss, compared exactly below, would move in its 8th digit.
    "CPU_THREADS", 1,
)
BATCH = 8

REPO = Path(__file__).resolve().parents[1]


def _run_sh(job: str, cfg_file: Path) -> None:
    """`bash run.sh -g 2 -t JOB --cfg FILE`: torchrun, two CPU processes, the real `cvt` command."""
    proc = subprocess.run(
        ["bash", str(REPO / "run.sh"), "-g", "2", "-t", job, "-p", str(free_ports()[0]), "--cfg", str(cfg_file)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    data = make_image_folder(tmp_path / "data")
    single = train(config(data, tmp_path / "single", *COMPARABLE, "TRAIN.BATCH_SIZE_PER_GPU", BATCH))
    single_test = run_test(config(data, tmp_path / "single_test", *COMPARABLE, "TEST.MODEL_FILE", single["final_state"]))

    # The experiment files for the two launches: full configs, as `save_config` writes them.
    save_config(config(data, tmp_path / "dist", *COMPARABLE, "TRAIN.BATCH_SIZE_PER_GPU", BATCH // 2), tmp_path / "train.yaml")
    save_config(config(data, tmp_path / "dist_test", *COMPARABLE, "TEST.MODEL_FILE", single["final_state"]),
                tmp_path / "test.yaml")
    _run_sh("train", tmp_path / "train.yaml")
    _run_sh("test", tmp_path / "test.yaml")

    # (a) the same training, to float tolerance: only the order of the gradient sums differs.
    dist_folder = tmp_path / "dist" / "shapes" / "tiny"
    one = torch.load(single["final_state"], weights_only=True)
    two = torch.load(dist_folder / "final_state.pth", weights_only=True)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    ckpt = torch.load(dist_folder / "checkpoint.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2  # each rank's generators, for resuming
    records = [json.loads(line) for line in (dist_folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[-1]["train_loss"] == pytest.approx(single["metrics"]["train_loss"], rel=1e-4)
    single_records = [json.loads(line) for line in (Path(single["final_state"]).parent / "metrics.jsonl").read_text().splitlines()]
    for got, expected in zip(records, single_records):
        assert got["val_loss_ema"] == pytest.approx(expected["val_loss_ema"], rel=1e-4)

    # (b) the same evaluation, exactly, over unequal shards (11 images: 6 on rank 0, 5 on rank 1).
    written = json.loads((tmp_path / "dist_test" / "shapes" / "tiny" / "test_metrics.json").read_text())
    assert written["processes"] == 2 and written["images"] == sum(VAL_PER_CLASS) == 11
    for key in ("top1", "top5", "loss"):
        assert written[key] == single_test[key], key


def _broadcast_buffers_worker(rank: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    from cvt.training.distributed import broadcast_buffers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        norm = torch.nn.BatchNorm2d(3)
        norm.running_mean.fill_(rank + 1.0)  # each rank's own batch statistics
        norm.num_batches_tracked.fill_(10 + rank)
        broadcast_buffers(norm)
        torch.save({"mean": norm.running_mean, "count": norm.num_batches_tracked}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_evaluate_with_rank_0_batchnorm_statistics(tmp_path):
    torch.multiprocessing.spawn(_broadcast_buffers_worker, args=(free_ports()[0], tmp_path), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["mean"], torch.ones(3)) and int(got["count"]) == 10


def test_run_sh_usage_and_mistakes():
    usage = subprocess.run(["bash", str(REPO / "run.sh"), "-h"], capture_output=True, text=True)
    assert usage.returncode == 0
    for option in ("--gpus", "--job-type", "--port", "--install-deps", "--nodes", "--node-rank", "--master-addr"):
        assert option in usage.stdout
    for args, message in ((["-t", "eval"], "train or test"), (["-g", "0"], "--gpus"), (["--node-rank", "1"], "0..0"),
                          (["-p"], "needs a value")):
        proc = subprocess.run(["bash", str(REPO / "run.sh"), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


@pytest.mark.slow  # torchrun's start, about 5 s
def test_run_sh_passes_a_ranks_one_line_error_on_without_torchruns_traceback(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "run.sh"), "-g", "1", "-t", "test", "-p", str(free_ports()[0])],  # no --cfg: a user's mistake
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: cvt test needs --cfg" in proc.stderr and proc.stderr.endswith("run.sh: rank 0 exited with code 2\n")
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr

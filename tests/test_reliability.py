"""The reliability issue end to end, through the `cvt` command on a generated 3-class folder with a tiny
CvT (a few seconds a run): bad files, wrong folders, configs and checkpoints, crashes mid-save, NaN
losses, SIGTERM/SIGINT, SIGKILL and rerun (bit-exact under DETERMINISTIC), torchrun restarts and a
rank that never starts.

Faults are injected by `faulty_cvt.py` (the `cvt` command with kill/NaN hooks chosen by environment
variables) or by real signals. User errors are checked with `cvt.cli.main` in this process where the
process boundary adds nothing: an exception other than UserError would escape main() and fail the test.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvt.cli import main
from cvt.training.loop import BadFileLog
from cvt.errors import UserError
from cvt.weights.read import read_checkpoint
from cvt.files import atomic_torch_save

from helpers import CLASSES, epochs_in, free_ports, make_image_folder, run_opts

FAULTY_CVT = Path(__file__).resolve().parent / "faulty_cvt.py"
TIMING_KEYS = ("images_per_sec", "epoch_time_s")
# Every random draw of training at once: mixup (NumPy), drop path (torch, in the training process),
# crops in two worker processes (seeded per epoch): a resume is exact only if all of them are restored.
DETERMINISTIC_RUN = (
    "DETERMINISTIC", True, "WORKERS", 2, "TRAIN.END_EPOCH", 3, "AUG.MIXUP_PROB", 1.0, "AUG.MIXUP", 0.8,
    "MODEL.SPEC.DROP_PATH_RATE", [0.0, 0.0, 0.2],
)
STEPS_PER_EPOCH = 3  # 24 training images in batches of 8


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """An experiment file; everything else is in the overrides (`run_opts`), so --cfg leaves the
    packaged demo out of these runs."""
    path = tmp_path_factory.mktemp("experiment") / "tiny.yaml"
    path.write_text("NAME: tiny\n")
    return path


def train_argv(experiment: Path, data: Path, out: Path, *extra: object, subcommand: str = "train") -> list[str]:
    return [subcommand, "--cfg", str(experiment), *run_opts(data, out, "TENSORBOARD", False, *extra)]


def run_folder(out: Path) -> Path:
    return out / "shapes" / "tiny"  # OUTPUT_DIR / DATASET.DATASET / NAME, as run_opts sets them


def command(argv: list[str], *, faulty: bool = False) -> list[str]:
    runner = [str(FAULTY_CVT)] if faulty else ["-m", "cvt.cli"]
    return [sys.executable, *runner, *argv]


def run_cvt(argv: list[str], faults: Mapping[str, int] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`cvt ARGV` in a fresh process (faulty_cvt.py with `faults` set, when given)."""
    env = {**os.environ, **{name: str(value) for name, value in (faults or {}).items()}}
    return subprocess.run(command(argv, faulty=faults is not None), env=env, capture_output=True, text=True,
                          timeout=timeout)


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    """`cvt ARGV` in this process: (exit code, what it printed to stderr)."""
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until `condition` holds; fail if the process ends first or it takes absurdly long."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the moment to interrupt it"
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def one_epoch(experiment, data, tmp_path_factory) -> Path:
    """OUTPUT_DIR of a run stopped after epoch 0 (END_EPOCH 1), for tests to copy and resume."""
    out = tmp_path_factory.mktemp("one_epoch")
    proc = run_cvt(train_argv(experiment, data, out, "TRAIN.END_EPOCH", 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(experiment, data, tmp_path_factory) -> Path:
    """An uninterrupted DETERMINISTIC run; its folder."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_cvt(train_argv(experiment, data, out, *DETERMINISTIC_RUN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_folder(out)


# --------------------------------------------------------------------------------------------------
# 1. Dataset faults
# --------------------------------------------------------------------------------------------------


def _add_bad_and_odd_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Bad files in train and val, and images in every awkward mode; returns (bad, awkward) paths."""
    circle, square = root / "train" / "circle", root / "train" / "square"
    good = (circle / "0.png").read_bytes()
    bad = [circle / "empty.png", circle / "truncated.png", circle / "notes.jpg", circle / "bomb.png",
           root / "val" / "square" / "broken.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(good[: len(good) // 2])
    bad[2].write_text("not an image")
    Image.new("1", (400, 400)).save(bad[3])  # 160,000 pixels in a few hundred bytes
    bad[4].write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")

    source = Image.open(circle / "1.png").convert("RGB")
    awkward = [square / "gray.png", square / "palette.png", square / "rgba.png", square / "cmyk.jpg",
               square / "deep.png"]
    source.convert("L").save(awkward[0])
    source.convert("P").save(awkward[1])
    source.convert("RGBA").save(awkward[2])
    source.convert("CMYK").save(awkward[3])
    Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257).save(awkward[4])  # 16-bit
    return bad, awkward


@pytest.mark.slow
def test_bad_files_are_skipped_named_and_counted_and_the_run_finishes(experiment, data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    bad, awkward = _add_bad_and_odd_files(root)
    proc = run_cvt(train_argv(experiment, root, tmp_path / "out", "DATASET.MAX_IMAGE_PIXELS", 100_000))
    assert proc.returncode == 0, proc.stderr[-3000:]

    folder = run_folder(tmp_path / "out")
    assert epochs_in(folder) == [0, 1]
    log = (folder / "log.txt").read_text()
    skipped = [line for line in log.splitlines() if "skipped unreadable file" in line]
    for path in bad:  # named once each, though the training files come round every epoch
        assert sum(str(path) in line for line in skipped) == 1, path
    assert any(str(bad[3]) in line and "decompression bomb" in line for line in skipped)
    assert "unreadable files skipped: 4 in training, 1 in evaluation" in log
    for path in awkward:  # converted to RGB and trained on, not skipped
        assert str(path) not in log


def test_many_bad_files_name_the_first_few_then_count(caplog):
    report = BadFileLog(show=2)
    with caplog.at_level("WARNING", logger="cvt"):
        for epoch in range(2):  # the same files every epoch
            report.add([(f"bad{i}.jpg", "truncated") for i in range(5)])
    assert report.count == 5
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped unreadable file")]
    assert named == ["skipped unreadable file bad0.jpg (truncated)", "skipped unreadable file bad1.jpg (truncated)"]
    assert "3 unreadable files skipped so far (only the first 2 are named)" in caplog.text


def test_bad_file_policy_stop_names_the_file(experiment, data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "train" / "cross" / "empty.png").write_bytes(b"")
    code, err = cli(capsys, train_argv(experiment, root, tmp_path / "out", "DATASET.BAD_FILES", "stop"))
    assert code == 2
    assert_one_error_line(err, "empty.png: empty file", "DATASET.BAD_FILES skip")
    assert not (run_folder(tmp_path / "out") / "checkpoint.pth").exists()


def _missing_val(root: Path) -> None:
    shutil.rmtree(root / "val")


def _no_images(root: Path) -> None:
    for image in (root / "train").rglob("*.png"):
        image.rename(image.with_suffix(".txt"))


def _other_classes(root: Path) -> None:
    (root / "val" / "square").rename(root / "val" / "squares")


@pytest.mark.parametrize(
    "break_folder, message",
    [
        (_missing_val, "val: dataset split folder not found"),
        (_no_images, "train: no images in its 3 class folders"),
        (_other_classes, "have different class folders (only in train: square; only in val: squares)"),
    ],
    ids=["missing split", "no images", "different classes"],
)
def test_folder_faults_stop_before_training_with_one_line(experiment, data, tmp_path, capsys, break_folder, message):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    break_folder(root)
    code, err = cli(capsys, train_argv(experiment, root, tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, message)
    folder = run_folder(tmp_path / "out")
    assert not (folder / "checkpoint.pth").exists() and not (folder / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# 2. Config faults
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (("TRAIN.LRR", 0.1), "unknown config key 'TRAIN.LRR' (from the command line); did you mean 'TRAIN.LR'?"),
        (("TRAIN.END_EPOCH", "three"), "'TRAIN.END_EPOCH' (from the command line) expects an integer"),
        (("TRAIN.LR", 0), "TRAIN.LR=0.0 is invalid: it must be positive"),
        (("TRAIN.BATCH_SIZE_PER_GPU", -8), "TRAIN.BATCH_SIZE_PER_GPU=-8 is invalid"),
        (("MODEL.SPEC.NUM_HEADS", [1, 3, 3]), "NUM_HEADS[1]=3 does not divide DIM_EMBED[1]=32"),
        (("TRAIN.IMAGE_SIZE", [2, 2]), "TRAIN.IMAGE_SIZE=[2, 2] is invalid: it must be at least 3x3"),
    ],
    ids=["unknown key", "wrong type", "zero LR", "negative batch", "heads", "image size"],
)
def test_config_faults_stop_with_one_line(experiment, data, tmp_path, capsys, override, message):
    code, err = cli(capsys, train_argv(experiment, data, tmp_path, *override))
    assert code == 2
    assert_one_error_line(err, message)
    assert not list(tmp_path.iterdir())  # stopped before anything was written


@pytest.mark.slow
def test_a_misspelt_key_in_the_file_is_one_line_from_the_installed_command(data, tmp_path):
    experiment = tmp_path / "typo.yaml"
    experiment.write_text("TRAIN:\n  BATCH_SIZE_PER_GUP: 8\n")
    proc = run_cvt(train_argv(experiment, data, tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")  # nothing before it: the config is read first
    assert_one_error_line(proc.stderr, "'TRAIN.BATCH_SIZE_PER_GUP'", "did you mean 'TRAIN.BATCH_SIZE_PER_GPU'?")


# --------------------------------------------------------------------------------------------------
# 3. Checkpoint faults
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_pth_is_read_safely_with_every_generator_state(reference):
    ckpt = read_checkpoint(reference / "checkpoint.pth")  # weights_only: no NumPy object may be in it
    assert ckpt.format == "cvt" and ckpt.extra["epoch"] == 3 and ckpt.class_names == list(CLASSES)
    (rng,) = ckpt.extra["rng"]
    assert set(rng) >= {"python", "numpy", "torch"} and isinstance(rng["numpy"]["keys"], torch.Tensor)


class _Payload:
    """Unpickling this runs Path.touch(marker): proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def two_classes(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_classes")
    for split in ("train", "val"):
        for name in CLASSES[:2]:
            shutil.copytree(data / split / name, root / split / name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("resume another architecture", "it was trained with another MODEL.SPEC (differs in DEPTH)"),
        ("resume other classes", "its 3 class names differ from the training folder's 2"),
        ("resume a truncated file", "cannot resume: checkpoint"),
        ("auto-resume a garbage checkpoint.pth", "is not a PyTorch checkpoint"),
        ("test another class count", "has a 3-class head but MODEL.NUM_CLASSES is 4"),
        ("test a truncated file", "is truncated or corrupt"),
        ("fine-tune from another architecture", "does not fit the model"),
    ],
)
def test_wrong_checkpoints_are_one_line(one_epoch, experiment, data, two_classes, tmp_path, capsys, case, message):
    trained = run_folder(one_epoch)
    truncated = tmp_path / "truncated.pth"
    whole = (trained / "checkpoint.pth").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    if case == "resume another architecture":
        argv = train_argv(experiment, data, out, "TRAIN.CHECKPOINT", trained / "checkpoint.pth",
                          "MODEL.SPEC.DEPTH", [1, 1, 2])
    elif case == "resume other classes":
        argv = train_argv(experiment, two_classes, out, "TRAIN.CHECKPOINT", trained / "checkpoint.pth",
                          "MODEL.NUM_CLASSES", 2)
    elif case == "resume a truncated file":
        argv = train_argv(experiment, data, out, "TRAIN.CHECKPOINT", truncated)
    elif case == "auto-resume a garbage checkpoint.pth":
        run_folder(out).mkdir(parents=True)
        (run_folder(out) / "checkpoint.pth").write_bytes(os.urandom(4096))
        argv = train_argv(experiment, data, out)
    elif case == "test another class count":
        argv = train_argv(experiment, data, out, "MODEL.NUM_CLASSES", 4, "TEST.MODEL_FILE", trained / "final_state.pth",
                          subcommand="test")
    elif case == "test a truncated file":
        argv = train_argv(experiment, data, out, "TEST.MODEL_FILE", truncated, subcommand="test")
    else:
        argv = train_argv(experiment, data, out, "MODEL.PRETRAINED", trained / "final_state.pth",
                          "MODEL.SPEC.DIM_EMBED", [16, 32, 64], "MODEL.SPEC.NUM_HEADS", [1, 2, 4])
    code, err = cli(capsys, argv)
    assert code == 2
    assert_one_error_line(err, message)


@pytest.mark.slow
def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(one_epoch, experiment, data, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    state = torch.load(run_folder(one_epoch) / "checkpoint.pth", weights_only=True)
    folder = run_folder(tmp_path / "out")
    folder.mkdir(parents=True)
    torch.save({**state, "extra": _Payload(marker)}, folder / "checkpoint.pth")  # what auto-resume reads

    for argv in (train_argv(experiment, data, tmp_path / "out"),
                 ["predict", "--weights", str(folder / "checkpoint.pth"), str(data / "val")]):
        code, err = cli(capsys, argv)
        assert code == 2
        assert_one_error_line(err, "refused, because loading it could run code")
    assert not marker.exists()


def _disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    for name in ("fsync", "replace"):  # the data is written but not durable / not yet in place
        with monkeypatch.context() as patch:
            patch.setattr(os, name, _disk_full)
            with pytest.raises(UserError, match="No space left on device; the previous file, if any, is unchanged"):
                atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
        assert path.read_bytes() == before, name
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"], name  # no temporary file left


def resumable_copy(one_epoch: Path, out: Path) -> tuple[Path, bytes]:
    """A copy of the one-epoch run in `out`: its run folder and its checkpoint's bytes."""
    shutil.copytree(one_epoch, out, dirs_exist_ok=True)
    folder = run_folder(out)
    return folder, (folder / "checkpoint.pth").read_bytes()


@pytest.mark.slow
def test_a_crash_mid_save_keeps_the_previous_checkpoint_and_the_rerun_finishes(experiment, data, one_epoch, tmp_path):
    folder, saved = resumable_copy(one_epoch, tmp_path)

    argv = train_argv(experiment, data, tmp_path, "TRAIN.END_EPOCH", 3)
    killed = run_cvt(argv, {"CVT_FAULT_KILL_IN_SAVE": 1})  # dies writing epoch 1's checkpoint
    assert killed.returncode == -signal.SIGKILL
    assert list(folder.glob(".checkpoint.pth.*.tmp"))  # the unfinished save, never renamed into place
    assert (folder / "checkpoint.pth").read_bytes() == saved
    assert read_checkpoint(folder / "checkpoint.pth").extra["epoch"] == 1

    rerun = run_cvt(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert epochs_in(folder) == [0, 1, 2]
    assert not list(folder.glob(".*.tmp"))  # the leftover went with the next save


# --------------------------------------------------------------------------------------------------
# 4. Training faults
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_nonfinite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(experiment, data, one_epoch, tmp_path):
    folder, saved = resumable_copy(one_epoch, tmp_path)

    # Resumed at epoch 1, the process's 2nd loss is epoch 1's step 1.
    argv = train_argv(experiment, data, tmp_path, "TRAIN.END_EPOCH", 3)
    stopped = run_cvt(argv, {"CVT_FAULT_NAN_AT_CALL": 2})
    assert stopped.returncode == 2
    assert_one_error_line(stopped.stderr, "non-finite loss at epoch 1, step 1", "TRAIN.NONFINITE_LOSS skip")
    assert (folder / "checkpoint.pth").read_bytes() == saved
    assert epochs_in(folder) == [0]

    skipped = run_cvt([*argv, "TRAIN.NONFINITE_LOSS", "skip"], {"CVT_FAULT_NAN_AT_CALL": 2})
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert [r.get("skipped_steps", 0) for r in records(folder)] == [0, 1, 0]
    assert "non-finite loss at epoch 1, step 1: step skipped" in (folder / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, to_group, workers",
    # SIGTERM as a scheduler sends it to the training process; SIGINT as Ctrl-C sends it, to the
    # whole process group, data loader workers included.
    [(signal.SIGTERM, False, 0), (signal.SIGINT, True, 2)],
    ids=["SIGTERM", "Ctrl-C with workers"],
)
def test_a_stop_signal_saves_a_resumable_checkpoint(experiment, data, tmp_path, signum, to_group, workers):
    argv = train_argv(experiment, data, tmp_path, "TRAIN.END_EPOCH", 3, "TRAIN.BATCH_SIZE_PER_GPU", 4,
                      "WORKERS", workers)
    folder = run_folder(tmp_path)
    log = folder / "log.txt"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command(argv), stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            wait_for(lambda: log.exists() and "epoch 1 [1/6]" in log.read_text(), proc)
            if to_group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err[-3000:]  # a KeyboardInterrupt for the CLI, as documented
    assert "Traceback" not in err
    assert log.read_text().count(f"{signal.Signals(signum).name} received") == 1  # the training process's only

    ckpt = read_checkpoint(folder / "checkpoint.pth")
    assert ckpt.extra["epoch"] in (1, 2)
    rerun = run_cvt(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert epochs_in(folder) == [0, 1, 2]
    assert f"resumed from {folder / 'checkpoint.pth'} at epoch {ckpt.extra['epoch']}" in log.read_text()


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_an_uninterrupted_run(reference, experiment, data, tmp_path):
    argv = train_argv(experiment, data, tmp_path, *DETERMINISTIC_RUN)
    folder = run_folder(tmp_path)
    attempts = [
        {"CVT_FAULT_KILL_AFTER_STEPS": STEPS_PER_EPOCH + 1},  # in epoch 1, between two steps
        {"CVT_FAULT_KILL_IN_SAVE": 1},  # writing epoch 1's checkpoint, after its metrics record
    ]
    for faults in attempts:
        assert run_cvt(argv, faults).returncode == -signal.SIGKILL
        assert read_checkpoint(folder / "checkpoint.pth").extra["epoch"] == 1
    final = run_cvt(argv)
    assert final.returncode == 0, final.stderr[-3000:]

    assert epochs_in(folder) == [0, 1, 2]
    assert [without_timing(r) for r in records(folder)] == [without_timing(r) for r in records(reference)]
    assert_same_weights(folder / "final_state.pth", reference / "final_state.pth")
    assert_same_weights(folder / "model_best.pth", reference / "model_best.pth")


# --------------------------------------------------------------------------------------------------
# 5. Distributed faults
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resumes(experiment, data, tmp_path):
    # Rank 1 dies by SIGKILL after its 4th step (epoch 1) on the first attempt only.
    argv = train_argv(experiment, data, tmp_path, "TRAIN.END_EPOCH", 3, "TRAIN.BATCH_SIZE_PER_GPU", 4,
                      "DIST_TIMEOUT_S", 60)
    env = {**os.environ, "CVT_FAULT_RANK": "1", "CVT_FAULT_KILL_AFTER_STEPS": str(STEPS_PER_EPOCH + 1)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
         str(FAULTY_CVT), *argv],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    folder = run_folder(tmp_path)
    log = (folder / "log.txt").read_text()
    assert log.count("2 process(es)") == 2  # the first attempt and the restart
    assert f"resumed from {folder / 'checkpoint.pth'} at epoch 1" in log
    assert epochs_in(folder) == [0, 1, 2]
    assert read_checkpoint(folder / "checkpoint.pth").extra["epoch"] == 3


@pytest.mark.slow
def test_a_rank_that_never_starts_is_a_clear_error_not_a_hang(experiment, data, tmp_path):
    # World size 2 with one process: rank 0 waits for a peer that never comes, rank 1 for a master
    # that is not there. Both must give up after DIST_TIMEOUT_S with one line.
    procs = {}
    ports = free_ports(2)  # distinct: the two ranks must not find each other
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[rank])}
        argv = train_argv(experiment, data, tmp_path / f"rank{rank}", "DIST_TIMEOUT_S", 2)
        procs[rank] = subprocess.Popen(command(argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
    for rank, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 2, err[-3000:]
        assert_one_error_line(err, f"rank {rank} of 2", "DIST_TIMEOUT_S")

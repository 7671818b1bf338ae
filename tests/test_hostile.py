"""Round two of hostile inputs and faults (issue 13): each is one clear line and loses nothing."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cvt.cli import main
from cvt.config import get_defaults, load_config, save_config
from cvt.data import build_loader
from cvt.data.dataset import ImageFolderDataset, load_rgb
from cvt.data.loader import FolderLoader, ShardSampler
from cvt.errors import UserError
from cvt.files import atomic_write_bytes, checksum_path
from cvt.models.cvt import create_model
from cvt.training.run import build_model, load_pretrained, train
from cvt.training.session import LOCK_FILE, StopSignals, lock_run_folder, run_logging
from cvt.training.state import read_training
from cvt.weights.export import save_hf, save_official, save_safetensors
from cvt.weights.load import load_checkpoint
from cvt.weights.read import read_checkpoint
import cvt.weights.read as read_module

from helpers import CLASSES, TINY_SPEC, config, epochs_in, make_image_folder

TINY = dict(TINY_SPEC)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


def run_dir(out: Path) -> Path:
    return out / "shapes" / "tiny"


def one_line(error: BaseException | str, *fragments: str) -> None:
    text = str(error)
    assert len(text.strip().splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, text


def tiny_model(num_classes: int = 3) -> torch.nn.Module:
    return create_model(TINY, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------
# 1. Symlinks in class folders
# --------------------------------------------------------------------------------------------------


def in_bounded_child(work: Callable[[], Any], seconds: int = 60, extra_memory: int = 1 << 30) -> Any:
    """`work()` in a forked child limited to `seconds` and `extra_memory` more heap than now: a walk
    that loops forever dies there instead of taking the test machine down."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            os.close(read_end)
            used = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmData:"))) * 1024
            resource.setrlimit(resource.RLIMIT_DATA, (used + extra_memory, resource.RLIM_INFINITY))
            signal.alarm(seconds)
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(work(), pipe)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and payload, f"the child failed (wait status {status}): looped or ran out of memory"
    return pickle.loads(payload)


def test_links_to_files_and_outside_folders_are_followed_loops_and_other_classes_are_not(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    for name in ("o1.png", "o2.png", "sub/o3.png"):
        Image.new("RGB", (8, 8)).save(outside / name)
    (outside / "sub" / "loop").symlink_to(outside)  # a loop outside the split
    split = tmp_path / "data" / "train"
    for name, count in (("a", 3), ("b", 2)):
        (split / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(split / name / f"{i}.png")
    a = split / "a"
    (a / "here").symlink_to(".")  # alone: 60 images counted as 860
    (a / "up").symlink_to("..")  # other classes' images relabelled; with 'here', a walk forever
    (a / "ext").symlink_to(outside)
    (a / "linked.png").symlink_to(outside / "o1.png")
    (split / "b" / "other").symlink_to("../a")  # another class's folder

    def listing() -> tuple[list[tuple[str, int]], list[str]]:
        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("cvt").addHandler(handler)
        dataset = ImageFolderDataset(tmp_path / "data", "train", lambda image: image)
        return dataset.samples, messages

    samples, messages = in_bounded_child(listing)
    by_class = {c: sorted(os.path.relpath(p, split) for p, t in samples if t == i) for i, c in enumerate(("a", "b"))}
    assert by_class == {
        "a": ["a/0.png", "a/1.png", "a/2.png", "a/ext/o1.png", "a/ext/o2.png", "a/ext/sub/o3.png", "a/linked.png"],
        "b": ["b/0.png", "b/1.png"],
    }
    not_followed = sorted(m.split(":")[0] for m in messages if "not followed" in m)
    assert not_followed == sorted(str(p) for p in (a / "ext" / "sub" / "loop", a / "here", a / "up", split / "b" / "other"))


# --------------------------------------------------------------------------------------------------
# 2, 3. Earlier results and the run folder's lock
# --------------------------------------------------------------------------------------------------


def earlier_results(out: Path) -> Path:
    folder = run_dir(out)
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"epoch": 0, "val_top1": 100.0}\n')
    (folder / "model_best.pth").write_bytes(b"the best model")
    (folder / "log.txt").write_text("the earlier log\n")
    return folder


@pytest.mark.parametrize("auto_resume", [True, False])
def test_a_fresh_start_refuses_to_replace_earlier_results(data, tmp_path, auto_resume):
    folder = earlier_results(tmp_path)
    with pytest.raises(UserError) as error:
        train(config(data, tmp_path, "TRAIN.AUTO_RESUME", auto_resume))
    one_line(error.value, str(folder), "metrics.jsonl, model_best.pth", "TRAIN.EARLIER_RESULTS move", "overwrite")
    assert (folder / "metrics.jsonl").read_text() == '{"epoch": 0, "val_top1": 100.0}\n'
    assert (folder / "model_best.pth").read_bytes() == b"the best model"
    assert not (folder / "config.yaml").exists() and not (folder / LOCK_FILE).exists()


def test_earlier_results_are_moved_aside_on_request_and_the_run_trains(data, tmp_path):
    folder = earlier_results(tmp_path)
    train(config(data, tmp_path, "TRAIN.EARLIER_RESULTS", "move", "TRAIN.END_EPOCH", 1, "TENSORBOARD", False))
    (aside,) = folder.glob("earlier-*")
    assert (aside / "model_best.pth").read_bytes() == b"the best model"
    assert (aside / "log.txt").read_text() == "the earlier log\n"
    assert epochs_in(folder) == [0]
    assert f"to {aside}/ (TRAIN.EARLIER_RESULTS move)" in (folder / "log.txt").read_text()


@pytest.mark.parametrize("mistake", [("DATASET.ROOT", "/nonexistent/data"), ("DATASET.TRAIN_SET", "trian")])
def test_a_mistyped_dataset_path_is_refused_before_earlier_results_are_moved(data, tmp_path, mistake):
    folder = earlier_results(tmp_path)
    with pytest.raises(UserError) as error:
        train(config(data, tmp_path, "TRAIN.EARLIER_RESULTS", "move", *mistake))
    one_line(error.value, mistake[1], "not found")
    assert not list(folder.glob("earlier-*"))
    assert (folder / "model_best.pth").read_bytes() == b"the best model"


def test_a_second_run_on_a_folder_in_use_is_one_line_naming_the_holder(data, tmp_path):
    folder = run_dir(tmp_path)
    with lock_run_folder(folder) as took_over:
        assert took_over is None
        with pytest.raises(UserError) as error:
            train(config(data, tmp_path))
    one_line(error.value, f"run folder {folder} is in use", f"pid {os.getpid()} on host {socket.gethostname()}")
    assert not (folder / LOCK_FILE).exists()  # released on exit


def test_a_dead_holders_lock_is_taken_over_and_logged(data, tmp_path):
    folder = run_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01 00:00:00"}))
    train(config(data, tmp_path, "TRAIN.END_EPOCH", 1, "TENSORBOARD", False))
    assert "took over the lock of an earlier run that is no longer running (pid 999999 on host gone" in (folder / "log.txt").read_text()
    assert not (folder / LOCK_FILE).exists()


# A run that holds the lock, forks a child that lives on (a data-loader worker, which notices its
# parent's death only seconds later) and is SIGKILLed, as the OOM killer does; prints the child's pid.
_DIES_LEAVING_A_CHILD = """
import os, signal, sys, time
from cvt.training.session import lock_run_folder
with lock_run_folder(sys.argv[1]):
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_lock_is_free_though_a_child_it_forked_lives_on(tmp_path):
    folder = run_dir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _DIES_LEAVING_A_CHILD, str(folder)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert (folder / LOCK_FILE).exists()  # not cleaned up: only a free flock says it is stale
        with lock_run_folder(folder) as took_over:  # was "in use by another run" while the child lived
            assert took_over and f"pid {proc.pid} on host" in took_over
    finally:
        os.kill(child, signal.SIGKILL)
        proc.stdout.close()


# --------------------------------------------------------------------------------------------------
# 4. Resume with a changed config
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def one_epoch_run(data, tmp_path) -> Path:
    train(config(data, tmp_path, "TRAIN.END_EPOCH", 1, "TENSORBOARD", False))
    return tmp_path


def test_changed_optimizer_settings_apply_on_resume_and_are_logged(data, one_epoch_run):
    out = one_epoch_run
    train(config(data, out, "TRAIN.END_EPOCH", 2, "TENSORBOARD", False, "TRAIN.WD", 0.1,
                 "TRAIN.OPTIMIZER_ARGS.betas", [0.8, 0.99]))
    folder = run_dir(out)
    groups = read_checkpoint(folder / "checkpoint.pth").extra["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    log = (folder / "log.txt").read_text()
    assert "resuming with changed settings, applied from now on: " in log and "TRAIN.WD 0.05 -> 0.1" in log
    assert "weight_decay 0.05 -> 0.1" in log and "betas (0.9, 0.999) -> (0.8, 0.99)" in log
    assert load_config(folder / "config.yaml").TRAIN.WD == 0.1
    assert epochs_in(folder) == [0, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (("TRAIN.OPTIMIZER", "sgd"), "optimizer state does not suit TRAIN.OPTIMIZER SGD"),
        (("TRAIN.WITHOUT_WD_LIST", ["bn"]), "with another TRAIN.WITHOUT_WD_LIST ['bn', 'bias', 'ln'] -> ['bn']"),
        (("TRAIN.OPTIMIZER_ARGS.amsgrad", True), "settings amsgrad differ"),
    ],
    ids=["optimizer", "without-wd-list", "amsgrad"],
)
def test_optimizer_changes_the_saved_state_cannot_follow_are_one_line(data, one_epoch_run, change, message):
    folder = run_dir(one_epoch_run)
    before = (folder / "config.yaml").read_text()
    with pytest.raises(UserError) as error:
        train(config(data, one_epoch_run, "TRAIN.END_EPOCH", 2, "TENSORBOARD", False, *change))
    one_line(error.value, "cannot resume from", message, "TRAIN.EARLIER_RESULTS move")
    assert (folder / "config.yaml").read_text() == before  # records what applied, not the refused config
    assert epochs_in(folder) == [0]


# --------------------------------------------------------------------------------------------------
# 5. File modes and the hf export's overwriting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
        save_official(tiny_model(), tmp_path / "m.pth")
    finally:
        os.umask(previous)
    for name in ("f.bin", "m.pth", "m.pth.sha256"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_hf_export_replaces_files_only_with_force(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_safetensors(tiny_model(), weights, list(CLASSES))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    argv = ["export", "--weights", str(weights), "--format", "hf", str(out)]
    assert main(argv) == 2
    one_line(capsys.readouterr().err, "already holds config.json", "--force")
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert main([*argv[:-1], "--force", str(out)]) == 0
    assert read_checkpoint(out).class_names == list(CLASSES)


# --------------------------------------------------------------------------------------------------
# 6. File names that are not UTF-8
# --------------------------------------------------------------------------------------------------


def test_predict_prints_a_non_utf8_file_name_under_a_strict_utf8_stdout(data, tmp_path, monkeypatch):
    cfg = config(data, tmp_path)
    save_config(cfg, tmp_path / "cfg.yaml")
    save_official(build_model(cfg), tmp_path / "m.pth")
    image = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.png")  # Latin-1, as old cameras write
    Image.open(data / "val" / "circle" / "0.png").save(image, format="PNG")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["predict", "--cfg", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "m.pth"), image]) == 0
    stdout.flush()
    assert "caf\\udce9.png: " in stdout.buffer.getvalue().decode()


def test_a_non_utf8_file_name_reaches_log_txt(tmp_path, capsys):
    name = os.fsdecode(b"bad\xff.png")
    with run_logging(tmp_path, True):
        logging.getLogger("cvt").warning("skipped %s: not an image", name)
    assert "skipped bad\\udcff.png: not an image" in (tmp_path / "log.txt").read_text()
    assert "Logging error" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 7. Config files
# --------------------------------------------------------------------------------------------------

BOMB = b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
    f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n".encode() for a, b in zip("abcdef", "bcdefg")
) + b"TRAIN:\n  OPTIMIZER_ARGS:\n    x: *g\n"


@pytest.mark.parametrize(
    "content, message",
    [
        ("TRAIN:\n  LR: 0.1\n".encode("utf-16"), "is UTF-16 encoded (PowerShell's default); save it as UTF-8"),
        (bytes(range(128, 256)), "is not UTF-8 text (byte 0x80 at offset 0; a binary file?)"),
        (("A: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested more than 100 levels deep"),
        (BOMB, "its aliases expand to more than 100,000 values (an alias bomb?)"),
        (b"TRAIN:\n  LR: 0.1\n  WD: 0.1\n  LR: 0.2\n", "duplicate key 'LR' at lines 2 and 4"),
        (b"TRAIN:\n  OPTIMIZER_ARGS:\n    x: &a [*a]\n", "an alias refers to itself"),
    ],
    ids=["utf-16", "binary", "deep", "alias-bomb", "duplicate-key", "recursive-alias"],
)
def test_hostile_config_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "x.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_config(path)
    one_line(error.value, str(path), message)


@pytest.mark.parametrize("value", ["inf", "1e400", "nan"])
def test_a_non_finite_learning_rate_is_refused_up_front(value):
    with pytest.raises(UserError, match="TRAIN.LR=.* is invalid: it must be a finite number"):
        load_config(None, ["TRAIN.LR", value])


# --------------------------------------------------------------------------------------------------
# 8, 10, 11. Crafted and damaged checkpoints
# --------------------------------------------------------------------------------------------------


def training_checkpoint(**changes: Any) -> dict[str, Any]:
    model = tiny_model()
    ckpt = {
        "model": model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        "scheduler": {}, "scaler": {}, "ema": None, "epoch": 1, "best_top1": 50.0, "class_names": list(CLASSES),
        "spec": model.spec.to_dict(), "act": model.act, "config": get_defaults().dump(), "rng": [],
    }
    ckpt.update(changes)
    return {k: v for k, v in ckpt.items() if v is not ...}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"config": ["a", "list"]}, "its 'config' is a list, not the YAML text"),
        ({"spec": "CvT-13"}, "its 'spec' is a str, not a mapping"),
        ({"class_names": ["circle", "cross"]}, "its 'class_names' holds 2 names for a head of 3 classes"),
        ({"class_names": "abc"}, "its 'class_names' is not a list of strings"),
    ],
    ids=["config-list", "spec-string", "short-class-names", "class-names-string"],
)
def test_crafted_checkpoint_fields_are_one_line(tmp_path, changes, message):
    path = tmp_path / "c.pth"
    torch.save(training_checkpoint(**changes), path)
    with pytest.raises(UserError) as error:
        read_checkpoint(path)
    one_line(error.value, str(path), message)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, "holds no EMA weights: its run was trained without TRAIN.EMA.ENABLED"),
        ({"ema": {"head.weight": "not a tensor"}}, "its 'ema' is not a state dict of tensors"),
    ],
    ids=["no-ema", "ema-not-tensors"],
)
def test_ema_weights_asked_of_a_checkpoint_without_them_are_one_line(tmp_path, changes, message):
    path = tmp_path / "c.pth"
    torch.save(training_checkpoint(**changes), path)
    read_checkpoint(path)  # the model's weights read as ever
    with pytest.raises(UserError) as error:
        read_checkpoint(path, use_ema=True)
    one_line(error.value, str(path), message)


@pytest.mark.parametrize("name", ["cvt-13", "hf-hub:someone/cvt-13"])
def test_ema_weights_asked_of_a_published_name_are_refused_before_any_download(monkeypatch, name):
    monkeypatch.setattr(read_module, "download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(UserError) as error:
        read_checkpoint(name, use_ema=True)
    one_line(error.value, name, "holds no EMA weights: only a run's checkpoint.pth does")


def test_a_stored_config_that_is_broken_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.pth"
    torch.save(training_checkpoint(config="TRAIN: [unclosed"), path)
    image = make_image_folder(tmp_path / "images") / "val" / "circle" / "0.png"
    assert main(["predict", "--weights", str(path), str(image)]) == 2
    one_line(capsys.readouterr().err, f"the config stored in {path} is not valid YAML")


@pytest.mark.parametrize(
    "changes, message",
    [({"optimizer": ...}, "its 'optimizer' is missing"), ({"epoch": "1"}, "its 'epoch' is '1', not a count"),
     ({"step": "4"}, "its 'step' is '4', not a count of optimizer steps"),
     ({"scheduler": {"best": 1.0, "plateau": {"best": 1.0}}}, "'plateau' state that is not its counters and rates")],
    ids=["no-optimizer", "string-epoch", "string-step", "plateau-without-counters"],
)
def test_a_resumable_checkpoint_missing_what_a_resume_reads_is_one_line(tmp_path, changes, message):
    path = tmp_path / "checkpoint.pth"
    torch.save(training_checkpoint(**changes), path)
    with pytest.raises(UserError) as error:
        read_training(path)
    one_line(error.value, f"cannot resume from {str(path)!r}", message)


@pytest.mark.parametrize("key", ["spec", "class_names"])
def test_safetensors_metadata_that_is_not_json_is_one_line(tmp_path, key):
    path = tmp_path / "m.safetensors"
    metadata = {"format": "cvt", "spec": json.dumps(TINY), "class_names": json.dumps(list(CLASSES)), key: "{not json"}
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, path, metadata=metadata)
    with pytest.raises(UserError) as error:
        read_checkpoint(path)
    one_line(error.value, str(path), f"its '{key}' metadata is not valid JSON")


def test_an_hf_config_json_that_is_a_list_is_one_line(tmp_path):
    save_hf(tiny_model(), tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError) as error:
        read_checkpoint(tmp_path)
    one_line(error.value, "config.json", "holds a JSON list, not a Hugging Face config object")


def test_non_finite_weights_are_refused_on_load(tmp_path):
    state = tiny_model().state_dict()
    state["head.weight"][0, 0] = float("nan")
    with pytest.raises(UserError) as error:
        load_checkpoint(tiny_model(), state)
    one_line(error.value, "tensor 'head.weight' holds NaN or infinite values")


def flip_a_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_saved_torch_file_is_one_line(tmp_path):
    path = save_official(tiny_model(), tmp_path / "m.pth")
    assert checksum_path(path).read_text().split() == [__import__("hashlib").sha256(path.read_bytes()).hexdigest(), "m.pth"]
    read_checkpoint(path)
    head = torch.load(path, weights_only=True)["head.weight"]
    offset = path.read_bytes().index(head.numpy().tobytes())  # inside the tensor data, where nothing else looks
    flip_a_bit(path, offset + 5)
    with pytest.raises(UserError) as error:
        read_checkpoint(path)
    one_line(error.value, f"checkpoint {str(path)!r} does not match its checksum", "corrupt")


def test_a_flipped_bit_in_a_safetensors_export_is_one_line(tmp_path):
    path = save_safetensors(tiny_model(), tmp_path / "m.safetensors", list(CLASSES))
    read_checkpoint(path)
    flip_a_bit(path, path.stat().st_size - 3)  # the last tensor's bytes
    with pytest.raises(UserError) as error:
        read_checkpoint(path)
    one_line(error.value, "does not match the checksum in its metadata")


# --------------------------------------------------------------------------------------------------
# 9. Data-loader workers
# --------------------------------------------------------------------------------------------------


def test_no_readable_image_with_workers_is_one_line(tmp_path):
    for name in CLASSES:
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "x.png").write_bytes(b"not an image")
    cfg = load_config(None, ["DATASET.ROOT", str(tmp_path), "WORKERS", "1", "TRAIN.BATCH_SIZE_PER_GPU", "2",
                             "MODEL.NUM_CLASSES", "3"])
    loader, _ = build_loader(cfg, "train")
    with pytest.raises(UserError) as error:
        next(iter(loader))
    one_line(error.value, "none of its 3 images can be read")


class _DiesInWorker(ImageFolderDataset):
    def __getitem__(self, index: int):
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does


def test_a_worker_killed_by_the_system_is_one_line(tmp_path):
    make_image_folder(tmp_path)
    dataset = _DiesInWorker(tmp_path, "val", lambda image: image)
    loader = FolderLoader(dataset, seed=[0], sampler=ShardSampler(len(dataset), 0, 1), num_workers=1)
    with pytest.raises(UserError) as error:
        next(iter(loader))
    one_line(error.value, "data-loader worker process", "the last saved checkpoint is intact")


def test_a_worker_death_reported_anywhere_in_training_is_one_line(monkeypatch, capsys):
    def dies(args: object) -> int:
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setitem(__import__("cvt.cli").cli._COMMANDS, "train", dies)
    assert main(["train"]) == 2
    one_line(capsys.readouterr().err, "data-loader worker process 4242 is killed by signal: Killed")


# --------------------------------------------------------------------------------------------------
# 10. Smaller faults
# --------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_and_jfif_files_are_images(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    pixels[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display", as a phone held upright writes
    (tmp_path / "train" / "a").mkdir(parents=True)
    path = tmp_path / "train" / "a" / "photo.jfif"
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif, quality=95)
    upright = np.asarray(load_rgb(path))
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() > 200 and upright[25:].mean() < 50  # the white half is now on top
    assert [p for p, _ in ImageFolderDataset(tmp_path, "train", lambda image: image).samples] == [str(path)]


def test_sighup_asks_for_a_stop_like_sigterm():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        assert stop.requested() and stop.signum == signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_a_stop_signal_landing_mid_log_write_does_not_write_to_the_log_again(caplog):
    """Python runs a signal handler between any two bytecodes, so also inside a log handler's write;
    a handler that logged there wrote to the same stream reentrantly ("reentrant call", a traceback).
    The line still comes at once, not at the next check (a validation pass may take minutes, and a
    user who sees nothing presses Ctrl-C again, which aborts without saving)."""
    class SignalsMidWrite(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.depth = self.deepest = 0

        def emit(self, record: logging.LogRecord) -> None:
            self.depth += 1
            try:
                if "step 1" in record.getMessage():
                    os.kill(os.getpid(), signal.SIGINT)
                    sum(range(1000))  # bytecodes for the handler to run between
                self.deepest = max(self.deepest, self.depth)
            finally:
                self.depth -= 1

    writer = SignalsMidWrite()
    logger = logging.getLogger("cvt")
    logger.addHandler(writer)
    try:
        with caplog.at_level(logging.INFO, logger="cvt"), StopSignals() as stop:
            logger.info("step 1")
            assert stop.signum == signal.SIGINT and writer.deepest == 1
            deadline = time.monotonic() + 30
            while not any("SIGINT received" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the stop was never announced"
                time.sleep(0.01)
    finally:
        logger.removeHandler(writer)
    assert [r.getMessage() for r in caplog.records].count(
        "SIGINT received: stopping after the current step (send it again to abort now)") == 1


def test_a_checkpoint_pth_that_is_a_folder_stops_before_training(data, tmp_path):
    (run_dir(tmp_path) / "checkpoint.pth").mkdir(parents=True)
    with pytest.raises(UserError) as error:
        train(config(data, tmp_path))
    one_line(error.value, "checkpoint.pth is not a file (a folder?)")
    assert not (run_dir(tmp_path) / "metrics.jsonl").exists()


@pytest.mark.parametrize("named", [True, False], ids=["TRAIN.CHECKPOINT", "auto-resume"])
def test_an_unusable_resume_checkpoint_names_the_fix_that_applies(data, tmp_path, named):
    garbage = tmp_path / "elsewhere.pth" if named else run_dir(tmp_path / "out") / "checkpoint.pth"
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(os.urandom(4096))
    extra = ("TRAIN.CHECKPOINT", garbage) if named else ()
    with pytest.raises(UserError) as error:
        train(config(data, tmp_path / "out", *extra))
    # TRAIN.CHECKPOINT is resumed whatever TRAIN.AUTO_RESUME says: turning that off would not help.
    fix, wrong = ("TRAIN.CHECKPOINT ''", "TRAIN.AUTO_RESUME False") if named else ("TRAIN.AUTO_RESUME False", "TRAIN.CHECKPOINT ''")
    one_line(error.value, "cannot resume", "is not a PyTorch checkpoint", fix)
    assert wrong not in str(error.value)


def test_a_checkpoints_repr_is_short_not_every_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(tiny_model(), path, class_names=list(CLASSES))
    shown = repr(read_checkpoint(path))
    assert shown.startswith(f"Checkpoint(source={str(path)!r}, format='cvt-safetensors'") and "circle" in shown
    assert "tensor(" not in shown and len(shown) < 1000


def test_a_checkpoint_of_another_variant_names_both_architectures():
    with pytest.raises(UserError) as error:
        load_checkpoint(create_model("cvt-21"), create_model("cvt-13").state_dict())
    one_line(error.value, "does not fit the model: ", "; the file's stages have widths [64, 192, 384] and depths [1, 2, 10] "
             "(cvt-13), the model's widths [64, 192, 384] and depths [1, 4, 16] (cvt-21): use the experiment (MODEL.SPEC)")
    other = {**create_model({**TINY, "DEPTH": [1, 1, 1]}, num_classes=3).state_dict(), "stage_x": torch.zeros(1)}
    with pytest.raises(UserError) as error:  # no named variant: the shapes alone (a foreign key is no stage)
        load_checkpoint(tiny_model(), other)
    one_line(error.value, "the file's stages have widths [16, 32, 48] and depths [1, 1, 1], the model's widths "
             "[16, 32, 48] and depths [1, 2, 3]: use")


def test_a_pretrained_layer_name_that_names_nothing_is_one_line(data, tmp_path):
    weights = tmp_path / "pretrained.pth"
    save_official(build_model(config(data, tmp_path)), weights)
    cfg = config(data, tmp_path, "MODEL.PRETRAINED", weights, "MODEL.PRETRAINED_LAYERS", ["stage0", "stag1"])
    with pytest.raises(UserError) as error:  # loaded nothing of stage1 and said "loaded (layers: stage0, stag1)"
        load_pretrained(cfg, build_model(cfg))
    one_line(error.value, "MODEL.PRETRAINED_LAYERS: 'stag1' names no part of the model; the parts are stage0, "
             "stage1, stage2, norm, head, or '*' for all")

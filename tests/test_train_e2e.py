"""train(cfg) and test(cfg) end to end on a generated 3-class image folder with a tiny CvT: the run
folder's files, resume (plain, after a crash, after a signal, and bit-exact under DETERMINISTIC),
fine-tuning, and the class checks."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from cvt.cli import main as cli_main
from cvt.config import load_config
from cvt.data import build_transform, load_rgb
from cvt.training.run import TrainingInterrupted, train
from cvt.training.run import test as run_test  # not named test_*: pytest would collect it
from cvt.errors import UserError
from cvt.weights.read import read_checkpoint
from cvt.models import create_model

from helpers import CLASSES, TINY_SPEC, VAL_PER_CLASS, config, epochs_in, make_image_folder

import cvt.training.run as engine_train
import cvt.training.state as training_state

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> dict:
    """One 2-epoch run with EMA, shared by the tests that only read its folder."""
    out = tmp_path_factory.mktemp("run")
    return train(config(data, out, "TRAIN.EMA.ENABLED", True, "TRAIN.EMA.DECAY", 0.9))


# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_writes_every_output(run):
    folder = Path(run["output_dir"])
    assert folder.name == "tiny" and folder.parent.name == "shapes"
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pth", "model_best.pth", "final_state.pth"):
        assert (folder / name).is_file(), name
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(folder / "config.yaml").TRAIN.EMA.ENABLED  # the saved config reloads

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        for key in ("lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_sec", "epoch_time_s",
                    "val_top1_ema"):
            assert isinstance(r[key], float), key
    assert records[0]["lr"] == pytest.approx(1e-4)  # warmup start
    assert run["metrics"] == records[-1]
    assert run["best_top1"] == max(r["val_top1"] for r in records)

    ckpt = torch.load(folder / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "best_top1", "class_names",
                         "spec", "act", "config", "rng"}
    assert ckpt["epoch"] == 2 and ckpt["class_names"] == list(CLASSES) and ckpt["act"] == "quick_gelu"
    assert ckpt["ema"] is not None and ckpt["ema"].keys() == ckpt["model"].keys()
    assert not all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])

    model = create_model(dict(ckpt["spec"]), num_classes=3)
    for name in ("model_best.pth", "final_state.pth"):
        state = torch.load(folder / name, weights_only=True)
        assert list(state) == list(model.state_dict())  # the official layout, nothing else
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in torch.load(folder / "final_state.pth").items())
    log = (folder / "log.txt").read_text()
    assert "epoch 1:" in log and "try it: cvt predict --weights" in log


@pytest.mark.slow
def test_the_printed_predict_command_runs_the_best_weights_and_prints_class_names(run, capsys):
    folder = Path(run["output_dir"])
    command = next(line for line in (folder / "log.txt").read_text().splitlines() if "try it: " in line)
    argv = command.split("try it: cvt ")[1].split()
    assert argv[:3] == ["predict", "--weights", str(folder / "model_best.safetensors")]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    # The release-layout file holds the same weights, but no class names: indices in the same order.
    assert cli_main(["predict", "--cfg", str(folder / "config.yaml"), "--weights", str(folder / "model_best.pth"), argv[-1]]) == 0
    by_index = capsys.readouterr().out
    for index, name in enumerate(CLASSES):
        by_index = by_index.replace(f" {index} ", f" {name} ")
    assert printed == by_index and printed.split(": ")[1].split()[0] in CLASSES


@pytest.mark.slow
def test_test_reports_the_same_numbers_as_training(run, data):
    folder = Path(run["output_dir"])
    for weights in ("final_state.pth", "checkpoint.pth"):
        result = run_test(config(data, folder.parent.parent, "TEST.MODEL_FILE", folder / weights))
        written = json.loads((folder / "test_metrics.json").read_text())
        assert written["model_file"] == str(folder / weights)
        for key in ("top1", "top5", "loss"):
            assert result[key] == written[key] == run["metrics"][f"val_{key}"]
        assert written["images"] == sum(VAL_PER_CLASS)
    # No TEST.MODEL_FILE: the run folder's model_best.pth, as the release's test tool; log and file name it.
    run_test(config(data, folder.parent.parent))
    written = json.loads((folder / "test_metrics.json").read_text())
    assert written["model_file"] == str(folder / "model_best.pth")
    best = max((json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()),
               key=lambda r: r["val_top1"])  # the first epoch reaching the best top-1 wrote model_best.pth
    assert written["top1"] == best["val_top1"] and written["loss"] == best["val_loss"]
    assert f"testing {folder / 'model_best.pth'}" in (folder / "log.txt").read_text()


@pytest.mark.slow
def test_the_ema_weights_are_what_test_and_predict_use_with_use_ema(run, data, tmp_path, capsys):
    folder = Path(run["output_dir"])
    checkpoint = folder / "checkpoint.pth"
    # Extracted by `cvt export --use-ema`, they test as training evaluated them.
    ema_file = tmp_path / "ema.safetensors"
    assert cli_main(["export", "--use-ema", "--weights", str(checkpoint), "--format", "safetensors", str(ema_file)]) == 0
    result = run_test(config(data, folder.parent.parent, "TEST.MODEL_FILE", ema_file))
    # So does TEST.USE_EMA on the checkpoint, named or (MODEL_FILE unset) the run folder's.
    named = run_test(config(data, folder.parent.parent, "TEST.MODEL_FILE", checkpoint, "TEST.USE_EMA", True))
    unset = run_test(config(data, folder.parent.parent, "TEST.USE_EMA", True))
    assert unset["model_file"] == str(checkpoint) and named["use_ema"] and unset["use_ema"] and not result["use_ema"]
    for key in ("top1", "top5", "loss"):
        assert result[key] == named[key] == unset[key] == run["metrics"][f"val_{key}_ema"]
    # `cvt predict --use-ema` gives the EMA model's softmax, not the model's.
    saved = torch.load(checkpoint, weights_only=True)
    ema_model = create_model(dict(saved["spec"]), num_classes=len(CLASSES), act=saved["act"]).eval()
    ema_model.load_state_dict(saved["ema"])
    files = sorted((data / "val").rglob("*.png"))
    transform = build_transform(load_config(folder / "config.yaml"), is_train=False)
    with torch.inference_mode():
        expected = ema_model(torch.stack([transform(load_rgb(f)) for f in files])).softmax(-1)
    capsys.readouterr()
    for use_ema in (["--use-ema"], []):
        assert cli_main(["predict", *use_ema, "--weights", str(checkpoint), "--json", "--topk", "3", str(data / "val")]) == 0
        got = json.loads(capsys.readouterr().out)
        assert [r["image"] for r in got] == [str(f) for f in files]
        probs = torch.tensor([[p["prob"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in got])
        assert torch.allclose(probs, expected, atol=2e-6) == bool(use_ema)
    # Files without EMA weights say so in one line.
    for weights in (folder / "model_best.pth", ema_file):
        assert cli_main(["predict", "--use-ema", "--weights", str(weights), str(data / "val")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds no EMA weights" in err and "checkpoint.pth" in err


@pytest.mark.slow
def test_auto_resume_after_a_crash_runs_each_epoch_once(run, data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(Path(run["output_dir"]), out / "shapes" / "tiny")
    folder = out / "shapes" / "tiny"
    # A crash after epoch 2's record was written but before its checkpoint: a record and a torn line.
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "val_top1": 0.0}) + '\n{"epoch": 3, "lr')
    result = train(config(data, out, "TRAIN.END_EPOCH", 3))
    assert epochs_in(folder) == [0, 1, 2]
    assert torch.load(folder / "checkpoint.pth", weights_only=True)["epoch"] == 3
    assert "resumed from" in (folder / "log.txt").read_text()
    assert result["metrics"]["epoch"] == 2


def _stop_in_epoch(monkeypatch, epoch: int, *, real_signal: bool) -> None:
    """Make training stop during `epoch`: by a real SIGINT to this process, or by a stop request."""
    real = training_state.train_one_epoch

    def wrapped(*args, **kwargs):
        if kwargs["epoch"] == epoch:
            if real_signal:
                os.kill(os.getpid(), signal.SIGINT)  # handled by train(): finish the step, then stop
            else:
                kwargs["stop_requested"] = lambda: True
        return real(*args, **kwargs)

    monkeypatch.setattr(training_state, "train_one_epoch", wrapped)


def test_detect_anomaly_turns_on_autograd_anomaly_mode_for_training_only(data, tmp_path, monkeypatch):
    real, seen = training_state.train_one_epoch, []

    def recording(*args, **kwargs):
        seen.append(torch.is_anomaly_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(training_state, "train_one_epoch", recording)
    train(config(data, tmp_path / "on", "TRAIN.END_EPOCH", 1, "TRAIN.DETECT_ANOMALY", True))
    train(config(data, tmp_path / "off", "TRAIN.END_EPOCH", 1))
    assert seen == [True, False] and not torch.is_anomaly_enabled()


@pytest.mark.slow
def test_deterministic_resume_equals_an_uninterrupted_run(data, tmp_path, monkeypatch):
    # Mixup (NumPy's generator), drop path (torch's) and random crops (torch's, in-process) all draw
    # random numbers, so only a full restore of every generator makes the runs equal.
    extra = ("DETERMINISTIC", True, "TRAIN.END_EPOCH", 3, "AUG.MIXUP_PROB", 1.0, "AUG.MIXUP", 0.8,
             "MODEL.SPEC.DROP_PATH_RATE", [0.0, 0.0, 0.2], "TRAIN.EMA.ENABLED", True, "TENSORBOARD", False)
    straight = train(config(data, tmp_path / "a", *extra))

    with monkeypatch.context() as patch:
        _stop_in_epoch(patch, 1, real_signal=False)
        with pytest.raises(TrainingInterrupted):
            train(config(data, tmp_path / "b", *extra))
    folder = tmp_path / "b" / "shapes" / "tiny"
    # Under DETERMINISTIC the partial epoch is dropped: the checkpoint is still epoch 1's start.
    assert torch.load(folder / "checkpoint.pth", weights_only=True)["epoch"] == 1
    resumed = train(config(data, tmp_path / "b", *extra))

    a = torch.load(straight["final_state"], weights_only=True)
    b = torch.load(resumed["final_state"], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(straight["checkpoint"], weights_only=True)["ema"]
    ema_b = torch.load(resumed["checkpoint"], weights_only=True)["ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert epochs_in(folder) == [0, 1, 2]
    assert resumed["metrics"] == {**straight["metrics"], "images_per_sec": resumed["metrics"]["images_per_sec"],
                                  "epoch_time_s": resumed["metrics"]["epoch_time_s"]}


@pytest.mark.slow
def test_resumed_plateau_schedule_decays_at_the_epochs_of_an_uninterrupted_run(data, tmp_path):
    # A rate too small to learn much with: top-1 stalls, so the plateau schedule halves the rate after
    # two epochs without improvement. The resumes (after epochs 1 and 3) need its counters and the
    # rate it had decayed to.
    extra = ("TRAIN.LR", 1e-6, "TRAIN.LR_SCHEDULER.ARGS.sched", "plateau", "TRAIN.LR_SCHEDULER.ARGS.patience_epochs", 1,
             "TRAIN.LR_SCHEDULER.ARGS.decay_rate", 0.5, "TRAIN.LR_SCHEDULER.ARGS.min_lr", 0.0, "TENSORBOARD", False)
    straight = train(config(data, tmp_path / "a", *extra, "TRAIN.END_EPOCH", 6))
    for end in (2, 4, 6):
        resumed = train(config(data, tmp_path / "b", *extra, "TRAIN.END_EPOCH", end))

    def lrs(result: dict) -> list[float]:
        return [json.loads(line)["lr"] for line in (Path(result["output_dir"]) / "metrics.jsonl").read_text().splitlines()]

    assert lrs(resumed) == lrs(straight)
    assert lrs(straight)[4] == pytest.approx(1e-6 / 2)  # decayed before the second resume (epoch 0: warmup)

    # A resume with another TRAIN.LR keeps the decay reached: the rate scales with the base.
    reached = torch.load(resumed["checkpoint"], weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    rescaled = train(config(data, tmp_path / "b", *extra, "TRAIN.END_EPOCH", 7, "TRAIN.LR", 2e-6))
    assert lrs(rescaled)[6] == pytest.approx(2 * reached) and reached < 1e-6


@pytest.mark.slow
def test_a_resume_that_switches_to_the_plateau_schedule_starts_it_afresh(data, tmp_path):
    train(config(data, tmp_path, "TRAIN.END_EPOCH", 2, "TENSORBOARD", False))  # cosine, the default
    resumed = train(config(data, tmp_path, "TRAIN.END_EPOCH", 3, "TRAIN.LR_SCHEDULER.ARGS.sched", "plateau",
                           "TENSORBOARD", False))  # it used to fail: the cosine state has no best metric
    assert epochs_in(Path(resumed["output_dir"])) == [0, 1, 2]
    assert resumed["metrics"]["lr"] == pytest.approx(2e-3)  # the configured rate, not cosine's decayed one


@pytest.mark.slow
def test_sigint_saves_mid_epoch_progress_and_resume_redoes_the_epoch(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _stop_in_epoch(patch, 1, real_signal=True)
        with pytest.raises(TrainingInterrupted) as info:
            train(config(data, out, "TENSORBOARD", False))
    assert info.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    folder = out / "shapes" / "tiny"
    saved = torch.load(folder / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 1  # epoch 1 is not completed...
    after_epoch0 = read_checkpoint(folder / "model_best.pth").state_dict
    assert not all(torch.equal(saved["model"][k], after_epoch0[k]) for k in after_epoch0)  # ...but its progress is kept
    assert epochs_in(folder) == [0]
    train(config(data, out, "TENSORBOARD", False))
    assert epochs_in(folder) == [0, 1]


@pytest.mark.slow
def test_resuming_another_runs_checkpoint_keeps_this_folders_results(run, data, tmp_path):
    folder = tmp_path / "shapes" / "tiny"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(UserError, match="holds an earlier run's results .*TRAIN.CHECKPOINT resumes another run's checkpoint"):
        train(config(data, tmp_path, "TRAIN.CHECKPOINT", run["checkpoint"]))
    assert (folder / "metrics.jsonl").read_text() == '{"epoch": 0}\n'

    train(config(data, tmp_path, "TRAIN.CHECKPOINT", run["checkpoint"], "TRAIN.EARLIER_RESULTS", "move", "TRAIN.END_EPOCH", 3))
    assert [p.name for p in folder.glob("earlier-*/metrics.jsonl")] == ["metrics.jsonl"]
    # This folder's own checkpoint, however spelt, is a continuation: nothing is moved.
    train(config(data, tmp_path, "TRAIN.CHECKPOINT", folder / ".." / "tiny" / "checkpoint.pth", "TRAIN.END_EPOCH", 3))
    assert len(list(folder.glob("earlier-*"))) == 1


@pytest.mark.slow
def test_class_count_mismatches_are_user_errors(run, data, tmp_path):
    with pytest.raises(UserError, match=r"MODEL.NUM_CLASSES is 5 but .* has 3 class folders; set MODEL.NUM_CLASSES 3"):
        train(config(data, tmp_path, "MODEL.NUM_CLASSES", 5))
    with pytest.raises(UserError, match=r"3-class head but MODEL.NUM_CLASSES is 4"):
        run_test(config(data, tmp_path, "MODEL.NUM_CLASSES", 4, "TEST.MODEL_FILE", run["final_state"]))
    with pytest.raises(UserError, match="TEST.MODEL_FILE"):
        run_test(config(data, tmp_path / "empty"))


@pytest.mark.slow
def test_test_refuses_class_folders_the_checkpoint_does_not_know(run, data, tmp_path):
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / "val" / "square").rename(tmp_path / "data" / "val" / "squares")
    with pytest.raises(UserError, match="class folders differ from the checkpoint"):
        run_test(config(tmp_path / "data", tmp_path, "TEST.MODEL_FILE", run["checkpoint"]))


@pytest.mark.slow
def test_fine_tuning_drops_a_head_of_another_size(run, data, tmp_path):
    two = tmp_path / "two"
    for split in ("train", "val"):
        for name in CLASSES[:2]:
            shutil.copytree(data / split / name, two / split / name)
    result = train(config(two, tmp_path, "MODEL.NUM_CLASSES", 2, "MODEL.PRETRAINED", run["final_state"],
                          "TRAIN.END_EPOCH", 1, "TENSORBOARD", False))
    # One line for the event (it used to take three, each naming the file).
    log_lines = (Path(result["output_dir"]) / "log.txt").read_text().splitlines()
    about_it = [line for line in log_lines if run["final_state"] in line and "head" in line]
    assert len(about_it) == 1 and "head (2 classes) is freshly initialised (its own head has 3)" in about_it[0]

    # Only the named top-level layers are taken from the file.
    cfg = config(data, tmp_path, "MODEL.PRETRAINED", run["final_state"], "MODEL.PRETRAINED_LAYERS", ["stage0"])
    model = engine_train.build_model(cfg)
    engine_train.load_pretrained(cfg, model)
    pretrained = torch.load(run["final_state"], weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], pretrained[k]) for k in state if k.startswith("stage0."))
    assert not torch.equal(state["head.weight"], pretrained["head.weight"])


@pytest.mark.slow
def test_config_yaml_records_the_activation_auto_resolved_to_so_test_runs_the_trained_one(data, tmp_path):
    g1 = train(config(data, tmp_path, "NAME", "g1", "MODEL.ACTIVATION", "gelu", "TRAIN.END_EPOCH", 1, "TENSORBOARD", False))
    # Fine-tuned from a file that records GELU, under MODEL.ACTIVATION auto: model_best.pth does not say.
    g2 = train(config(data, tmp_path, "NAME", "g2", "MODEL.PRETRAINED", g1["checkpoint"], "TRAIN.END_EPOCH", 1,
                      "TENSORBOARD", False))
    saved = load_config(Path(g2["output_dir"]) / "config.yaml")
    tested = run_test(saved)
    assert tested["model_file"] == g2["model_best"] and tested["loss"] == g2["metrics"]["val_loss"]
    assert saved.MODEL.ACTIVATION == "gelu"


@pytest.mark.slow
def test_init_weights_false_leaves_pretrained_unloaded_as_the_release(run, data, tmp_path):
    pretrained = torch.load(run["final_state"], weights_only=True)
    for init_weights in (True, False):
        cfg = config(data, tmp_path, "MODEL.PRETRAINED", run["final_state"], "MODEL.INIT_WEIGHTS", init_weights)
        state = engine_train._initial_model(cfg, with_pretrained=True).state_dict()
        assert torch.equal(state["head.weight"], pretrained["head.weight"]) == init_weights


@pytest.mark.slow
def test_test_scores_a_class_subset_and_imagenet_real_labels(run, data, tmp_path):
    """TEST.VALID_LABELS on a folder of two of the three classes, and TEST.REAL_LABELS on validation
    images named as ImageNet's, with real.json in DATASET.ROOT beside the split folders."""
    subset = tmp_path / "subset"
    for name in (CLASSES[0], CLASSES[2]):
        shutil.copytree(data / "val" / name, subset / "val" / name)
    (tmp_path / "valid.txt").write_text("2\n0\n")
    for weights in (run["final_state"], run["checkpoint"]):  # the checkpoint also checks the subset's names
        result = run_test(config(subset, tmp_path, "TEST.MODEL_FILE", weights, "TEST.VALID_LABELS", tmp_path / "valid.txt"))
        assert result["images"] == VAL_PER_CLASS[0] + VAL_PER_CLASS[2] and 0 <= result["top1"] <= 100
    with pytest.raises(UserError, match="TEST.VALID_LABELS names 1 classes but .* has 2 class folders"):
        (tmp_path / "one.txt").write_text("1\n")
        run_test(config(subset, tmp_path, "TEST.MODEL_FILE", run["final_state"], "TEST.VALID_LABELS", tmp_path / "one.txt"))

    real_root, labels, number = tmp_path / "real", [], 0
    for target, name in enumerate(CLASSES):
        for image in sorted((data / "val" / name).iterdir()):
            number += 1
            (real_root / "val" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, real_root / "val" / name / f"ILSVRC2012_val_{number:08d}.png")
            labels.append([target] if number != 2 else [])  # image 2 has no ReaL label: left out
    (real_root / "real.json").write_text(json.dumps(labels))
    result = run_test(config(real_root, tmp_path, "TEST.MODEL_FILE", run["final_state"], "TEST.REAL_LABELS", True))
    written = json.loads((Path(result["output_dir"]) / "test_metrics.json").read_text())
    assert written["real_images"] == number - 1 and {"real_top1", "real_top5", "top1"} <= set(written)
    plain = run_test(config(data, tmp_path, "TEST.MODEL_FILE", run["final_state"]))
    assert written["top1"] == plain["top1"]  # the same images; ReaL leaves the ordinary scores alone
    assert written["real_top5"] == 100.0  # each image's one ReaL label is its class: 3 classes, top-5


@pytest.mark.slow
def test_compiled_training_runs_again_at_another_image_size_in_the_same_process(data, tmp_path):
    # The second run's graphs meet the first's code objects: with dynamic shapes the image size
    # would turn symbolic, which inductor could not compile for training.
    for size in (32, 48):
        result = train(config(data, tmp_path / str(size), "TRAIN.END_EPOCH", 1, "TRAIN.COMPILE", True,
                              "TRAIN.IMAGE_SIZE", [size, size], "TEST.IMAGE_SIZE", [size, size], "TENSORBOARD", False))
        assert math.isfinite(result["metrics"]["train_loss"])


@pytest.mark.parametrize("amp", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_training_with_gradient_checkpointing_saves_plain_official_keys(data, tmp_path, amp):
    """TRAIN.COMPILE and TRAIN.GRAD_CHECKPOINTING together, in fp32 and under bf16 autocast (the CPU's
    AMP, whose compiled step runs the bf16 custom ops of `cvt.models.kernels`): the run trains,
    evaluates and saves the model's own keys (no `_orig_mod.` prefix of the compiled wrapper)."""
    result = train(config(data, tmp_path, "TRAIN.END_EPOCH", 1, "TRAIN.COMPILE", True,
                          "TRAIN.GRAD_CHECKPOINTING", True, "AMP.ENABLED", amp, "TENSORBOARD", False))
    assert math.isfinite(result["metrics"]["train_loss"]) and "val_top1" in result["metrics"]
    state = torch.load(result["final_state"], weights_only=True)
    trained_spec = dict(TINY_SPEC, DEPTH=[1, 1, 1])  # as run_opts sets it
    assert set(state) == set(create_model(trained_spec, num_classes=len(CLASSES)).state_dict())


def test_compile_mode_reaches_torch_compile_for_both_models(monkeypatch, data, tmp_path):
    """TRAIN.COMPILE_MODE (CUDA graphs with 'reduce-overhead') is torch.compile's mode for the model
    trained and the model evaluated, with static shapes."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    cfg = config(data, tmp_path, "TRAIN.COMPILE", True, "TRAIN.COMPILE_MODE", "reduce-overhead")
    model = torch.nn.Linear(2, 2)
    assert engine_train._wrap(model, cfg, engine_train.DistEnv(0, 1, torch.device("cpu"))) == (model, model)
    assert calls == [{"dynamic": False, "mode": "reduce-overhead"}] * 2

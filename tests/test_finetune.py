"""Fine-tuning as the paper transfers CvT: the FINETUNE keys, the step-based run, frozen layers, linear
probing, layer-wise rate decay, and the transfer datasets in their published formats."""
import json
import os
import pickle
import re
import contextlib
import signal

import numpy as np
import pytest
import torch

import cvt.data.loader as loader_module
import cvt.training.finetune as finetune_module
import cvt.training.state as training_state
import cvt.training.run as run_module
import cvt.training.session as session_module
from cvt import UserError
from cvt.config import config_value, finetune_decay_steps, finetune_warmup_steps, list_experiments, load_config
from cvt.data import build_loader
from cvt.training.optim import build_optimizer, build_step_scheduler, layer_depths
from cvt.training.run import TrainingInterrupted, build_model, train
from cvt.weights.export import save_official
from cvt.weights.read import read_checkpoint

from helpers import (
    CLASSES,
    TINY_SPEC,
    config,
    make_cifar,
    make_flowers,
    make_image_folder,
    make_pets,
)

# 24 training images in batches of 8: 3 steps a pass, so 6 steps span two passes and the evaluation
# every 2 steps falls mid-pass.
FINETUNE = ("FINETUNE.FINETUNE", True, "FINETUNE.STEPS", 6, "FINETUNE.EVAL_EVERY", 2, "FINETUNE.WARMUP_STEPS", 1,
            "FINETUNE.BATCH_SIZE", 8, "FINETUNE.LR_SCHEDULER.DECAY_STEPS", [3], "FINETUNE.BASE_LR", 0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    """A 'pretrained' file: the tiny model with trained-looking BatchNorm statistics."""
    cfg = config(data, tmp_path_factory.mktemp("unused"))
    model = build_model(cfg)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("pretrained") / "pretrained.pth"
    save_official(model, path)
    return path


def finetune(data, out, *extra):
    return train(config(data, out, *FINETUNE, *extra))


def weights(path):
    return read_checkpoint(path).state_dict


# --------------------------------------------------------------------------------------------------
# Keys and schedules
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    (("FINETUNE.WARMUP_STEPS", 10, "FINETUNE.STEPS", 10), "FINETUNE.WARMUP_STEPS=10 is invalid"),
    (("FINETUNE.STEPS", 1000, "FINETUNE.LR_SCHEDULER.DECAY_STEPS", [3000]),
     "FINETUNE.LR_SCHEDULER.DECAY_STEPS=[3000] is invalid: it must be increasing step numbers between 0 and "
     "FINETUNE.STEPS (1000), e.g. [300, 600, 900], or []"),
    (("FINETUNE.LR_SCHEDULER.DECAY_TYPE", "exp"), "FINETUNE.LR_SCHEDULER.DECAY_TYPE='exp' is invalid"),
    (("FINETUNE.LAYER_DECAY", 1.5), "FINETUNE.LAYER_DECAY=1.5 is invalid"),
    (("FINETUNE.OPTIMIZER", "lamb"), "FINETUNE.OPTIMIZER='lamb' is invalid"),
    (("FINETUNE.EVAL_EVERY", 0), "FINETUNE.EVAL_EVERY=0 is invalid"),
])
def test_finetune_keys_refuse_values_no_run_can_use(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [str(v) for v in override])


@pytest.mark.parametrize("key, value", [
    ("FINETUNE.FROZEN_LAYERS", ["stage0"]), ("FINETUNE.LINEAR_PROBE", True), ("FINETUNE.LAYER_DECAY", 0.75),
])
def test_keys_only_the_step_run_reads_are_refused_in_an_epoch_run(key, value):
    # An epoch run would train every layer at one rate: silently not what was asked.
    with pytest.raises(UserError, match=re.escape(f"{key}={value!r} is invalid: it must be") + ".* unless FINETUNE.FINETUNE is true"):
        load_config(None, [key, str(value)])
    assert config_value(load_config(None, [key, str(value), "FINETUNE.FINETUNE", "true"]), key) == value


def test_unset_decay_steps_follow_the_steps_at_bits_proportions():
    cfg = load_config(None, ["FINETUNE.FINETUNE", "True", "FINETUNE.STEPS", "1000"])
    assert list(cfg.FINETUNE.LR_SCHEDULER.DECAY_STEPS) == [] and finetune_decay_steps(cfg) == [300, 600, 900]
    assert finetune_decay_steps(load_config(None, [])) == [3000, 6000, 9000]  # BiT's 10,000-step boundaries
    rates = _rates("step", steps=1000, warmup=10, decay_steps=())
    assert rates[299] == pytest.approx(0.1) and rates[300] == pytest.approx(0.01) and rates[900] == pytest.approx(1e-4)


def test_unset_warmup_is_five_percent_of_the_steps():
    cfg = load_config(None, ["FINETUNE.FINETUNE", "True", "FINETUNE.STEPS", "300"])  # was refused: warmup 500
    assert finetune_warmup_steps(cfg) == 15
    assert finetune_warmup_steps(load_config(None, [])) == 500  # ViT's 500 of 10,000
    assert finetune_warmup_steps(load_config(None, ["FINETUNE.WARMUP_STEPS", "0"])) == 0


def test_cosine_with_fewer_steps_needs_no_decay_steps():
    load_config(None, ["FINETUNE.STEPS", "1000", "FINETUNE.LR_SCHEDULER.DECAY_TYPE", "cosine"])


def _rates(kind, steps=10, warmup=2, decay_steps=(4, 7)):
    cfg = load_config(None, ["FINETUNE.FINETUNE", "True", "FINETUNE.STEPS", str(steps), "FINETUNE.WARMUP_STEPS", str(warmup),
                             "FINETUNE.LR_SCHEDULER.DECAY_TYPE", kind, "FINETUNE.LR_SCHEDULER.DECAY_STEPS", str(list(decay_steps))])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_step_scheduler(cfg, optimizer)
    rates = []
    for n in range(1, steps + 1):
        scheduler.step_update(n)
        rates.append(optimizer.param_groups[0]["lr"])
    return np.array(rates)


def test_step_schedules_warm_up_then_decay_by_update_number():
    # Updates count from 1: a linear warmup reaches the rate at update WARMUP_STEPS.
    step = _rates("step")
    np.testing.assert_allclose(step, [0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001], rtol=1e-9)
    # ViT's: progress (n - warmup) / (steps - warmup), down to 0 at the last update.
    progress = (np.arange(3, 11) - 2) / 8
    np.testing.assert_allclose(_rates("cosine")[2:], 0.1 * 0.5 * (1 + np.cos(np.pi * progress)), atol=1e-12)
    np.testing.assert_allclose(_rates("linear")[2:], 0.1 * (1 - progress), atol=1e-12)
    np.testing.assert_allclose(_rates("linear")[:2], [0.05, 0.1])


def test_layer_decay_gives_each_layer_rate_times_decay_to_its_distance_from_the_head():
    cfg = load_config(None, ["FINETUNE.FINETUNE", "True", "FINETUNE.LAYER_DECAY", "0.5", "MODEL.SPEC.DEPTH", "[1, 2, 3]",
                             "MODEL.SPEC.DIM_EMBED", str(TINY_SPEC["DIM_EMBED"]), "MODEL.SPEC.NUM_HEADS", str(TINY_SPEC["NUM_HEADS"])])
    model = build_model(cfg)
    depths = layer_depths(model)
    # Input to output: stage0 embedding, its block, stage1 embedding, 2 blocks, stage2 embedding, 3 blocks, head.
    expected = {"stage0.patch_embed.proj.weight": 9, "stage0.blocks.0.mlp.fc1.weight": 8, "stage1.patch_embed.norm.bias": 7,
                "stage1.blocks.1.attn.proj_q.weight": 5, "stage2.cls_token": 4, "stage2.blocks.0.attn.conv_proj_k.bn.weight": 3,
                "stage2.blocks.2.norm2.weight": 1, "norm.weight": 0, "head.bias": 0}
    assert {k: depths[k] for k in expected} == expected
    optimizer = build_optimizer(cfg, model, 0.1, torch.device("cpu"))
    rate_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert rate_of[id(param)] == pytest.approx(0.1 * 0.5 ** depths[name]), name
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)  # FINETUNE.WD 0, as ViT
    assert optimizer.defaults["momentum"] == 0.9 and not optimizer.defaults["nesterov"]


# --------------------------------------------------------------------------------------------------
# Datasets in their published formats
# --------------------------------------------------------------------------------------------------

DATASETS = {
    "cifar10": (lambda root: make_cifar(root, "cifar10"), "train", "test", list(CLASSES), 30, 6),
    "cifar100": (lambda root: make_cifar(root, "cifar100"), "train", "test", list(CLASSES), 6, 6),
    "pets": (make_pets, "trainval", "test", ["Abyssinian", "Beagle", "Bengal"], 6, 6),
    "flowers102": (make_flowers, "trainval", "test", ["1", "2", "3"], 9, 3),
}


@pytest.mark.parametrize("name", DATASETS)
def test_transfer_datasets_load_in_their_formats_with_the_batch_contract(name, tmp_path):
    make, train_split, test_split, classes, train_count, test_count = DATASETS[name]
    root = make(tmp_path)
    cfg = config(root, tmp_path / "out", "DATASET.DATASET", name, "DATASET.TRAIN_SET", train_split,
                 "DATASET.TEST_SET", test_split, "TRAIN.BATCH_SIZE_PER_GPU", 2)
    for split, count in (("train", train_count), ("test", test_count)):
        loader, dataset = build_loader(cfg, split)
        assert dataset.classes == classes and len(dataset) == count
        images, targets, bad = next(iter(loader))
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert targets.dtype == torch.int64 and bad == []
    # The labels are the files' own: the synthetic images of class k are shape k.
    assert sorted({t for _, t in dataset.samples}) == [0, 1, 2]


@pytest.mark.parametrize("name", DATASETS)
def test_a_class_map_for_a_published_format_is_refused_in_one_line(name, tmp_path):
    with pytest.raises(UserError, match=f"DATASET.CLASS_MAP='map.txt' is invalid: it must be empty for DATASET.DATASET '{name}'"):
        load_config(None, ["DATASET.DATASET", name, "DATASET.CLASS_MAP", "map.txt"])


def test_the_dataset_root_may_be_the_dataset_folder_itself(tmp_path):
    root = make_flowers(tmp_path) / "flowers-102"
    cfg = config(root, tmp_path / "out", "DATASET.DATASET", "flowers102", "DATASET.TRAIN_SET", "train", "DATASET.TEST_SET", "test",
                 "TRAIN.BATCH_SIZE_PER_GPU", 2)
    assert len(build_loader(cfg, "train")[1]) == 6


def _break(name, root):
    if name == "cifar10":
        (root / "cifar-10-batches-py" / "data_batch_3").unlink()
        return "data_batch_3: file not found; DATASET.DATASET cifar10 expects DATASET.ROOT/cifar-10-batches-py/"
    if name == "cifar100":
        (root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
        return "cifar-100-python/train: not a CIFAR batch file"
    if name == "pets":
        (root / "oxford-iiit-pet" / "annotations" / "trainval.txt").write_text("Abyssinian_1 1\n")
        return "trainval.txt: malformed"
    (root / "flowers-102" / "setid.mat").write_bytes(b"garbage")
    return "setid.mat: not a MATLAB file holding 'trnid'"


@pytest.mark.parametrize("name", DATASETS)
def test_missing_or_malformed_files_are_one_line_naming_file_and_layout(name, tmp_path):
    make, train_split, test_split, *_ = DATASETS[name]
    root = make(tmp_path)
    message = _break(name, root)
    cfg = config(root, tmp_path / "out", "DATASET.DATASET", name, "DATASET.TRAIN_SET", train_split, "DATASET.TEST_SET", test_split)
    with pytest.raises(UserError) as error:
        build_loader(cfg, "train")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert f"DATASET.DATASET {name} expects" in str(error.value) or "not a CIFAR batch" in str(error.value)


def test_a_split_the_dataset_lacks_is_one_line_listing_its_splits(tmp_path):
    cfg = config(make_pets(tmp_path), tmp_path / "out", "DATASET.DATASET", "pets")  # TRAIN_SET 'train'
    with pytest.raises(UserError, match="'train' is not a split of pets; use one of trainval, test"):
        build_loader(cfg, "train")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_cifar_batch_is_refused_and_its_payload_never_runs(tmp_path):
    root = make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": payload}
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    cfg = config(root, tmp_path / "out", "DATASET.DATASET", "cifar10", "DATASET.TRAIN_SET", "train", "DATASET.TEST_SET", "test")
    with pytest.raises(UserError, match=r"data_batch_1: not a CIFAR batch file \(refused to load posix.system"):
        build_loader(cfg, "train")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Step-based runs
# --------------------------------------------------------------------------------------------------


def test_frozen_layers_stay_bit_equal_batchnorm_statistics_included(data, pretrained, tmp_path):
    run = finetune(data, tmp_path, "MODEL.PRETRAINED", pretrained, "FINETUNE.FROZEN_LAYERS", ["stage0", "stage1.blocks"])
    before, after = weights(pretrained), weights(run["final_state"])
    frozen = [k for k in before if k.startswith(("stage0.", "stage1.blocks."))]
    assert any("running_mean" in k for k in frozen)
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    # The rest trained, BatchNorm statistics included (TRAIN_MODE true).
    assert not torch.equal(before["stage1.patch_embed.proj.weight"], after["stage1.patch_embed.proj.weight"])
    assert not torch.equal(before["stage2.blocks.0.attn.conv_proj_q.bn.running_mean"],
                           after["stage2.blocks.0.attn.conv_proj_q.bn.running_mean"])


def test_a_linear_probe_trains_the_head_alone(data, pretrained, tmp_path):
    run = finetune(data, tmp_path, "MODEL.PRETRAINED", pretrained, "FINETUNE.LINEAR_PROBE", True)
    before, after = weights(pretrained), weights(run["final_state"])
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["head.bias", "head.weight"]


def test_train_mode_false_keeps_every_batchnorm_statistic(data, pretrained, tmp_path):
    run = finetune(data, tmp_path, "MODEL.PRETRAINED", pretrained, "FINETUNE.TRAIN_MODE", False)
    before, after = weights(pretrained), weights(run["final_state"])
    for key in (k for k in before if "running" in k):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["stage0.patch_embed.proj.weight"], after["stage0.patch_embed.proj.weight"])


def test_a_frozen_prefix_that_names_nothing_is_one_line(data, tmp_path):
    with pytest.raises(UserError, match="FINETUNE.FROZEN_LAYERS: 'stage9' names no part of the model; names start with stage0"):
        finetune(data, tmp_path, "FINETUNE.FROZEN_LAYERS", ["stage9"])


def test_the_global_batch_must_split_over_accumulation_steps(data, tmp_path):
    with pytest.raises(UserError, match="FINETUNE.BATCH_SIZE 8 does not split evenly over 1 process"):
        finetune(data, tmp_path, "TRAIN.ACCUM_STEPS", 3)


def test_accumulation_splits_the_global_batch(data, tmp_path):
    # TRAIN_MODE false: BatchNorm normalises with its statistics, not the batch's, and drop path is
    # off, so an image's gradient does not depend on the batch it is in.
    one = finetune(data, tmp_path / "one", "DETERMINISTIC", True, "FINETUNE.TRAIN_MODE", False)
    two = finetune(data, tmp_path / "two", "DETERMINISTIC", True, "FINETUNE.TRAIN_MODE", False, "TRAIN.ACCUM_STEPS", 2)
    a, b = weights(one["final_state"]), weights(two["final_state"])
    # The same 8-image steps, as two micro-batches of 4: equal up to float summation order.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_mixup_checks_the_step_runs_batch_per_process_not_train_batch_size(data, tmp_path):
    # 6 over 2 accumulation steps: 3 images a batch, which timm's Mixup would assert on at step 1.
    with pytest.raises(UserError, match=r"FINETUNE.BATCH_SIZE: 6 gives an odd 3 images per process .*AUG.MIXUP_PROB 0"):
        finetune(data, tmp_path, "FINETUNE.BATCH_SIZE", 6, "TRAIN.ACCUM_STEPS", 2, "AUG.MIXUP_PROB", 1.0, "AUG.MIXUP", 0.8)


def test_cpu_threads_are_sized_for_the_step_runs_batch_and_square_crop(data, tmp_path, monkeypatch):
    seen = []

    def record(requested, model, image_size, batch):
        seen.append((tuple(image_size), batch))
        raise RuntimeError("recorded")

    monkeypatch.setattr(session_module, "choose_cpu_threads", record)
    with pytest.raises(RuntimeError, match="recorded"):
        finetune(data, tmp_path, "FINETUNE.BATCH_SIZE", 4, "TRAIN.IMAGE_SIZE", [32, 48])
    assert seen == [((32, 32), 4)]  # training crops a square of IMAGE_SIZE[0]; TRAIN.BATCH_SIZE_PER_GPU is 8


def test_repeated_aug_over_accumulation_steps_splits_the_step_runs_batch(data, tmp_path, monkeypatch):
    seen = []
    real = loader_module.RepeatAugAccumSampler
    monkeypatch.setattr(loader_module, "RepeatAugAccumSampler", lambda *a, **k: seen.append(k["batch_size"]) or real(*a, **k))
    cfg = config(data, tmp_path, *FINETUNE, "TRAIN.ACCUM_STEPS", 2, "DATASET.SAMPLER", "repeated_aug")
    with contextlib.suppress(UserError):  # timm's sampler selects multiples of 256 images: none of 24
        build_loader(cfg, "train")
    assert seen == [4]


@pytest.mark.slow
def test_a_step_run_stopped_and_resumed_equals_an_uninterrupted_one(data, tmp_path, monkeypatch):
    whole = finetune(data, tmp_path / "whole", "DETERMINISTIC", True)

    evaluate = finetune_module.evaluate_with_ema
    calls = []

    def evaluate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # at step 4, mid-pass: the stop is taken after the checkpoint is saved
            signal.raise_signal(signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "evaluate_with_ema", evaluate_then_signal)
    with pytest.raises(TrainingInterrupted):
        finetune(data, tmp_path / "split", "DETERMINISTIC", True)
    folder = tmp_path / "split" / "shapes" / "tiny"
    assert read_checkpoint(folder / "checkpoint.pth").extra["step"] == 4
    monkeypatch.setattr(finetune_module, "evaluate_with_ema", evaluate)
    resumed = finetune(data, tmp_path / "split", "DETERMINISTIC", True)

    a, b = weights(whole["final_state"]), weights(resumed["final_state"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[-1] == {**whole["metrics"], "images_per_sec": records[-1]["images_per_sec"], "time_s": records[-1]["time_s"]}
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))


def test_a_step_run_resumes_with_its_own_keys_applied_or_refused(data, tmp_path, caplog):
    finetune(data, tmp_path)
    caplog.clear()
    finetune(data, tmp_path, "FINETUNE.BASE_LR", 0.02, "FINETUNE.CLIP_GRAD_NORM", 0.5, "TRAIN.LR", 0.1)
    applied = [r.getMessage() for r in caplog.records if "resuming with changed settings" in r.getMessage()]
    assert len(applied) == 1 and "FINETUNE.BASE_LR 0.05 -> 0.02" in applied[0] and "FINETUNE.CLIP_GRAD_NORM" in applied[0]
    assert "TRAIN.LR" not in applied[0]  # a step run does not read it
    for key, value in (("FINETUNE.BATCH_SIZE", 4), ("FINETUNE.LAYER_DECAY", 0.5), ("FINETUNE.LINEAR_PROBE", True)):
        with pytest.raises(UserError, match=f"with another {key} .*; set {key} as it was"):
            finetune(data, tmp_path, key, value)
    with pytest.raises(UserError, match="does not suit FINETUNE.OPTIMIZER AdamW .*differ: FINETUNE.OPTIMIZER or"):
        finetune(data, tmp_path, "FINETUNE.OPTIMIZER", "adamw")


def _nan_at_call(monkeypatch, call):
    build = run_module.build_criterion

    def nan_criterion(*args, **kwargs):
        criterion, calls = build(*args, **kwargs), []

        def loss(output, target):
            calls.append(1)
            return criterion(output, target) * (float("nan") if len(calls) == call else 1.0)
        return loss

    monkeypatch.setattr(run_module, "build_criterion", nan_criterion)


def test_a_nonfinite_loss_in_a_step_run_names_the_step_and_the_finetune_keys(data, tmp_path, monkeypatch, caplog):
    _nan_at_call(monkeypatch, 4)  # 3 steps a pass: the 4th step is the second pass's first batch
    with pytest.raises(UserError, match=r"non-finite loss at step 4 \(data pass 1\) \(batch 0\); .*"
                                        r"lower FINETUNE.BASE_LR, set FINETUNE.CLIP_GRAD_NORM, or set TRAIN.NONFINITE_LOSS skip"):
        finetune(data, tmp_path / "stop")
    finetune(data, tmp_path / "skip", "TRAIN.NONFINITE_LOSS", "skip")
    assert "non-finite loss at step 4 (data pass 1): step skipped" in caplog.text


def test_an_epoch_checkpoint_does_not_resume_a_step_run(data, tmp_path):
    train(config(data, tmp_path, "TRAIN.END_EPOCH", 1))
    with pytest.raises(UserError, match="written by an epoch run and this is a step-based run"):
        finetune(data, tmp_path)


TRANSFER_EXPERIMENTS = [f"{d}-cvt-{m}-384" for d in ("cifar10", "cifar100", "pets", "flowers102") for m in ("13", "21", "w24")]


@pytest.mark.parametrize("name", TRANSFER_EXPERIMENTS)
def test_transfer_experiments_are_packaged_with_the_papers_protocol(name):
    assert name in list_experiments()
    cfg = load_config(name)
    dataset, model = name.split("-cvt-")
    assert cfg.DATASET.DATASET == dataset and cfg.MODEL.PRETRAINED == f"cvt-{model.removesuffix('-384')}-384-22k"
    ft = cfg.FINETUNE
    assert (ft.FINETUNE, ft.BATCH_SIZE, ft.OPTIMIZER, ft.MOMENTUM, ft.WD, ft.CLIP_GRAD_NORM) == (True, 512, "sgd", 0.9, 0.0, 1.0)
    assert ft.STEPS == (10000 if dataset.startswith("cifar") else 500)
    assert cfg.TRAIN.IMAGE_SIZE == [384, 384] and cfg.TEST.IMAGE_SIZE == [384, 384]
    assert cfg.AUG.MIXUP_PROB == 0 and not cfg.AUG.TIMM_AUG.USE_LOADER


def test_the_cifar_recipe_trains_on_cifar_batches(tmp_path):
    root = make_cifar(tmp_path, per_batch=8)
    cfg = load_config("cvt-cifar10-32", ["DATASET.ROOT", str(root), "MODEL.NUM_CLASSES", "3", "TRAIN.BATCH_SIZE_PER_GPU", "8",
                                          "WORKERS", "0", "TEST.BATCH_SIZE_PER_GPU", "8"])
    loader, dataset = build_loader(cfg, "train")
    images, targets, _ = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and len(dataset) == 40


@pytest.mark.parametrize("deterministic, saved_step", [(False, 3), (True, 2)])
def test_a_stop_between_evaluations_saves_the_step_reached_or_keeps_the_last_evaluation(
        data, tmp_path, monkeypatch, deterministic, saved_step):
    train_steps = training_state.train_one_epoch
    calls = []

    def signal_then_train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the stretch from step 2 to 4: one step is taken, then the stop
            signal.raise_signal(signal.SIGINT)
        return train_steps(*args, **kwargs)

    monkeypatch.setattr(training_state, "train_one_epoch", signal_then_train)
    with pytest.raises(TrainingInterrupted):
        finetune(data, tmp_path, "DETERMINISTIC", deterministic)
    folder = tmp_path / "shapes" / "tiny"
    assert read_checkpoint(folder / "checkpoint.pth").extra["step"] == saved_step
    monkeypatch.setattr(training_state, "train_one_epoch", train_steps)
    finetune(data, tmp_path, "DETERMINISTIC", deterministic)
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]

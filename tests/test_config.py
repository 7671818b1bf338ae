"""The experiment configuration: defaults, files, inheritance, overrides, validation, helpers."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from yacs.config import CfgNode

from cvt.config import (
    KEYS_WITHOUT_EFFECT,
    config_from_settings,
    get_defaults,
    list_experiments,
    load_config,
    output_dir,
    resolve_config_path,
    save_config,
    spec_from_config,
)
from cvt.errors import UserError
from cvt.models import CvtSpec

from helpers import REFERENCE

OFFICIAL = sorted((REFERENCE / "official-configs").glob("*.yaml"))
PUBLISHED = ["cvt-13-224x224", "cvt-13-384x384", "cvt-21-224x224", "cvt-21-384x384", "cvt-w24-384x384"]
needs_reference = pytest.mark.skipif(len(OFFICIAL) != 5, reason=(
    "needs the five published experiment YAML files, which are not shipped with the project; put them in "
    f"{REFERENCE / 'official-configs'} to run this test"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def leaf_keys(node: CfgNode, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in node.items():
        keys |= leaf_keys(value, f"{prefix}{key}.") if isinstance(value, CfgNode) else {prefix + key}
    return keys


# ---- defaults ----------------------------------------------------------------------------------------


def test_defaults_hold_the_release_keys_and_ours():
    cfg = get_defaults()
    assert cfg.MODEL.SPEC == CvtSpec().to_dict()
    assert cfg.TRAIN.LR == 0.001 and cfg.TRAIN.OPTIMIZER == "sgd" and cfg.TRAIN.END_EPOCH == 100
    assert cfg.AUG.RATIO == (3 / 4, 4 / 3) and cfg.GPUS == (0,)
    assert cfg.TRAIN.LR_SCHEDULER.ARGS.sched == "cosine" and cfg.TRAIN.LR_SCHEDULER.ARGS.lr_cycle_limit == 1
    assert cfg.AUG.TIMM_AUG.INTERPOLATION == "bicubic"
    assert (cfg.SEED, cfg.DETERMINISTIC, cfg.DIST_TIMEOUT_S, cfg.TENSORBOARD) == (0, False, 600, True)
    assert (cfg.MODEL.ACTIVATION, cfg.AMP.DTYPE) == ("auto", "auto")
    assert (cfg.TRAIN.ACCUM_STEPS, cfg.TRAIN.EMA.ENABLED, cfg.TRAIN.EMA.DECAY) == (1, False, 0.9998)
    assert (cfg.TRAIN.NONFINITE_LOSS, cfg.TRAIN.GRAD_CHECKPOINTING, cfg.TRAIN.COMPILE) == ("stop", False, False)
    assert (cfg.TRAIN.EVAL_EVERY, cfg.TRAIN.COMPILE_MODE) == (1, "default")
    assert (cfg.DATASET.BAD_FILES, cfg.DATASET.MAX_IMAGE_PIXELS) == ("skip", 89478485)


def test_only_optimizer_args_accepts_new_keys():
    def open_nodes(node: CfgNode, prefix: str = "") -> list[str]:
        found = [prefix.rstrip(".")] if node.is_new_allowed() else []
        for key, value in node.items():
            if isinstance(value, CfgNode):
                found += open_nodes(value, f"{prefix}{key}.")
        return found

    assert open_nodes(get_defaults()) == ["TRAIN.OPTIMIZER_ARGS"]


def test_defaults_load_and_every_key_documented():
    cfg = load_config(None)
    assert cfg.is_frozen() and cfg.NAME == ""
    documented = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    for key in ("SEED", "DETERMINISTIC", "DIST_TIMEOUT_S", "TENSORBOARD", "MODEL.ACTIVATION", "AMP.DTYPE",
                "TRAIN.ACCUM_STEPS", "TRAIN.EMA.ENABLED", "TRAIN.EMA.DECAY", "TRAIN.NONFINITE_LOSS",
                "TRAIN.GRAD_CHECKPOINTING", "TRAIN.COMPILE", "TRAIN.COMPILE_MODE", "TRAIN.EVAL_EVERY", "DATASET.BAD_FILES",
                "DATASET.MAX_IMAGE_PIXELS", "TEST.AMP", "DATASET.CLASS_MAP", "TRAIN.LR_SCHEDULER.ARGS.noise",
                *KEYS_WITHOUT_EFFECT):
        assert f"`{key}`" in documented


def test_keys_without_effect_warn_once_each_when_set(caplog):
    defaults = get_defaults()
    for key in KEYS_WITHOUT_EFFECT:  # each one a real key
        node = defaults
        for part in key.split("."):
            node = node[part]
    with caplog.at_level(logging.WARNING, logger="cvt.config"):
        load_config(None)
        assert not caplog.records
        cfg = load_config(None, ["DEBUG.DEBUG", "True", "AUG.DROPBLOCK_LAYERS", "[2]", "TRAIN.GAMMA1", "0.99"])
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == [
        "config key AUG.DROPBLOCK_LAYERS", "config key DEBUG.DEBUG"]  # GAMMA1 at its default: silent
    assert all("has no effect" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cvt.config"):
        config_from_settings({"DEBUG.DEBUG": True})  # a stored config: warned about when its run started
    assert not caplog.records and cfg.DEBUG.DEBUG


def test_real_labels_exclude_valid_labels():
    with pytest.raises(UserError, match="TEST.REAL_LABELS"):
        load_config(None, ["TEST.REAL_LABELS", "True", "TEST.VALID_LABELS", "subset.txt"])


# ---- the published files -----------------------------------------------------------------------------


@needs_reference
@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: p.stem)
def test_official_files_load_unchanged(path, caplog):
    with caplog.at_level(logging.WARNING, logger="cvt.config"):
        cfg = load_config(path)
    assert not caplog.records  # they set no key without effect to anything but its default
    assert cfg.NAME == path.stem
    assert output_dir(cfg) == Path("OUTPUT/imagenet") / path.stem
    assert cfg.TRAIN.OPTIMIZER == "adamW" and cfg.TRAIN.END_EPOCH == 300
    assert cfg.AUG.TIMM_AUG.AUTO_AUGMENT == "rand-m9-mstd0.5-inc1"


@needs_reference
@pytest.mark.parametrize("name", PUBLISHED)
def test_packaged_files_equal_the_published_values(name):
    ours = load_config(name)
    official = load_config(REFERENCE / "official-configs" / f"{name}.yaml")
    assert ours == official  # NAME included: both are the file's stem
    # Spot-check the values the variants differ in, so equality is not vacuous.
    size = int(name.split("x")[-1])
    assert ours.TRAIN.IMAGE_SIZE == [size, size] and ours.TEST.IMAGE_SIZE == [size, size]
    assert ours.TEST.CENTER_CROP == (size == 224)


def test_packaged_variants_differ_as_published():
    c13, c21, w24 = (load_config(n) for n in ("cvt-13-224x224", "cvt-21-224x224", "cvt-w24-384x384"))
    assert spec_from_config(c13) == CvtSpec()
    assert c21.MODEL.SPEC.DEPTH == [1, 4, 16] and c21.DATASET.SAMPLER == "repeated_aug"
    assert not c21.AUG.TIMM_AUG.USE_LOADER and c21.TRAIN.LR == 0.000125 and c21.TRAIN.WD == 0.1
    assert w24.MODEL.SPEC.DIM_EMBED == [192, 768, 1024] and w24.MODEL.SPEC.DROP_PATH_RATE == [0.0, 0.0, 0.3]


def test_bare_names_resolve_to_packaged_files():
    experiments = list_experiments()
    assert set(PUBLISHED) <= set(experiments)
    for name in PUBLISHED:
        path = experiments[name]
        assert path.is_file() and path.parts[-3:-1] == ("imagenet", "cvt")
        assert resolve_config_path(name) == path == resolve_config_path(f"{name}.yaml")


def test_demo_experiment_loads_when_present():
    if "cvt-digits" not in list_experiments():
        pytest.skip("the demo experiment is not packaged yet")
    assert load_config("cvt-digits").NAME == "cvt-digits"


def test_existing_path_wins_over_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "cvt-13-224x224.yaml", "TRAIN:\n  LR: 0.5\n")
    assert load_config("cvt-13-224x224.yaml").TRAIN.LR == 0.5
    assert load_config("cvt-13-224x224").TRAIN.LR == 0.00025  # bare name: the packaged file


def test_missing_file_lists_the_packaged_names():
    with pytest.raises(UserError, match=r"'no-such-experiment' not found.*cvt-13-224x224, cvt-13-384x384"):
        load_config("no-such-experiment")


def test_a_folder_given_as_config_file_is_named_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match=r"config file 'runs' is a folder; give the path of a YAML file in it"):
        load_config("runs")
    (tmp_path / "cvt-digits").mkdir()  # a folder of a packaged experiment's name does not hide it
    assert load_config("cvt-digits").NAME == "cvt-digits"


# ---- overrides ---------------------------------------------------------------------------------------


def test_overrides_are_parsed_like_yacs_and_coerced_liberally():
    cfg = load_config("cvt-13-224x224", [
        "TRAIN.LR", "1",  # an int where a float is expected
        "TRAIN.IMAGE_SIZE", "(256, 256)",  # a tuple where a list is expected
        "GPUS", "[0, 1]",  # and a list for a tuple
        "AMP.ENABLED", "false",  # yacs would keep the string
        "MODEL.SPEC.MLP_RATIO", "[4, 4, 2]",
        "DATASET.ROOT", "/data/imagenet",  # not a Python literal: stays a string
        "TRAIN.OPTIMIZER_ARGS.betas", "(0.9, 0.99)",
        "NAME", "mine",
    ])
    assert cfg.TRAIN.LR == 1.0 and isinstance(cfg.TRAIN.LR, float)
    assert cfg.TRAIN.IMAGE_SIZE == [256, 256] and cfg.GPUS == (0, 1)
    assert cfg.AMP.ENABLED is False
    assert cfg.MODEL.SPEC.MLP_RATIO == [4.0, 4.0, 2.0] and all(isinstance(r, float) for r in cfg.MODEL.SPEC.MLP_RATIO)
    assert cfg.DATASET.ROOT == "/data/imagenet"
    assert cfg.TRAIN.OPTIMIZER_ARGS.betas == [0.9, 0.99]
    assert cfg.NAME == "mine"


def test_yaml_exponent_without_dot_reads_as_number(tmp_path):
    cfg = load_config(write(tmp_path / "e.yaml", "TRAIN:\n  LR: 1e-4\n"))  # PyYAML sees the string '1e-4'
    assert cfg.TRAIN.LR == 1e-4


def test_odd_number_of_override_tokens():
    with pytest.raises(UserError, match=r"KEY VALUE pairs, got an odd number of tokens \(3, the last being 'TRAIN.WD'\)"):
        load_config(None, ["TRAIN.LR", "0.1", "TRAIN.WD"])


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("TRAIN.LRR", "TRAIN.LR"), ("train.lr", "TRAIN.LR"), ("MODEL.SPEC.DEPHT", "MODEL.SPEC.DEPTH"),
     ("TRAIN.LR_SCHEDULER.ARGS.warmup_epoch", "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs")],
)
def test_unknown_override_key_suggests_the_nearest(key, suggestion):
    with pytest.raises(UserError) as info:
        load_config(None, [key, "1"])
    assert str(info.value) == f"unknown config key {key!r} (from the command line); did you mean {suggestion!r}?"


def test_unknown_file_key_names_the_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "AUG:\n  TIMM_AUG:\n    RE_PROBB: 0.2\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == (
        f"unknown config key 'AUG.TIMM_AUG.RE_PROBB' (from {str(path.resolve())}); did you mean 'AUG.TIMM_AUG.RE_PROB'?"
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("TRAIN.LR", "'fast'", "a number"), ("WORKERS", "2.5", "an integer"), ("AMP.ENABLED", "'maybe'", "a boolean"),
     ("TRAIN.IMAGE_SIZE", "224", "a list"), ("TRAIN.IMAGE_SIZE", "[224.5, 224]", "a list of integers"),
     ("TRAIN", "3", "a section of keys"), ("MODEL.NAME", "True", "a string")],
)
def test_wrong_type_names_key_type_and_value(key, value, expected):
    with pytest.raises(UserError, match=rf"^config key '{key}' \(from the command line\) expects {expected}.*, got"):
        load_config(None, [key, value])


def test_base_cannot_be_set_on_the_command_line():
    assert load_config(None, ["BASE", "['']"]).BASE == [""]  # a replayed saved config carries this
    with pytest.raises(UserError, match="BASE cannot be set on the command line"):
        load_config(None, ["BASE", "['other.yaml']"])


# ---- files: syntax, inheritance, names ---------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "TRAIN:\n  LR: 0.1\n  WD: [0.1\n")
    with pytest.raises(UserError, match=r"YAML syntax error in '.*bad\.yaml' at line \d+"):
        load_config(path)


def test_base_files_merge_first_recursively(tmp_path):
    (tmp_path / "bases").mkdir()
    write(tmp_path / "bases" / "root.yaml", "TRAIN:\n  LR: 0.1\n  WD: 0.2\nWORKERS: 1\n")
    write(tmp_path / "bases" / "mid.yaml", "BASE: ['root.yaml']\nTRAIN:\n  WD: 0.3\n")
    child = write(tmp_path / "child.yaml", "BASE: ['bases/mid.yaml']\nTRAIN:\n  LR: 0.4\n")
    cfg = load_config(child, ["WORKERS", "2"])
    assert (cfg.TRAIN.LR, cfg.TRAIN.WD, cfg.WORKERS) == (0.4, 0.3, 2)
    assert cfg.NAME == "child" and cfg.BASE == [""]


def test_base_may_name_a_packaged_experiment(tmp_path):
    cfg = load_config(write(tmp_path / "short.yaml", "BASE: ['cvt-21-224x224.yaml']\nTRAIN:\n  END_EPOCH: 10\n"))
    assert cfg.MODEL.SPEC.DEPTH == [1, 4, 16] and cfg.TRAIN.END_EPOCH == 10 and cfg.NAME == "short"


def test_diamond_inheritance_is_not_a_cycle(tmp_path):
    write(tmp_path / "d.yaml", "WORKERS: 1\n")
    write(tmp_path / "b.yaml", "BASE: ['d.yaml']\n")
    write(tmp_path / "c.yaml", "BASE: ['d.yaml']\n")
    assert load_config(write(tmp_path / "a.yaml", "BASE: ['b.yaml', 'c.yaml']\n")).WORKERS == 1


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "BASE: ['b.yaml']\n")
    write(tmp_path / "b.yaml", "BASE: ['a.yaml']\n")
    with pytest.raises(UserError, match=r"BASE cycle: a\.yaml -> b\.yaml -> a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_file(tmp_path):
    with pytest.raises(UserError, match=r"BASE file 'gone\.yaml' named in .* not found"):
        load_config(write(tmp_path / "a.yaml", "BASE: ['gone.yaml']\n"))


def test_name_comes_from_the_file_not_its_base(tmp_path):
    write(tmp_path / "base.yaml", "NAME: shared\n")
    assert load_config(write(tmp_path / "one.yaml", "BASE: ['base.yaml']\n")).NAME == "one"
    assert load_config(write(tmp_path / "two.yaml", "NAME: custom\n")).NAME == "custom"
    assert load_config(tmp_path / "two.yaml", ["NAME", "cli"]).NAME == "cli"


def test_a_leading_tilde_in_path_keys_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    source = write(tmp_path / "exp.yaml", "OUTPUT_DIR: ~/runs\nDATASET:\n  ROOT: '~/data'\n")
    cfg = load_config(source, ["TEST.MODEL_FILE", "~/model.pth", "MODEL.PRETRAINED", "~/init.pth",
                               "TRAIN.CHECKPOINT", "~/ckpt.pth", "DATASET.CLASS_MAP", "~/map.txt",
                               "TEST.VALID_LABELS", "~/labels.txt"])
    assert output_dir(cfg) == tmp_path / "runs" / "imagenet" / "exp"  # not a folder named '~' here
    assert [cfg.DATASET.ROOT, cfg.TEST.MODEL_FILE, cfg.MODEL.PRETRAINED, cfg.TRAIN.CHECKPOINT, cfg.DATASET.CLASS_MAP,
            cfg.TEST.VALID_LABELS] == [str(tmp_path / name) for name in
                                       ("data", "model.pth", "init.pth", "ckpt.pth", "map.txt", "labels.txt")]
    assert load_config(None, ["TEST.MODEL_FILE", "hf-hub:org/repo"]).TEST.MODEL_FILE == "hf-hub:org/repo"
    assert config_from_settings({"OUTPUT_DIR": "~/stored"}).OUTPUT_DIR == str(tmp_path / "stored")


def test_output_dir_needs_a_name():
    assert output_dir(load_config(None, ["NAME", "x", "OUTPUT_DIR", "out"])) == Path("out/imagenet/x")
    with pytest.raises(UserError, match="NAME is empty"):
        output_dir(load_config(None))


# ---- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["TRAIN.LR", "0"], "TRAIN.LR=0.0 is invalid: it must be positive"),
        (["TRAIN.LR", "-0.1"], "TRAIN.LR=-0.1 is invalid"),
        (["TRAIN.BATCH_SIZE_PER_GPU", "0"], "TRAIN.BATCH_SIZE_PER_GPU=0 is invalid: it must be >= 1"),
        (["TEST.BATCH_SIZE_PER_GPU", "0"], "TEST.BATCH_SIZE_PER_GPU=0"),
        (["WORKERS", "-1"], "WORKERS=-1 is invalid: it must be >= 0"),
        (["TRAIN.BEGIN_EPOCH", "-1"], "TRAIN.BEGIN_EPOCH=-1"),
        (["TRAIN.BEGIN_EPOCH", "5", "TRAIN.END_EPOCH", "5"], "TRAIN.END_EPOCH=5 is invalid: it must be greater than"),
        (["MODEL.NUM_CLASSES", "0"], "MODEL.NUM_CLASSES=0"),
        (["MODEL.SPEC.NUM_HEADS", "[1, 5, 6]"], r"NUM_HEADS\[1\]=5 does not divide DIM_EMBED\[1\]=192"),
        (["MODEL.SPEC.DEPTH", "[1, 2]"], "DEPTH has 2 entries but NUM_STAGES is 3"),
        (["MODEL.SPEC.DROP_PATH_RATE", "[0, 0, 1.5]"], "MODEL.SPEC.DROP_PATH_RATE"),
        (["TRAIN.IMAGE_SIZE", "[2, 2]"], r"TRAIN.IMAGE_SIZE=\[2, 2\] is invalid: it must be at least 3x3"),
        (["TEST.IMAGE_SIZE", "[224, 2]"], r"TEST.IMAGE_SIZE=\[224, 2\]"),
        (["TEST.IMAGE_SIZE", "[224]"], r"TEST.IMAGE_SIZE=\[224\] is invalid: it must be \[width, height\]"),
        (["AMP.MEMORY_FORMAT", "nhcw"], "AMP.MEMORY_FORMAT='nhcw' is invalid: it must be one of 'nchw', 'nhwc'"),
        (["AMP.DTYPE", "fp8"], "AMP.DTYPE='fp8'"),
        (["TRAIN.OPTIMIZER", "lamb"], "TRAIN.OPTIMIZER='lamb'"),
        (["DATASET.SAMPLER", "weighted"], "DATASET.SAMPLER='weighted'"),
        (["MODEL.ACTIVATION", "relu"], "MODEL.ACTIVATION='relu'"),
        (["TRAIN.NONFINITE_LOSS", "ignore"], "TRAIN.NONFINITE_LOSS='ignore'"),
        (["TRAIN.COMPILE_MODE", "cudagraphs"], "TRAIN.COMPILE_MODE='cudagraphs' is invalid: it must be one of 'default', "),
        (["TRAIN.COMPILE", "True", "TRAIN.COMPILE_MODE", "reduce-overhead", "TRAIN.ACCUM_STEPS", "2"],
         "TRAIN.COMPILE_MODE='reduce-overhead' is invalid: it must be 'default' or 'max-autotune-no-cudagraphs' with TRAIN.ACCUM_STEPS 2"),
        (["DATASET.BAD_FILES", "warn"], "DATASET.BAD_FILES='warn'"),
        (["AUG.MIXUP_MODE", "row"], "AUG.MIXUP_MODE='row'"),
        (["TRAIN.ACCUM_STEPS", "0"], "TRAIN.ACCUM_STEPS=0"),
        (["TRAIN.EVAL_EVERY", "0"], "TRAIN.EVAL_EVERY=0"),
        (["TRAIN.EMA.DECAY", "1"], "TRAIN.EMA.DECAY=1.0 is invalid: it must be in \\(0, 1\\)"),
        (["TRAIN.EMA.DECAY", "0"], "TRAIN.EMA.DECAY=0.0"),
        (["AUG.MIXUP_PROB", "1.5"], "AUG.MIXUP_PROB=1.5 is invalid: it must be a probability"),
        (["AUG.TIMM_AUG.RE_PROB", "-0.1"], "AUG.TIMM_AUG.RE_PROB=-0.1"),
        (["AUG.TIMM_AUG.HFLIP", "2"], "AUG.TIMM_AUG.HFLIP=2.0"),
        (["LOSS.LABEL_SMOOTHING", "1"], r"LOSS.LABEL_SMOOTHING=1.0 is invalid: it must be in \[0, 1\)"),
        (["TRAIN.WD", "-1"], "TRAIN.WD=-1.0"),
        (["TEST.INTERPOLATION", "7"], "TEST.INTERPOLATION=7"),
        (["INPUT.STD", "[0.2, 0, 0.2]"], "INPUT.STD"),
        (["AUG.SCALE", "(0.5, 0.1)"], "AUG.SCALE"),
        (["DIST_TIMEOUT_S", "0"], "DIST_TIMEOUT_S=0"),
        (["SEED", "-1"], "SEED=-1"),
        # timm's scheduler would divide by a 0 step length only after the first epoch.
        (["TRAIN.LR_SCHEDULER.ARGS.sched", "step", "TRAIN.LR_SCHEDULER.ARGS.decay_epochs", "0"],
         "TRAIN.LR_SCHEDULER.ARGS.decay_epochs=0 is invalid: it must be >= 1"),
        (["TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", "-3"], "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs=-3 is invalid: it must be >= 0"),
        (["TRAIN.LR_SCHEDULER.ARGS.patience_epochs", "-1"], "TRAIN.LR_SCHEDULER.ARGS.patience_epochs=-1"),
        (["TRAIN.LR_SCHEDULER.ARGS.min_lr", "-1e-5"], "TRAIN.LR_SCHEDULER.ARGS.min_lr=-1e-05"),
        (["TRAIN.LR_SCHEDULER.ARGS.decay_rate", "0"], "TRAIN.LR_SCHEDULER.ARGS.decay_rate=0.0 is invalid: it must be positive"),
        (["TRAIN.LR_SCHEDULER.ARGS.lr_cycle_limit", "0"], "TRAIN.LR_SCHEDULER.ARGS.lr_cycle_limit=0"),
        # torch's ReduceLROnPlateau refuses a factor >= 1 only once the run has started.
        (["TRAIN.LR_SCHEDULER.ARGS.sched", "plateau", "TRAIN.LR_SCHEDULER.ARGS.decay_rate", "1.0"],
         "TRAIN.LR_SCHEDULER.ARGS.decay_rate=1.0 is invalid: it must be < 1 with sched 'plateau'"),
        (["AUG.TIMM_AUG.COLOR_JITTER", "-0.5"], "AUG.TIMM_AUG.COLOR_JITTER=-0.5 is invalid: it must be >= 0"),
        (["TRAIN.LR_SCHEDULER.ARGS.sched", "none"], "TRAIN.LR_SCHEDULER.ARGS.sched='none' is invalid: it must be one of 'cosine'"),
        (["TRAIN.LR_SCHEDULER.ARGS.noise", "[0.8, 0.2]"], r"TRAIN.LR_SCHEDULER.ARGS.noise=\[0.8, 0.2\] is invalid"),
        (["TRAIN.LR_SCHEDULER.ARGS.noise", "[1.5]"], "TRAIN.LR_SCHEDULER.ARGS.noise"),
        (["TRAIN.LR_SCHEDULER.ARGS.noise", "['a']"], "TRAIN.LR_SCHEDULER.ARGS.noise"),
        # timm would fail with an AssertionError or KeyError when the transform is built, or (RE_MODE with
        # RE_PROB 0) take it silently.
        (["AUG.TIMM_AUG.AUTO_AUGMENT", "foo"], "AUG.TIMM_AUG.AUTO_AUGMENT='foo' is invalid: it must be empty or a timm policy"),
        (["AUG.TIMM_AUG.AUTO_AUGMENT", "randx-m9"], "AUG.TIMM_AUG.AUTO_AUGMENT='randx-m9'"),
        (["AUG.TIMM_AUG.INTERPOLATION", "foo"], "AUG.TIMM_AUG.INTERPOLATION='foo' is invalid: it must be one of 'nearest'"),
        (["AUG.TIMM_AUG.RE_MODE", "foo"], "AUG.TIMM_AUG.RE_MODE='foo' is invalid: it must be one of 'const', 'rand', 'pixel'"),
    ],
)
def test_invalid_values_stop_with_one_line(opts, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(None, opts)
    assert "\n" not in str(info.value)


def test_valid_edge_values_pass():
    cfg = load_config(None, [
        "TRAIN.OPTIMIZER", "AdamW", "TRAIN.IMAGE_SIZE", "[3, 3]", "LOSS.LABEL_SMOOTHING", "0",
        "AUG.MIXUP_PROB", "1", "WORKERS", "0", "AMP.DTYPE", "float16", "AMP.MEMORY_FORMAT", "nhwc",
        "TRAIN.LR_SCHEDULER.ARGS.warmup_epochs", "0", "TRAIN.LR_SCHEDULER.ARGS.decay_epochs", "1",
        "TRAIN.LR_SCHEDULER.ARGS.noise", "[0, 1]", "AUG.TIMM_AUG.AUTO_AUGMENT", "augmix-m5-w4-d2",
        "AUG.TIMM_AUG.INTERPOLATION", "random", "AUG.TIMM_AUG.RE_MODE", "const",
    ])
    assert cfg.TRAIN.OPTIMIZER == "AdamW" and cfg.TRAIN.IMAGE_SIZE == [3, 3]


# ---- saving ------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    write(tmp_path / "base.yaml", "TRAIN:\n  WD: 0.3\n")
    source = write(tmp_path / "exp.yaml", "BASE: ['base.yaml']\nTRAIN:\n  LR: 1e-4\n")
    cfg = load_config(source, ["TRAIN.OPTIMIZER_ARGS.betas", "(0.9, 0.95)", "AUG.RATIO", "[0.5, 2]"])
    saved = tmp_path / "run" / "config.yaml"  # another folder: the saved file must stand alone
    save_config(cfg, saved)
    again = load_config(saved)
    assert again == cfg
    assert again.NAME == "exp" and again.AUG.RATIO == (0.5, 2.0)
    assert not list(saved.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_packaged_config_round_trips(tmp_path):
    cfg = load_config("cvt-w24-384x384")
    save_config(cfg, tmp_path / "w24.yaml")
    assert load_config(tmp_path / "w24.yaml") == cfg


def test_compile_modes_without_cuda_graphs_accumulate_gradients():
    for mode in ("default", "max-autotune-no-cudagraphs"):
        cfg = load_config(None, ["TRAIN.COMPILE", "True", "TRAIN.COMPILE_MODE", mode, "TRAIN.ACCUM_STEPS", "2"])
        assert (cfg.TRAIN.COMPILE_MODE, cfg.TRAIN.ACCUM_STEPS) == (mode, 2)
    assert load_config(None, ["TRAIN.COMPILE_MODE", "reduce-overhead", "TRAIN.ACCUM_STEPS", "2"]).TRAIN.ACCUM_STEPS == 2

"""Weights by name, without network: a Hugging Face hub cache built in a temporary folder holds
transformers-saved random CvTs (microsoft/cvt-13 in the published layout; a user's tiny repo; a repo
that is no CvT), and HF_HUB_OFFLINE=1. Every path to the published tag (cvt, timm, torch.hub, configs,
the command line) finds it, loads it strictly, runs QuickGELU and equals loading the folder by path."""
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt.cli import main
from cvt.config import load_config
from cvt.data.transforms import build_transform, eval_transform_settings
from cvt.models.zoo import PUBLISHED
from cvt.weights.hub import TransportError
from cvt.predict import Predictor
from cvt.training.run import build_model, load_pretrained
from cvt.weights.load import model_from_checkpoint

from helpers import CLASSES, REPO, TINY_SPEC, config, make_image_folder

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
huggingface_hub = pytest.importorskip("huggingface_hub")

# id2label holds display names, not the class folders' names (as ImageNet's 'tench, Tinca tinca').
DISPLAY_NAMES = [f"a {name}" for name in CLASSES]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MICROSOFT_PREPROCESSOR = {  # the older format Microsoft's repos hold
    "feature_extractor_type": "ConvNextFeatureExtractor", "size": 224, "crop_pct": 0.875, "resample": 3,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


def _random_bn_stats(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=generator))
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=generator) + 0.5)


def _snapshot(cache: Path, repo: str) -> Path:
    """The folder huggingface_hub reads for `repo` at main: refs/main -> snapshots/<commit>/."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return root / "snapshots" / COMMIT


def _save_hf(cache: Path, repo: str, config: "transformers.CvtConfig") -> "transformers.CvtForImageClassification":
    torch.manual_seed(0)
    model = transformers.CvtForImageClassification(config).eval()
    _random_bn_stats(model)
    model.save_pretrained(_snapshot(cache, repo))
    return model


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("hub")
    # CvtConfig's defaults are CvT-13's architecture; 1000 named classes as Microsoft's config.json has.
    names = {i: f"class{i}" for i in range(1000)}
    _save_hf(cache, "microsoft/cvt-13", transformers.CvtConfig(id2label=names, label2id={v: k for k, v in names.items()}))
    (_snapshot_folder(cache, "microsoft/cvt-13") / "preprocessor_config.json").write_text(json.dumps(MICROSOFT_PREPROCESSOR))
    tiny = transformers.CvtConfig(
        embed_dim=TINY_SPEC["DIM_EMBED"], num_heads=TINY_SPEC["NUM_HEADS"], depth=TINY_SPEC["DEPTH"],
        id2label=dict(enumerate(DISPLAY_NAMES)), label2id={c: i for i, c in enumerate(DISPLAY_NAMES)},
    )
    user = _save_hf(cache, "someone/cvt-tiny", tiny)
    not_cvt = _snapshot(cache, "someone/vit")
    not_cvt.mkdir(parents=True)
    (not_cvt / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return {"cache": cache, "user_model": user}


def _snapshot_folder(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


@pytest.fixture
def offline(hub_cache, monkeypatch) -> dict:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at the built cache, for this process (huggingface_hub reads
    both at import) and for subprocesses."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache["cache"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache["cache"]))
    return hub_cache


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow
def test_every_path_to_a_tag_loads_strictly_runs_quick_gelu_and_equals_the_folder(offline, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    folder_model, ckpt = model_from_checkpoint(_snapshot_folder(offline["cache"], "microsoft/cvt-13"))
    expected = _logits(folder_model, x)
    assert folder_model.act == "quick_gelu"
    assert ckpt.class_names[:2] == ["class0", "class1"] and len(ckpt.class_names) == 1000

    cfg = load_config("cvt-13-224x224", ["MODEL.PRETRAINED", "cvt-13"])
    from_config = build_model(cfg)
    load_pretrained(cfg, from_config)
    models = {
        "create_model": cvt.create_model("cvt-13", pretrained=True),
        "hf-hub": cvt.create_model("cvt-13", pretrained="hf-hub:microsoft/cvt-13"),
        "hf-hub@commit": cvt.create_model("cvt-13", pretrained=f"hf-hub:microsoft/cvt-13@{COMMIT}"),
        "MODEL.PRETRAINED": from_config,
        "predict": Predictor("cvt-13", device="cpu").model,
        "timm": timm.create_model("cvt_13.ms_in1k", pretrained=True),
        "torch.hub": torch.hub.load(str(REPO), "cvt_13", source="local", pretrained=True),
    }
    for name, model in models.items():
        assert model.act == "quick_gelu", name
        assert torch.equal(_logits(model, x), expected), name
    # The activation matters: exact GELU on the same weights gives other logits.
    assert not torch.allclose(_logits(cvt.create_model("cvt-13", pretrained=True, act="gelu"), x), expected, atol=1e-4)


def test_a_tag_brings_timms_data_config_through_every_entry_point(offline):
    # A 384 tag (the same architecture: CvT-13's files serve), whose test transform is not timm's default.
    snapshot = _snapshot(offline["cache"], "microsoft/cvt-13-384")
    snapshot.mkdir(parents=True)
    for file in _snapshot_folder(offline["cache"], "microsoft/cvt-13").iterdir():
        (snapshot / file.name).symlink_to(file)
    expected = timm.data.resolve_model_data_config(timm.create_model("cvt_13.ms_in1k_384", pretrained=True))
    assert expected["input_size"] == (3, 384, 384) and expected["crop_pct"] == 1.0
    for model in (cvt.create_model("cvt-13-384", pretrained=True), cvt.create_model("cvt-13", pretrained="cvt-13-384"),
                  torch.hub.load(str(REPO), "cvt_13_384", source="local", pretrained=True)):
        assert timm.data.resolve_model_data_config(model) == expected
    assert not hasattr(cvt.create_model("cvt-13"), "pretrained_cfg")  # no weights, nothing to say


def test_a_tag_brings_its_test_transform_and_class_names(offline):
    predictor = Predictor("cvt-13", device="cpu")
    assert eval_transform_settings(predictor.cfg) == PUBLISHED["cvt-13"].eval_settings()
    assert predictor.class_names[999] == "class999"


@pytest.mark.parametrize("tag", list(PUBLISHED))
def test_each_tag_tests_as_its_packaged_experiment_and_timm_agrees(tag):
    """The tag's transform is the packaged experiment's; timm's data config gives the same pixels."""
    weights = PUBLISHED[tag]
    cfg = load_config(weights.experiment)
    assert eval_transform_settings(cfg) == weights.eval_settings()
    assert cvt.models.model_spec(tag) == cvt.models.model_spec(weights.variant)
    data_config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(weights.timm_name).to_dict())
    assert data_config["input_size"] == (3, weights.image_size, weights.image_size)
    assert timm.models.get_pretrained_cfg(weights.timm_name).hf_hub_id == weights.repo
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 420, 3), dtype=np.uint8))
    theirs = timm.data.create_transform(**data_config)(image)
    ours = build_transform(cfg, is_train=False)(image)
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-5


def test_timm_features_only_gives_the_three_stage_maps():
    model = timm.create_model("cvt_13", features_only=True, out_indices=(0, 1, 2))
    maps = model(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 24), (1, 192, 8, 12), (1, 384, 4, 6)]
    assert model.feature_info.channels() == [64, 192, 384] and model.feature_info.reduction() == [4, 8, 16]


def test_timm_s_standard_arguments_build_the_model_as_its_train_script_passes_them():
    # timm's train.py passes drop_rate (0.0 by default) to every model; it was a TypeError here.
    model = timm.create_model("cvt_13", num_classes=10, drop_rate=0.0, drop_path_rate=0.2, in_chans=3)
    assert model.spec.drop_rate == (0.0, 0.0, 0.0) and model.spec.drop_path_rate == (0.0, 0.0, 0.2)
    model = timm.create_model("cvt_21", drop_rate=0.1)
    assert model.spec.drop_rate == (0.1, 0.1, 0.1)
    assert model.stage1.blocks[0].mlp.drop.p == model.stage2.blocks[-1].attn.proj_drop.p == 0.1
    assert model.stage0.pos_drop.p == 0.1 and model.spec.depth == (1, 4, 16)


def test_a_users_repo_runs_gelu_as_transformers_trained_it(offline, caplog):
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.INFO):
        model, ckpt = model_from_checkpoint("hf-hub:someone/cvt-tiny")
    assert model.act == "gelu" and "not one of the published checkpoints" in caplog.text
    assert ckpt.class_names == DISPLAY_NAMES
    with torch.no_grad():
        theirs = offline["user_model"](x).logits
    assert (_logits(model, x) - theirs).abs().max() < 2e-5
    asked, _ = model_from_checkpoint("hf-hub:someone/cvt-tiny", act="quick_gelu")
    assert asked.act == "quick_gelu" and (_logits(asked, x) - theirs).abs().max() > 1e-4


def test_model_pretrained_takes_a_repo_and_model_activation_overrides_it(offline, caplog):
    opts = ["MODEL.NUM_CLASSES", "3", *(x for k in ("DIM_EMBED", "NUM_HEADS", "DEPTH") for x in (f"MODEL.SPEC.{k}", str(TINY_SPEC[k])))]
    for activation, expected in (("auto", "gelu"), ("quick_gelu", "quick_gelu")):
        cfg = load_config(None, [*opts, "MODEL.PRETRAINED", "hf-hub:someone/cvt-tiny", "MODEL.ACTIVATION", activation])
        model = build_model(cfg)
        with caplog.at_level(logging.WARNING):
            load_pretrained(cfg, model)
        assert model.act == expected
    assert "was trained with gelu" in caplog.text


def test_cli_predict_test_info_and_export_by_name(offline, tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--model", "cvt-13", str(image), "--topk", "3", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert len(predictions) == 3 and predictions[0]["class"] == f"class{predictions[0]['index']}"

    data = make_image_folder(tmp_path / "data")
    opts = ["MODEL.SPEC.DEPTH", str(TINY_SPEC["DEPTH"])]
    cfg_file = tmp_path / "tiny.yaml"
    config(data, tmp_path / "out", *opts).dump(stream=cfg_file.open("w"))
    # Display names are no folder names: outputs follow the sorted folders by index, as the release tests.
    assert main(["test", "--model", "hf-hub:someone/cvt-tiny", "--cfg", str(cfg_file)]) == 0
    result = json.loads((tmp_path / "out" / "shapes" / "tiny" / "test_metrics.json").read_text())
    assert result["model_file"] == "hf-hub:someone/cvt-tiny" and result["images"] == 11

    assert main(["info", "--model", "cvt-13-384", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == [384, 384]

    out = tmp_path / "tiny.safetensors"
    assert main(["export", "--model", "hf-hub:someone/cvt-tiny", "--format", "safetensors", str(out)]) == 0
    assert cvt.read_checkpoint(out).act == "gelu"


@pytest.fixture()
def image_here(tmp_path, monkeypatch) -> None:
    """`x.png` in the working directory: predict checks its images before it reads the weights."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save("x.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--model", "cvt-21", "x.png"], "microsoft/cvt-21 is not in the Hugging Face cache"),
        (["predict", "--model", "cvt-21", "x.png"], "`hf download microsoft/cvt-21`, or unset HF_HUB_OFFLINE"),
        (["predict", "--model", "hf-hub:microsoft/cvt-13@v2", "x.png"], "hf download microsoft/cvt-13 --revision v2"),
        (["predict", "--model", "cvt-99", "x.png"], "unknown pretrained tag 'cvt-99'; choose one of cvt-13,"),
        (["predict", "--model", "hf-hub:someone/vit", "x.png"], "someone/vit is not a CvT (its config.json says model_type 'vit')"),
        (["predict", "--model", "hf-hub:nobody", "x.png"], "a hub repo is named hf-hub:org/name"),
        (["test", "--model", "hf-hub:someone/cvt-tiny"], "give --cfg"),
        # The missing dataset, not the weights that are not cached (nor, online, fetched first).
        (["test", "--model", "cvt-21", "DATASET.ROOT", "/no/imagenet"], "DATASET.ROOT: folder /no/imagenet not found"),
    ],
)
def test_failures_are_one_line_naming_the_repo_and_the_fix(offline, capsys, argv, message, image_here):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_download_cut_off_leaves_nothing_a_later_run_trusts(offline, capsys, image_here):
    """huggingface_hub writes blobs/<etag>.incomplete and links the file into the snapshot only when
    complete: a snapshot holding only the partial blob is 'not cached', never read."""
    root = offline["cache"] / "models--microsoft--cvt-21"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    (root / "snapshots" / COMMIT).mkdir(parents=True)
    (root / "snapshots" / COMMIT / "config.json").write_text(json.dumps({"model_type": "cvt"}))
    (root / "blobs").mkdir()
    (root / "blobs" / "0f1e2d.incomplete").write_bytes(b"PK\x03\x04 half a file")
    assert main(["predict", "--model", "cvt-21", "x.png"]) == 2
    assert "is not in the Hugging Face cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    "failure, message",
    [
        (lambda: huggingface_hub.errors.LocalEntryNotFoundError("connection refused"), "cannot reach the Hugging Face hub for microsoft/cvt-21"),
        # What huggingface_hub's HTTP client raises when the connection drops mid-file.
        (lambda: TransportError("peer closed connection without sending complete message body"),
         "downloading config.json of microsoft/cvt-21 failed (peer closed connection"),
    ],
)
def test_a_failed_download_is_one_line(monkeypatch, capsys, failure, message, image_here):
    """Online failures, as huggingface_hub reports them after its own retries, each one line."""
    def fail(*args, **kwargs):
        raise failure()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(cvt.weights.hub, "hf_hub_download", fail)
    assert main(["predict", "--model", "cvt-21", "x.png"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_detection_backbone_trains_a_faster_rcnn_step():
    from torchvision.models.detection import FasterRCNN

    backbone = cvt.detection_backbone(cvt.create_model(TINY_SPEC), out_channels=32)
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).train()
    features = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
    losses = detector([torch.rand(3, 64, 64)], [target])
    loss = sum(losses.values())
    loss.backward()
    assert torch.isfinite(loss) and backbone.body.stage0.patch_embed.proj.weight.grad.abs().sum() > 0
    optimizer.step()


@pytest.mark.slow
def test_import_cvt_registers_with_timm_without_loading_torch():
    code = (
        "import sys, cvt; assert 'torch' not in sys.modules; import timm; "
        "print(sorted(timm.list_pretrained('cvt_*')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True).stdout
    assert eval(out) == sorted(w.timm_name for w in PUBLISHED.values())


def test_torch_hub_has_one_entry_point_per_tag():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # torch.hub.list's rule (it reads only GitHub repos): every public callable is an entry point.
    entry_points = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entry_points == {t.replace("-", "_") for t in PUBLISHED}
    model = torch.hub.load(str(REPO), "cvt_21_384", source="local", num_classes=10)
    assert model.spec == cvt.models.model_spec("cvt-21") and model.num_classes == 10

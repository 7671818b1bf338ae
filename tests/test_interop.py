"""Weight formats: official, training checkpoints, Hugging Face, the project's own; strict and safe."""
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

import cvt
from cvt import UserError, create_model, load_checkpoint, read_checkpoint
from cvt.config import load_config
from cvt.data.transforms import build_transform, eval_transform_settings
from cvt.models.convert import hf_config_from_spec, hf_to_official, hf_unsupported, official_to_hf
from cvt.weights.hf_preprocessor import eval_settings_from_hf_preprocessor

from helpers import TINY_SPEC

transformers = pytest.importorskip("transformers")


def _random_bn_stats(model: torch.nn.Module) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)


def _hf_model(num_labels: int = 7, **overrides) -> "transformers.CvtForImageClassification":
    # depth[i] > i: transformers' CvT indexes its drop-path list by stage number.
    config = transformers.CvtConfig(
        num_labels=num_labels, embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], **overrides
    )
    model = transformers.CvtForImageClassification(config).eval()
    _random_bn_stats(model)
    return model


# transformers' own CvT crashes on 'avg' projections and without a last-stage cls token, so only
# the published layout is compared with it.
def test_hugging_face_folder_gives_the_same_logits(tmp_path):
    """transformers runs exact GELU: asked for, the same function gives the same logits."""
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    model, ckpt = cvt.model_from_checkpoint(tmp_path, act="gelu")
    model.eval()
    assert ckpt.format == "huggingface" and model.act == "gelu"
    assert ckpt.class_names == [f"LABEL_{i}" for i in range(7)]
    x = torch.randn(3, 3, 96, 80)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 2e-5
        assert (hf(x[:1]).logits - model(x[:1])).abs().max() <= 2e-5


def test_hugging_face_files_run_quick_gelu_unless_told_and_say_why(tmp_path, caplog):
    """A Hugging Face layout file outside the hub cache does not say its activation: QuickGELU (the
    release's, which Microsoft's copies need), logged with how to switch; act='gelu' switches."""
    hf = _hf_model()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = create_model(TINY_SPEC, num_classes=7).eval()
    with caplog.at_level(logging.INFO):
        load_checkpoint(model, tmp_path / "pytorch_model.bin")
    assert model.act == "quick_gelu" and "act='gelu'" in caplog.text
    load_checkpoint(model, tmp_path / "pytorch_model.bin", act="gelu")
    assert model.act == "gelu"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 2e-5


def test_export_to_hugging_face_and_back(tmp_path):
    model = create_model(TINY_SPEC, num_classes=5, act="gelu").eval()
    _random_bn_stats(model)
    cvt.save_hf(model, tmp_path, class_names=list("abcde"))
    hf = transformers.CvtForImageClassification.from_pretrained(tmp_path).eval()
    assert hf.config.id2label[4] == "e"
    x = torch.randn(2, 3, 72, 64)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 2e-5
    back, ckpt = cvt.model_from_checkpoint(tmp_path, act="gelu")
    assert ckpt.class_names == list("abcde")
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))


def _transformers_runs(spec: dict) -> bool:
    """Whether transformers' own CvT builds and runs a model of `spec` (our keys) in its layout."""
    config = transformers.CvtConfig(**hf_config_from_spec(spec, 3))
    try:
        with torch.no_grad():
            transformers.CvtForImageClassification(config).eval()(torch.randn(1, 3, 32, 32))
    except (IndexError, AttributeError):  # what its CvT raises on these specs
        return False
    return True


@pytest.mark.parametrize("changes", [
    {},
    {"DEPTH": [1, 2, 2]},  # the digits demo's depths
    {"DEPTH": [0, 2, 3]},  # an empty stage never reads its drop-path list
    {"DEPTH": [2, 1, 3]},
    {"QKV_PROJ_METHOD": ["dw_bn", "avg", "dw_bn"]},
    {"QKV_PROJ_METHOD": ["linear"] * 3},
    {"CLS_TOKEN": [False] * 3},
])
def test_hf_export_refuses_exactly_what_transformers_cannot_run(tmp_path, changes):
    model = create_model(dict(TINY_SPEC, **changes), num_classes=3, act="gelu").eval()
    spec = model.spec.to_dict()
    runs = _transformers_runs(spec)
    assert (hf_unsupported(spec) is None) == runs
    if runs:
        cvt.save_hf(model, tmp_path)
        hf = transformers.CvtForImageClassification.from_pretrained(tmp_path).eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max() <= 2e-5
    else:
        with pytest.raises(UserError, match="transformers' CvtForImageClassification cannot run this model"):
            cvt.save_hf(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("size, center_crop", [(224, True), (384, False)])
def test_hugging_face_preprocessor_matches_the_test_transform(tmp_path, size, center_crop):
    """The exported preprocessor_config.json makes transformers' image processor give the pixels our
    test transform gives (the release's recipes: crop at 224, plain resize at 384), and Microsoft's
    own files (no cvt key) read back as those settings."""
    import numpy as np
    from PIL import Image

    cfg = load_config(None, ["TEST.IMAGE_SIZE", f"[{size}, {size}]", "TEST.CENTER_CROP", str(center_crop)])
    settings = eval_transform_settings(cfg)
    cvt.save_hf(create_model(TINY_SPEC, num_classes=2, act="gelu"), tmp_path, eval_settings=settings)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 420, 3), dtype=np.uint8))
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    ours = build_transform(cfg, is_train=False)(image)
    assert theirs.shape == ours.shape == (3, size, size)
    assert (theirs - ours).abs().mean() < 1e-3  # measured 8.5e-5: rounding of the resampling only
    assert read_checkpoint(tmp_path).eval_settings == settings
    written = json.loads((tmp_path / "preprocessor_config.json").read_text())
    del written["cvt_eval_transform"]  # as on the Hugging Face hub
    assert eval_settings_from_hf_preprocessor(written) == settings


def test_legacy_hugging_face_preprocessor_files_are_read():
    """The older feature-extractor format (an int size), as the hub's CvT folders have it."""
    legacy = {"feature_extractor_type": "ConvNextFeatureExtractor", "size": 224, "crop_pct": 0.875, "resample": 3,
              "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    assert eval_settings_from_hf_preprocessor(legacy) == {
        "TEST.IMAGE_SIZE": [224, 224], "TEST.CENTER_CROP": True, "TEST.INTERPOLATION": 3,
        "INPUT.MEAN": [0.485, 0.456, 0.406], "INPUT.STD": [0.229, 0.224, 0.225],
    }
    assert eval_settings_from_hf_preprocessor({**legacy, "size": 384})["TEST.CENTER_CROP"] is False
    for unusable in ({**legacy, "crop_pct": 0.9}, {**legacy, "size": "big"}, {"feature_extractor_type": "ViTFeatureExtractor"}, []):
        assert eval_settings_from_hf_preprocessor(unusable) is None


def test_export_warns_where_transformers_cannot_express_the_transform(tmp_path, caplog):
    cfg = load_config(None, ["TEST.IMAGE_SIZE", "[32, 32]", "TEST.CENTER_CROP", "False"])  # the digits demo's
    with caplog.at_level(logging.WARNING):
        cvt.save_hf(create_model(TINY_SPEC, num_classes=2, act="gelu"), tmp_path, eval_settings=eval_transform_settings(cfg))
    assert "cannot express this test transform" in caplog.text
    assert read_checkpoint(tmp_path).eval_settings == eval_transform_settings(cfg)  # cvt reads it exactly


def test_bare_hugging_face_backbone_loads_with_fresh_norm_and_head(caplog):
    hf = _hf_model()
    backbone = {k[len("cvt."):]: v for k, v in hf.state_dict().items() if k.startswith("cvt.")}
    model = create_model(TINY_SPEC, num_classes=3)
    with caplog.at_level(logging.INFO):
        load_checkpoint(model, backbone)
    assert "head" in caplog.text and model.head.out_features == 3
    assert torch.equal(model.stage2.cls_token, hf.cvt.encoder.stages[2].cls_token)


def test_key_mapping_is_a_bijection(official_keys):
    keys = official_keys["cvt-13-224x224"]
    state = {k: torch.empty(0) for k in keys}
    hf_keys = official_to_hf(state)
    assert len(hf_keys) == len(keys)
    assert set(hf_to_official(hf_keys)) == set(keys)
    hf_names = set(transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=1000)).state_dict())
    assert set(hf_keys) == hf_names


def test_official_formats_and_prefixes(tmp_path):
    source = create_model(TINY_SPEC, num_classes=4)
    sd = source.state_dict()
    files = {
        "zoo.pth": sd,
        "training.pth": {"state_dict": sd, "optimizer": {}, "epoch": 3, "perf": 80.1},
        "ddp.pth": {f"module.{k}": v for k, v in sd.items()},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        model = create_model(TINY_SPEC, num_classes=4)
        load_checkpoint(model, tmp_path / name)
        assert torch.equal(model.state_dict()["stage1.blocks.1.mlp.fc2.weight"], sd["stage1.blocks.1.mlp.fc2.weight"]), name


def test_official_export_has_exactly_the_release_keys(tmp_path, official_keys):
    model = create_model("cvt-13")
    cvt.save_official(model, tmp_path / "model.pth")
    saved = torch.load(tmp_path / "model.pth", weights_only=True)
    assert {k: list(v.shape) for k, v in saved.items()} == {k: list(v) for k, v in official_keys["cvt-13-224x224"].items()}


def test_safetensors_round_trip_keeps_spec_activation_and_class_names(tmp_path):
    model = create_model({**TINY_SPEC, "CLS_TOKEN": [False] * 3}, num_classes=3, act="gelu").eval()
    cvt.save_safetensors(model, tmp_path / "m.safetensors", class_names=["cat", "dog", "eel"])
    back, ckpt = cvt.model_from_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.class_names == ["cat", "dog", "eel"] and back.act == "gelu"
    assert back.spec == model.spec
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))


def test_named_variant_is_recognised_from_shapes(tmp_path):
    torch.save(create_model("cvt-13", num_classes=10).state_dict(), tmp_path / "zoo.pth")
    model, _ = cvt.model_from_checkpoint(tmp_path / "zoo.pth")
    assert model.spec == create_model("cvt-13").spec and model.num_classes == 10


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    sd = create_model(TINY_SPEC, num_classes=4).state_dict()
    del sd["stage0.blocks.0.norm1.weight"]
    sd["stage9.extra"] = torch.zeros(1)
    sd["stage1.patch_embed.proj.bias"] = torch.zeros(5)
    with pytest.raises(UserError) as err:
        load_checkpoint(create_model(TINY_SPEC, num_classes=4), sd)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing [stage0.blocks.0.norm1.weight]" in msg
    assert "1 unexpected [stage9.extra]" in msg
    assert "stage1.patch_embed.proj.bias: file (5,) vs model (32,)" in msg


def test_class_count_mismatch_says_how_to_fix_it():
    sd = create_model(TINY_SPEC, num_classes=10).state_dict()
    with pytest.raises(UserError, match="file has 10 classes and the model 4.*NUM_CLASSES"):
        load_checkpoint(create_model(TINY_SPEC, num_classes=4), sd)


def test_long_mismatch_lists_are_cut_with_counts():
    sd = create_model(TINY_SPEC).state_dict()
    with pytest.raises(UserError, match=r"missing \[.* and \d+ more\]"):
        load_checkpoint(create_model("cvt-13"), {k: v for k, v in sd.items() if not k.startswith("stage2")})


def test_backbone_only_reinitialises_the_head(caplog):
    source = create_model(TINY_SPEC, num_classes=10)
    model = create_model(TINY_SPEC, num_classes=3)
    with caplog.at_level(logging.INFO):
        load_checkpoint(model, source.state_dict(), backbone_only=True)
    assert "head (3 classes) is freshly initialised" in caplog.text
    assert torch.equal(model.norm.weight, source.norm.weight)
    assert torch.equal(model.stage0.patch_embed.proj.weight, source.stage0.patch_embed.proj.weight)


def test_selected_layers_only():
    source = create_model(TINY_SPEC, num_classes=3)
    model = create_model(TINY_SPEC, num_classes=3)
    before = model.stage1.patch_embed.proj.weight.clone()
    load_checkpoint(model, source.state_dict(), layers=["stage0"])
    assert torch.equal(model.stage0.patch_embed.proj.weight, source.stage0.patch_embed.proj.weight)
    assert torch.equal(model.stage1.patch_embed.proj.weight, before)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"head.weight": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f)
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(UserError, match="refused"):
            read_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_truncated_empty_and_garbage_files_are_user_errors(tmp_path):
    torch.save(create_model(TINY_SPEC).state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for name, match in [("cut.pth", "truncated or corrupt"), ("empty.pth", "empty"), ("text.pth", "not a PyTorch checkpoint"),
                        ("cut.safetensors", "truncated or corrupt"), ("missing.pth", "does not exist")]:
        with pytest.raises(UserError, match=match):
            read_checkpoint(tmp_path / name)


def test_non_state_dict_contents_are_rejected(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="not a CvT state dict"):
        read_checkpoint(tmp_path / "odd.pth")

"""`cvt.predict.Predictor` from Python: the model, transform and class names a checkpoint carries."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cvt.config import load_config
from cvt.data import build_transform, load_rgb
from cvt.data.transforms import eval_transform_settings
from cvt.errors import UserError
from cvt.models.cvt import create_model
from cvt.predict import Predictor, image_files
from cvt.weights.export import save_official, save_safetensors
from cvt.weights.load import checkpoint_config, eval_config
from cvt.weights.read import read_checkpoint

from helpers import CLASSES, TINY_SPEC, config, make_image_folder


@pytest.fixture()
def exported(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    data = make_image_folder(tmp_path / "data")
    cfg = config(data, tmp_path / "out")
    model = create_model(TINY_SPEC, num_classes=len(CLASSES)).eval()
    path = save_safetensors(model, tmp_path / "tiny.safetensors", CLASSES, eval_transform_settings(cfg))
    return path, data, model


def test_the_checkpoint_says_how_its_images_are_preprocessed(exported):
    path, _, _ = exported
    cfg = checkpoint_config(read_checkpoint(path))
    assert list(cfg.TEST.IMAGE_SIZE) == [32, 32] and cfg.TEST.CENTER_CROP is False


def test_predictions_are_the_models_softmax_in_order(exported):
    path, data, model = exported
    files = image_files([data / "val" / "circle", data / "val" / "cross" / "0.png"])
    predictions = list(Predictor(path, device="cpu", batch_size=2).predict(files, topk=3))
    assert [p.image for p in predictions] == [str(f) for f in files]
    transform = build_transform(checkpoint_config(read_checkpoint(path)), is_train=False)
    with torch.inference_mode():
        probs = model(torch.stack([transform(load_rgb(f)) for f in files])).softmax(-1)
    for prediction, expected in zip(predictions, probs):
        assert [c["class"] for c in prediction.classes] == [CLASSES[i] for i in expected.argsort(descending=True)]
        assert prediction.classes[0]["prob"] == pytest.approx(expected.max().item(), abs=1e-6)


def test_one_path_alone_is_one_image_not_one_per_character(exported):
    path, data, _ = exported
    image = data / "val" / "circle" / "0.png"
    predictor = Predictor(path, device="cpu")
    for given in (image, str(image)):
        (prediction,) = predictor.predict(given, topk=1)
        assert prediction.image == str(image) and prediction.error is None and len(prediction.classes) == 1


def test_an_unreadable_image_is_reported_not_raised(exported, tmp_path):
    path, data, _ = exported
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    results = list(Predictor(path, device="cpu").predict([broken, data / "val" / "circle" / "0.png"]))
    assert results[0].error and "broken.png" in results[0].error and not results[0].classes
    assert results[1].error is None and len(results[1].classes) == 3


def test_an_unreadable_image_keeps_its_place_in_the_output(exported, tmp_path):
    path, data, _ = exported
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = [data / "val" / "circle" / "0.png", data / "val" / "cross" / "0.png", data / "val" / "circle" / "1.png"]
    files = [good[0], broken, good[1], good[2]]
    results = list(Predictor(path, device="cpu", batch_size=3).predict(files))
    assert [r.image for r in results] == [str(f) for f in files]
    assert [r.error is not None for r in results] == [False, True, False, False]


def test_an_imagenet_head_that_says_nothing_is_preprocessed_as_the_release_tested(tmp_path):
    # An official zoo file is a bare state dict: its test transform is the release's (bicubic).
    path = save_official(create_model(TINY_SPEC, num_classes=1000), tmp_path / "zoo.pth")
    cfg = eval_config(read_checkpoint(path))
    assert eval_transform_settings(cfg) == eval_transform_settings(load_config("cvt-13-224x224"))
    assert "bicubic" in str(build_transform(cfg, is_train=False)).lower()


def test_a_missing_image_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        image_files([tmp_path / "nope.jpg"])
    (tmp_path / "notes.txt").write_text("no image here")
    (tmp_path / "album.png").mkdir()  # a folder is no image, whatever its name
    with pytest.raises(UserError, match=r"no images found in .* \(looked for \.jpg, .*\); give image files, or folders holding them"):
        image_files([tmp_path])


def test_a_hub_repo_named_without_its_prefix_is_pointed_at_it():
    with pytest.raises(UserError, match=r"hub repo \(hf-hub:microsoft/cvt-13\)"):
        read_checkpoint("microsoft/cvt-13")


def test_the_experiment_files_activation_applies(exported, tmp_path):
    path, data, _ = exported
    cfg_file = tmp_path / "gelu.yaml"
    settings = {"MODEL": {"ACTIVATION": "gelu", "NUM_CLASSES": 3, "SPEC": TINY_SPEC},
                "TEST": {"IMAGE_SIZE": [32, 32], "CENTER_CROP": False}}
    cfg_file.write_text(yaml.safe_dump(settings))
    assert Predictor(path, device="cpu").model.act == "quick_gelu"  # what the file says
    assert Predictor(path, str(cfg_file), device="cpu").model.act == "gelu"


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_a_hugging_face_export_reads_back_with_its_activation(tmp_path, act):
    from cvt.weights.export import save_hf

    model = create_model(TINY_SPEC, num_classes=3, act=act)
    save_hf(model, tmp_path / "hf")
    assert read_checkpoint(tmp_path / "hf").act == act


def test_a_forced_hugging_face_export_leaves_no_other_models_preprocessing(exported, tmp_path):
    from cvt.weights.export import save_hf

    path, data, model = exported
    folder = tmp_path / "hf"
    save_hf(model, folder, eval_settings=read_checkpoint(path).eval_settings)
    assert (folder / "preprocessor_config.json").exists()
    with pytest.raises(UserError, match="--force"):
        save_hf(model, folder)
    save_hf(model, folder, force=True)
    assert not (folder / "preprocessor_config.json").exists()

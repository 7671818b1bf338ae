"""Deployment files (ONNX, TorchScript, torch.export): portable kernels, dynamic shapes, the metadata,
the verification that refuses a wrong file, and `cvt predict` on an ONNX file."""
import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt.cli import EXPORT_FORMATS as CLI_EXPORT_FORMATS
from cvt.cli import main
from cvt.config import load_config
from cvt.models.kernels import portable_kernels, uses_cpu_kernels
from cvt.weights import deploy as deploy_module
from cvt.weights.deploy import MAX_ABS_DIFF, deploy, read_deployed
from cvt.weights.export import EXPORT_FORMATS

from helpers import TINY_SPEC, make_image_folder

CLASS_NAMES = ["ant", "bee", "cat"]
# A non-square test transform: [width, height] as in the release, so the files are traced at 48x64.
EVAL_SETTINGS = {
    "TEST.IMAGE_SIZE": [64, 48], "TEST.CENTER_CROP": False, "TEST.INTERPOLATION": 2,
    "INPUT.MEAN": [0.5, 0.4, 0.3], "INPUT.STD": [0.2, 0.25, 0.3],
}
SUFFIX = {"onnx": "onnx", "torchscript": "pt", "exported": "pt2"}
# Batches of 1 and 3 at the traced size, and sizes it was not traced at (non-square, both ways).
SHAPES = [(1, 48, 64), (3, 48, 64), (3, 72, 40), (1, 40, 97)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class tiny model saved with its class names and test transform."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = cvt.create_model(TINY_SPEC, num_classes=3).eval()
    weights = folder / "tiny.safetensors"
    cvt.save_safetensors(model, weights, class_names=CLASS_NAMES, eval_settings=EVAL_SETTINGS)
    return model, weights, folder


@pytest.fixture(scope="module")
def exported(tiny):
    """Each format written once through the command line, shared by the tests that read them."""
    _, weights, folder = tiny
    files = {}
    for fmt in ("onnx", "torchscript", "exported"):
        files[fmt] = folder / f"tiny.{SUFFIX[fmt]}"
        assert main(["export", "--weights", str(weights), "--format", fmt, str(files[fmt])]) == 0
    return files


def test_portable_kernels_switch_the_predicate_and_restore_it():
    x = torch.zeros(1)
    assert uses_cpu_kernels(x)
    with portable_kernels():
        assert not uses_cpu_kernels(x)
        with portable_kernels():
            assert not uses_cpu_kernels(x)
        assert not uses_cpu_kernels(x)  # the inner block restores the outer one's state
    assert uses_cpu_kernels(x)
    with pytest.raises(RuntimeError), portable_kernels():
        raise RuntimeError
    assert uses_cpu_kernels(x)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_a_portable_trace_records_only_public_ops():
    model = cvt.create_model(TINY_SPEC, num_classes=3).eval()
    with torch.no_grad(), portable_kernels():
        graph = str(torch.jit.trace(model, torch.randn(2, 3, 32, 32)).inlined_graph)
    assert "mkldnn" not in graph and "aten::linear" in graph and "scaled_dot_product_attention" in graph


def test_the_cls_token_keeps_the_batch_dynamic_in_a_legacy_onnx_graph(tmp_path):
    """The issue's symptom: ONNX Runtime failed at batch 1 on a graph traced at batch 2 ("Non concat axis
    dimensions must match"), the cls token's expand having been traced as a constant."""
    ort = pytest.importorskip("onnxruntime")
    model = cvt.create_model(TINY_SPEC, num_classes=3).eval()
    path = tmp_path / "legacy.onnx"
    with torch.no_grad(), portable_kernels(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), path, dynamo=False, input_names=["image"],
                          dynamic_axes={"image": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-5)


def test_the_command_line_and_the_library_offer_the_same_formats():
    assert sorted(CLI_EXPORT_FORMATS) == sorted(EXPORT_FORMATS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
def test_round_trip_at_any_batch_and_size_with_the_metadata(tiny, exported, fmt):
    model, _, _ = tiny
    run, metadata = read_deployed(exported[fmt], fmt)
    for batch, height, width in SHAPES:
        x = torch.randn(batch, 3, height, width)
        with torch.inference_mode():
            got, expected = run(x), model(x)
        assert got.shape == (batch, 3)
        assert (got - expected).abs().max().item() <= MAX_ABS_DIFF, (fmt, batch, height, width)
    props = {key: json.loads(value) for key, value in metadata.items()}
    assert props["input_size"] == [3, 48, 64]
    assert props["resize"] == [48, 64] and props["center_crop"] is False and props["crop_pct"] == 1.0
    assert props["interpolation"] == "bilinear"
    assert props["mean"] == EVAL_SETTINGS["INPUT.MEAN"] and props["std"] == EVAL_SETTINGS["INPUT.STD"]
    assert props["class_names"] == CLASS_NAMES and props["num_classes"] == 3


@pytest.mark.slow
def test_onnx_metadata_props_are_plain_values_other_runtimes_read(exported):
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    assert json.loads(props["mean"]) == EVAL_SETTINGS["INPUT.MEAN"]
    assert json.loads(props["class_names"]) == CLASS_NAMES
    graph = onnx.load(str(exported["onnx"])).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 3 and all(d.dim_param for i, d in enumerate(dims) if i != 1)


def test_the_crop_of_an_imagenet_transform_is_described():
    props = deploy_module.deployment_metadata(load_config("cvt-13-224x224"), 1000, None)
    assert json.loads(props["input_size"]) == [3, 224, 224]
    assert json.loads(props["resize"]) == 256 and json.loads(props["center_crop"]) is True
    assert json.loads(props["crop_pct"]) == 0.875 and json.loads(props["interpolation"]) == "bicubic"
    assert "class_names" not in props


class _Off(torch.nn.Module):
    """A deliberately broken export: the model's logits, shifted by more than the tolerance."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + 10 * MAX_ABS_DIFF


def test_a_file_that_disagrees_with_the_model_is_refused_and_never_written(tiny, tmp_path, capsys, monkeypatch):
    _, weights, _ = tiny
    write = deploy_module._WRITERS["torchscript"]
    monkeypatch.setitem(deploy_module._WRITERS, "torchscript", lambda model, *args: write(_Off(model), *args))
    out = tmp_path / "broken.pt"
    assert main(["export", "--weights", str(weights), "--format", "torchscript", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "differ from the model's by 0.001" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())
    # An earlier file at that path is left as it was.
    out.write_bytes(b"an earlier export")
    assert main(["export", "--weights", str(weights), "--format", "torchscript", str(out)]) == 2
    assert out.read_bytes() == b"an earlier export" and [p.name for p in tmp_path.iterdir()] == ["broken.pt"]


def test_a_file_whose_metadata_does_not_read_back_is_refused(tiny, tmp_path, monkeypatch):
    model, _, _ = tiny
    real = deploy_module.read_deployed
    monkeypatch.setattr(deploy_module, "read_deployed", lambda path, fmt: (real(path, fmt)[0], {}))
    with pytest.raises(cvt.UserError, match="metadata read back differs"):
        deploy(model, "torchscript", tmp_path / "m.pt", load_config(None, ["TEST.IMAGE_SIZE", "[32, 32]"]))
    assert not (tmp_path / "m.pt").exists()


def test_onnx_without_the_extra_names_it(tiny, tmp_path, capsys, monkeypatch):
    _, weights, _ = tiny
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an uninstalled package looks like
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(weights), "--format", "onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install 'cvt-vision[onnx]'" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["predict", "--weights", str(out), str(weights)]) == 2
    assert "pip install 'cvt-vision[onnx]'" in capsys.readouterr().err


def test_a_deployment_needs_to_know_the_preprocessing(tmp_path, capsys):
    weights = tmp_path / "bare.safetensors"
    cvt.save_safetensors(cvt.create_model(TINY_SPEC, num_classes=3), weights)
    assert main(["export", "--weights", str(weights), "--format", "torchscript", str(tmp_path / "m.pt")]) == 2
    assert "does not say how its images were preprocessed" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_predict_on_an_onnx_file_uses_its_metadata(tiny, exported, tmp_path, capsys):
    _, weights, _ = tiny
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(images / f"{i}.png")
    argv = [str(images), "--json", "--topk", "3", "--batch-size", "2"]
    assert main(["predict", "--weights", str(weights), *argv]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["predict", "--weights", str(exported["onnx"]), *argv]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in got] == [r["image"] for r in expected]
    for g, e in zip(got, expected):
        assert [p["class"] for p in g["predictions"]] == [p["class"] for p in e["predictions"]]
        assert [p["prob"] for p in g["predictions"]] == pytest.approx([p["prob"] for p in e["predictions"]], abs=1e-5)
    assert main(["predict", "--weights", str(exported["onnx"]), "--device", "cuda", str(images)]) == 2
    assert "--device cpu" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
def test_cvt13_layout_round_trip(tmp_path, fmt):
    pytest.importorskip("onnxruntime")
    model = cvt.create_model("cvt-13").eval()
    out = tmp_path / f"cvt13.{SUFFIX[fmt]}"
    diff = deploy(model, fmt, out, load_config("cvt-13-224x224"))
    assert diff <= MAX_ABS_DIFF
    run, metadata = read_deployed(out, fmt)
    x = torch.randn(2, 3, 160, 192)
    with torch.inference_mode():
        assert (run(x) - model(x)).abs().max().item() <= MAX_ABS_DIFF
    assert json.loads(metadata["input_size"]) == [3, 224, 224]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_a_deployment_file_given_as_weights_is_named_not_called_corrupt(exported, tmp_path, capsys, fmt):
    kind = {"torchscript": "TorchScript", "exported": "torch.export"}[fmt]
    image = tmp_path / "0.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.load's warning about TorchScript archives must not leak
        for argv in (["predict", "--weights", str(exported[fmt]), str(image)],
                     ["export", "--weights", str(exported[fmt]), "--format", "official", str(tmp_path / "o.pth")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"is a {kind} deployment file" in err and "corrupt" not in err
            assert "the checkpoint it was exported from" in err and ".onnx" in err


def test_an_onnx_file_given_as_a_checkpoint_is_named(tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x08\x12\x07pytorch")  # how an ONNX protobuf starts: ir_version, producer
    for argv in (["export", "--weights", str(onnx_file), "--format", "official", str(tmp_path / "o.pth")],
                 ["test", "--cfg", "cvt-digits", "DATASET.ROOT", str(make_image_folder(tmp_path / "data")),
                  "MODEL.NUM_CLASSES", "3", "TEST.MODEL_FILE", str(onnx_file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"'{onnx_file}' is an ONNX deployment file (`cvt export`), not a checkpoint" in err
        assert "`cvt predict` runs the .onnx file itself" in err and "is not a PyTorch checkpoint" not in err

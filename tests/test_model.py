"""The network itself: published layout and sizes, shapes, backbone API, overrides."""
import pytest
import timm
import torch

import cvt
from cvt import UserError, create_model
from cvt.models import CvtSpec

from helpers import TINY_SPEC

PUBLISHED = {"cvt-13-224x224": "cvt-13", "cvt-21-224x224": "cvt-21", "cvt-w24-384x384": "cvt-w24"}
PARAMS = {"cvt-13": 19_997_480, "cvt-21": 31_622_696, "cvt-w24": 277_196_392}


def _state_dict_from_shapes(shapes: dict) -> dict:
    return {
        k: torch.zeros((), dtype=torch.long) if k.endswith("num_batches_tracked") else torch.randn(shape)
        for k, shape in shapes.items()
    }


@pytest.mark.parametrize("file_name", sorted(PUBLISHED))
def test_every_published_key_and_shape_loads_strictly(file_name, official_keys):
    shapes = official_keys[file_name]
    model = create_model(PUBLISHED[file_name])
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: list(v) for k, v in shapes.items()}
    state_dict = _state_dict_from_shapes(shapes)
    cvt.load_checkpoint(model, state_dict)
    assert torch.equal(model.state_dict()["head.weight"], state_dict["head.weight"])


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_equal_the_paper(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMS[name]


def test_list_models():
    assert cvt.list_models() == ["cvt-13", "cvt-21", "cvt-w24"]
    assert cvt.list_models(pretrained=True) == [
        "cvt-13", "cvt-13-384", "cvt-13-384-22k", "cvt-21", "cvt-21-384", "cvt-21-384-22k", "cvt-w24-384-22k"
    ]


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="cvt-13"):
        create_model("cvt-99")


def test_batch_one_keeps_the_batch_dimension():
    model = create_model(TINY_SPEC, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (97, 61)])
def test_any_input_size(size):
    model = create_model(TINY_SPEC, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 5)


@pytest.mark.parametrize("method", [["dw_bn"] * 3, ["avg"] * 3, ["linear"] * 3, ["linear", "avg", "dw_bn"]])
@pytest.mark.parametrize("cls_token", [[False, False, True], [False, False, False]])
def test_projection_methods_and_cls_token(method, cls_token):
    model = create_model({**TINY_SPEC, "QKV_PROJ_METHOD": method, "CLS_TOKEN": cls_token}, num_classes=3)
    out = model(torch.randn(2, 3, 64, 48))
    out.sum().backward()
    assert out.shape == (2, 3)
    has_conv = "stage0.blocks.0.attn.conv_proj_q.conv.weight" in model.state_dict()
    assert has_conv == (method[0] == "dw_bn")
    assert ("stage2.cls_token" in model.state_dict()) == cls_token[-1]


def test_stage_feature_maps_for_dense_prediction():
    """timm's forward_intermediates contract: (final features, maps), indices, output_fmt, norm."""
    model = create_model("cvt-13").eval()
    x = torch.randn(2, 3, 224, 160)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [tuple(m.shape) for m in maps] == [(2, 64, 56, 40), (2, 192, 28, 20), (2, 384, 14, 10)]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, maps[1:])] == [True, True]
        (first,) = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(first, maps[0].permute(0, 2, 3, 1))
        (normed,) = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        assert torch.allclose(normed.flatten(2).transpose(1, 2), model.norm(maps[2].flatten(2).transpose(1, 2)))
    assert final.shape == (2, 1, 384)
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16]


def test_stopping_early_returns_the_last_stage_run_as_timm_s_hierarchical_models():
    """stop_early with the final features asked for: the final LayerNorm has the last stage's width, so
    the last stage run's map comes back un-normed (it was a shape error)."""
    model = create_model(TINY_SPEC, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        last, taken = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        assert [torch.equal(a, b) for a, b in zip(taken, maps[:2])] == [True, True] and len(taken) == 2
        assert torch.equal(last, maps[1])
        final, _ = model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        assert torch.equal(final, model.forward_features(x))


def test_pruning_the_last_stage_drops_the_final_norm_and_head_that_only_fit_it():
    """As timm's hierarchical models: the features become the last kept stage's (it was a shape error)."""
    model = create_model(TINY_SPEC).eval()
    assert model.prune_intermediate_layers([0, 1], prune_norm=False, prune_head=False) == [0, 1]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, norm=True, intermediates_only=True)
        assert [m.shape[1] for m in maps] == [16, 32]
        assert model(x).shape == (1, 32) and model.num_features == 32
    assert model.global_pool == "avg"  # the cls token left with the last stage: the mean token now


def test_forward_is_features_then_head():
    model = create_model(TINY_SPEC, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1, 48)
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 48)


def test_mean_pooling_without_cls_token():
    model = create_model({**TINY_SPEC, "CLS_TOKEN": [False] * 3}, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 16, 48)
        assert torch.allclose(model(x), model.head(feats.mean(1)))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(1)
        model = create_model(TINY_SPEC, num_classes=3, grad_checkpointing=enabled)
        model(x).sum().backward()
        grads.append(model.stage1.blocks[0].mlp.fc1.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_overrides_drop_path_and_activation():
    model = create_model("cvt-13", drop_path_rate=0.2, act="gelu")
    assert model.spec.drop_path_rate == (0.0, 0.0, 0.2)
    assert model.stage2.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert model.stage2.blocks[0].mlp.act == "gelu"
    with pytest.raises(UserError, match="quick_gelu"):
        create_model(TINY_SPEC, act="relu")


def test_published_init():
    model = create_model(TINY_SPEC, num_classes=10)
    fc = model.stage2.blocks[0].mlp.fc1
    assert fc.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert fc.weight.abs().max() <= 2.0 and not fc.bias.any()
    bn = model.stage0.blocks[0].attn.conv_proj_k.bn
    assert bn.weight.eq(1).all() and not bn.bias.any()
    assert model.stage2.cls_token.std().item() == pytest.approx(0.02, rel=0.5)
    xavier = create_model({**TINY_SPEC, "INIT": "xavier"}, num_classes=10)
    bound = (6 / (48 + 192)) ** 0.5
    w = xavier.stage2.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_reset_classifier_takes_timms_global_pool():
    model = create_model(TINY_SPEC, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.global_pool == "token"
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        model.reset_classifier(0, "")  # timm's idiom for features without pooling or head
        assert torch.equal(model(x), features) and model(x).shape == (2, 1, 48)
        model.reset_classifier(5, "token")
        assert model(x).shape == (2, 5) and torch.equal(model.forward_head(features, pre_logits=True), pooled)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, "max")
    unpooled = timm.create_model("cvt_13", num_classes=0, global_pool="")  # as timm's train.py passes --gp
    assert unpooled.global_pool == "" and unpooled(torch.randn(1, 3, 64, 64)).shape == (1, 1, 384)
    assert cvt.create_model("cvt-13", num_classes=0, global_pool="").global_pool == ""
    without_cls = create_model(dict(TINY_SPEC, CLS_TOKEN=[False, False, False]), num_classes=3)
    assert without_cls.global_pool == "avg"
    with pytest.raises(ValueError, match="global_pool"):
        without_cls.reset_classifier(3, "token")


def test_head_bias_keeps_pytorch_default_init_as_the_release():
    """The release's init skips the head, whose bias keeps nn.Linear's uniform(+-1/sqrt(fan_in));
    every other Linear bias is zero. A re-initialised head (fine-tuning) is built the same way."""
    model = create_model(TINY_SPEC, num_classes=1000)
    bound = 1 / 48 ** 0.5
    for head in (model.head, (model.reset_classifier(500), model.head)[1]):
        bias = head.bias.detach()
        assert bias.abs().max() <= bound and bias.abs().max() > 0.9 * bound
        assert bias.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.15)  # uniform, not zero
        assert head.weight.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"NUM_HEADS": [3, 2, 3]}, "does not divide"),
        ({"DEPTH": [1, 1]}, "one per stage"),
        ({"QKV_PROJ_METHOD": ["dw_bn", "conv", "dw_bn"]}, "not one of"),
        ({"POS_EMBED": [True, False, False]}, "positional"),
        ({"KERNEL": [3, 3, 3]}, "unknown MODEL.SPEC key"),
    ],
)
def test_invalid_specs_are_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        create_model({**TINY_SPEC, **bad})


def test_spec_round_trips_through_the_release_keys():
    spec = CvtSpec.from_dict(TINY_SPEC)
    assert CvtSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["DIM_EMBED"] == [16, 32, 48]
    assert CvtSpec().min_input_size() == 3

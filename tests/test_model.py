import time

import pytest
import torch

from ascension_cli.config import option_name
from ascension_cli.errors import ConfigError, WeightsError
from ascension_cli.model.backbone import ModelSpec, build_model, model_from_spec
from tests.conftest import LITE0_WEIGHTS


def test_backbone_and_head_give_normalised_embeddings():
    model, spec = build_model("test_convnext", embedding_dim=24, pretrained=False, image_size=32)
    images = torch.randn(3, 3, 32, 32)
    embeddings = model(images)
    features = model.features(images)
    assert embeddings.shape == (3, 24) and features.shape == (3, spec.num_features)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)


def test_spec_takes_input_size_and_normalisation_from_timm():
    _, spec = build_model("test_efficientnet", pretrained=False)
    assert spec.image_size == 160
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    _, sized = build_model("test_efficientnet", pretrained=False, image_size=48, head="linear")
    assert sized.image_size == 48 and sized.head == "linear"


def test_spec_round_trip_rebuilds_the_same_shape():
    model, spec = build_model("test_convnext", embedding_dim=16, pretrained=False)
    rebuilt = model_from_spec(ModelSpec.from_dict(spec.to_dict()))
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt.eval()(images), model.eval()(images))


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet9000'"):
        build_model("resnet9000", pretrained=False)


def test_pretrained_without_network_fails_fast_naming_the_ways_out(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(WeightsError) as caught:
        build_model("test_convnext", pretrained=True)
    assert time.perf_counter() - started < 15
    assert "weights" in str(caught.value) and "no_pretrained" in str(caught.value)
    spelled = caught.value.render(option_name)  # as the command line says it
    assert "--weights" in spelled and "--no-pretrained" in spelled


def test_pretrained_with_hub_offline_fails_at_once():
    started = time.perf_counter()
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        build_model("test_convnext", pretrained=True)
    assert time.perf_counter() - started < 2


def test_weights_file_of_another_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"not.a.key": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="cannot load"):
        build_model("test_convnext", weights=path)


@pytest.mark.skipif(not LITE0_WEIGHTS.is_file(), reason="../shared/weights is not present")
def test_real_pretrained_weights_load_offline():
    model, spec = build_model("tf_efficientnet_lite0", weights=LITE0_WEIGHTS)
    assert spec.num_features == 1280 and spec.mean == (0.5, 0.5, 0.5)
    # Real ImageNet weights: the stem is not at its random initialisation.
    fresh, _ = build_model("tf_efficientnet_lite0", pretrained=False)
    stem = "backbone.conv_stem.weight"
    assert not torch.equal(model.state_dict()[stem], fresh.state_dict()[stem])


def test_flip_average_embeds_a_photo_as_the_mean_of_it_and_its_mirror_image():
    plain, _ = build_model("test_convnext", embedding_dim=16, pretrained=False, image_size=32)
    flipping, spec = build_model("test_convnext", embedding_dim=16, pretrained=False,
                                 image_size=32, flip_average=True)
    flipping.load_state_dict(plain.state_dict())
    images = torch.randn(3, 3, 32, 32)
    plain.eval(), flipping.eval()
    for ours, theirs in ((flipping.features, plain.features), (flipping, plain)):
        expected = torch.nn.functional.normalize(
            theirs(images) + theirs(torch.flip(images, dims=(-1,))), dim=-1)
        assert torch.allclose(ours(images), expected, atol=1e-6)
        assert not torch.allclose(ours(images), theirs(images), atol=1e-3)
    # A photo and its mirror image get the same vector; training's forward is unchanged.
    assert torch.allclose(flipping.features(images),
                          flipping.features(torch.flip(images, dims=(-1,))), atol=1e-6)
    plain.train(), flipping.train()
    assert torch.allclose(flipping(images), plain(images), atol=1e-6)
    assert spec.flip_average and ModelSpec.from_dict(spec.to_dict()).flip_average


def test_a_spec_written_before_the_flip_average_searches_as_trained():
    _, spec = build_model("test_convnext", pretrained=False)
    older = {key: value for key, value in spec.to_dict().items() if key != "flip_average"}
    assert ModelSpec.from_dict(older).flip_average is False
    assert model_from_spec(ModelSpec.from_dict(older)).flip_average is False
    with pytest.raises(ValueError, match="flip_average"):
        ModelSpec.from_dict({**older, "flip_average": "yes"})

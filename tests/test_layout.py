"""Channels-last (NHWC) batches and weights: the layout changes speed, never the numbers."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from ascension_cli.data.augment import eval_transform, train_transform
from ascension_cli.data.dataset import (
    EvalDataset,
    MultiViewDataset,
    collate,
    eval_photos,
    min_decode_side,
)
from ascension_cli.data.folder import scan_folder
from ascension_cli.embedding.pipeline import embed_images
from ascension_cli.launch import torchrun_config
from ascension_cli.losses import supcon_loss
from ascension_cli.model.backbone import build_model
from ascension_cli.runtime import resolve_workers, to_input, use_channels_last
from ascension_cli.train.gradcache import cached_backward

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_eval_photos_are_the_eval_transform_decoded_at_twice_the_input(dataset):
    """Every search (training's validation and gallery check, the colour test, embed) builds its
    photos here: the spec's eval transform, JPEGs decoded down to twice the input size."""
    scan = scan_folder(dataset)
    spec = types.SimpleNamespace(image_size=24, mean=MEAN, std=STD, crop_pct=0.875)
    photos = eval_photos(spec, scan.paths[:3], scan.labels[:3], recolouring="grayscale")
    by_hand = EvalDataset(scan.paths[:3], scan.labels[:3], eval_transform(24, MEAN, STD, 0.875),
                          "grayscale", min_side=48)
    assert photos.min_side == min_decode_side(24) == 48
    for index in range(3):
        torch.testing.assert_close(photos[index][0], by_hand[index][0], rtol=0, atol=0)
        assert photos[index][1:] == by_hand[index][1:]
    wider = eval_photos(spec, scan.paths[:1], None, image_size=32)
    assert wider[0][0].shape == (3, 32, 32) and wider.min_side == 64 and wider[0][1] == -1


def test_eval_batches_are_channels_last_and_hold_the_same_pixels(dataset):
    scan = scan_folder(dataset)
    data = EvalDataset(scan.paths[:5], scan.labels[:5], eval_transform(24, MEAN, STD))
    items = [data[i] for i in range(5)]
    batch = collate(items).images
    assert batch.shape == (5, 3, 24, 24)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert not batch.is_contiguous()
    torch.testing.assert_close(batch, torch.stack([item[0].contiguous() for item in items]),
                               rtol=0, atol=0)
    # Already NHWC: the transfer to the CPU model copies nothing.
    assert to_input(batch, CPU, True).data_ptr() == batch.data_ptr()
    plain = to_input(batch, CPU, False)
    assert plain.is_contiguous()
    torch.testing.assert_close(plain, batch, rtol=0, atol=0)


def test_multi_view_batches_flatten_to_channels_last_without_a_copy(dataset):
    scan = scan_folder(dataset)
    data = MultiViewDataset(scan.paths[:4], scan.labels[:4],
                            train_transform("standard", 24, MEAN, STD), views=3)
    items = [data[(i, 7 + i)] for i in range(4)]
    batch = collate(items).images
    assert batch.shape == (4, 3, 3, 24, 24)
    moved = to_input(batch, CPU, True)
    assert moved.data_ptr() == batch.data_ptr()
    flat = moved.reshape(-1, 3, 24, 24)  # what gradient caching hands the model
    assert flat.data_ptr() == batch.data_ptr()
    assert flat.is_contiguous(memory_format=torch.channels_last)
    reference = torch.stack([item[0].contiguous() for item in items])
    torch.testing.assert_close(batch, reference, rtol=0, atol=0)
    torch.testing.assert_close(to_input(batch, CPU, False), reference, rtol=0, atol=0)
    assert to_input(batch, CPU, False).is_contiguous()
    # An NCHW 5-D batch is rearranged to the same NHWC layout.
    rearranged = to_input(reference, CPU, True)
    assert rearranged.reshape(-1, 3, 24, 24).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rearranged, reference, rtol=0, atol=0)


def test_model_layout_switches_both_ways_and_skips_3d_convolutions():
    model, _ = build_model("test_efficientnet", pretrained=False, image_size=32)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
    use_channels_last(model)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    use_channels_last(model, False)
    assert conv.weight.is_contiguous()
    volumetric = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv3d(1, 2, 3))
    use_channels_last(volumetric)  # no channels_last for 5-D weights: left plain, no error
    assert all(p.is_contiguous() for p in volumetric.parameters())


def test_embedding_is_the_same_in_either_layout(dataset):
    scan = scan_folder(dataset)
    model, spec = build_model("test_efficientnet", pretrained=False, image_size=32)
    vectors = {
        layout: embed_images(model, spec, scan.paths, scan.labels, precision="fp32",
                             device="cpu", channels_last=layout)[0]
        for layout in (True, False)
    }
    assert vectors[True].shape == (len(scan), spec.num_features)
    np.testing.assert_allclose(vectors[True], vectors[False], rtol=0, atol=1e-5)


def test_cached_gradients_are_the_same_in_either_layout():
    torch.manual_seed(0)
    images = torch.randn(2, 8, 2, 3, 32, 32)  # 2 micro-batches of 8 images x 2 views
    labels = torch.arange(16).remainder(4).view(2, 8)
    gradients = {}
    for layout in (True, False):
        torch.manual_seed(1)
        model, _ = build_model("test_efficientnet", pretrained=False, image_size=32)
        use_channels_last(model, layout)
        batches = [(to_input(images[i], CPU, layout), labels[i]) for i in range(2)]
        loss = cached_backward(model, batches, supcon_loss)
        assert torch.isfinite(loss)
        gradients[layout] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(gradients[True]) == len(gradients[False]) > 0
    for nhwc, nchw in zip(gradients[True], gradients[False], strict=True):
        torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-5)


def test_workers_default_by_device(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_workers(3, CPU) == 3
    assert resolve_workers(None, CPU) == 2  # the model's threads use the cores
    assert resolve_workers(None, torch.device("cuda")) == 8
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_workers(None, CPU) == 0
    assert resolve_workers(None, torch.device("cuda")) == 2


@pytest.mark.parametrize("value", [True, False])
def test_torchrun_workers_get_the_layout_flag(value, tmp_path):
    import yaml

    from ascension_cli.config import TrainConfig, resolve

    given = {"data_root": tmp_path, "channels_last": value, "pretrained": False, "epochs": 2}
    settings = resolve(TrainConfig, given)
    sent = torchrun_config(settings)
    assert sent == {"data_root": str(tmp_path), "channels_last": value, "pretrained": False,
                    "epochs": 2}
    assert "data_root" in given  # the caller's options are left as they were
    # The workers resolve the very same options from the file, and defaults stay defaults.
    (tmp_path / "options.yaml").write_text(yaml.safe_dump(sent))
    again = resolve(TrainConfig, {"data_root": tmp_path}, tmp_path / "options.yaml")
    assert again == settings and again.model_fields_set == settings.model_fields_set

"""Dense-prediction backbone: ``features_only`` stage outputs, the per-stage ``feature_norm``, and a real FPN."""
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import rmt
from tests.helpers import assert_close

FIXTURES = Path(__file__).parent / 'fixtures'


def small_backbone(**kwargs):
    """The fixtures' small RMT as a features_only backbone with the released-format small checkpoint."""
    cfg = rmt.official_config_to_kwargs(json.loads((FIXTURES / 'official_small_config.json').read_text()))
    return timm.create_model(
        'rmt_t', pretrained=True, features_only=True,
        pretrained_cfg_overlay=dict(file=str(FIXTURES / 'official_small_checkpoint.pth'), num_classes=10),
        **cfg, **kwargs).eval()


@pytest.fixture(scope='module')
def expected():
    return torch.load(FIXTURES / 'official_small_expected.pt', weights_only=True)


def test_features_only_gives_released_stage_outputs_nchw_at_strides_4_to_32(expected):
    model = small_backbone()
    assert model.feature_info.channels() == [16, 32, 48, 64]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for size, ref in expected.items():
        with torch.no_grad():
            feats = model(ref['input'])
        assert len(feats) == 4
        for got, want in zip(feats, ref['stage_features'], strict=True):
            assert got.shape == want.shape, size  # NCHW, (H, W) = ceil of the input over the stride
            assert_close(got, want, atol=1e-4, name=str(size))


def test_feature_norm_is_a_layer_norm_over_channels_like_the_released_dense_backbones(expected):
    """``feature_norm=True`` normalises each stage output over channels with nn.LayerNorm's eps 1e-5, as the
    released detection and segmentation backbones' ``extra_norms`` do; a classification checkpoint loads with
    the norms fresh (weight 1, bias 0), and their learned affine is applied per channel."""
    model = small_backbone(feature_norm=True)
    norms = model.model.feature_norms
    assert [n.normalized_shape[0] for n in norms] == [16, 32, 48, 64]
    assert all(n.eps == 1e-5 for n in norms)
    ref = expected['96x80']
    with torch.no_grad():
        fresh = model(ref['input'])
        for s, n in enumerate(norms):
            n.weight.copy_(torch.linspace(0.5, 2.0, n.weight.numel()))
            n.bias.fill_(0.1 * (s + 1))
        learned = model(ref['input'])
    for s, (got_fresh, got, want) in enumerate(zip(fresh, learned, ref['stage_features'], strict=True)):
        normed = F.layer_norm(want.permute(0, 2, 3, 1), want.shape[1:2], eps=1e-5).permute(0, 3, 1, 2)
        assert_close(got_fresh, normed, atol=1e-4)
        # per-location mean 0, variance 1 over channels
        assert got_fresh.mean(1).abs().max().item() < 1e-4
        scale = torch.linspace(0.5, 2.0, want.shape[1])[None, :, None, None]
        assert_close(got, (normed * scale + 0.1 * (s + 1)), atol=1e-4)


def test_torchvision_fpn_runs_on_features_at_800x1216():
    """The detection setting: a non-square 800x1216 image, features with the per-stage norm, a torchvision FPN
    (with the max-pool P6 level as in RetinaNet/Mask R-CNN) on top."""
    backbone = small_backbone(feature_norm=True)
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=32, extra_blocks=LastLevelMaxPool())
    x = torch.randn(1, 3, 800, 1216)
    with torch.no_grad():
        feats = backbone(x)
        pyramid = fpn(OrderedDict((f'p{s + 2}', f) for s, f in enumerate(feats)))
    assert [tuple(f.shape[-2:]) for f in feats] == [(200, 304), (100, 152), (50, 76), (25, 38)]
    assert list(pyramid) == ['p2', 'p3', 'p4', 'p5', 'pool']
    assert [tuple(p.shape) for p in pyramid.values()] == [
        (1, 32, 200, 304), (1, 32, 100, 152), (1, 32, 50, 76), (1, 32, 25, 38), (1, 32, 13, 19)]
    assert all(torch.isfinite(p).all() for p in pyramid.values())
    for f in feats:  # what the neck consumes is normalised per location over channels
        assert f.mean(1).abs().max().item() < 1e-4
        assert_close(f.var(1, unbiased=False), torch.ones_like(f[:, 0]), atol=1e-2)

"""Detection and segmentation: the released downstream checkpoints in ``features_only`` backbones through every
timm path, the backbone's training controls, torchvision's detectors, and mmdet / mmseg through mmpretrain."""
import importlib.util
import itertools
import logging

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.optim import create_optimizer_v2

import rmt  # noqa: F401  (registers the models)
from rmt import load_checkpoint_file
from rmt.detection import backbone_with_fpn, save_for_timm_backbone

from tests.helpers import (
    DETECTION_CHECKPOINT, FIXTURES, SMALL_CHECKPOINT, CodePayload, assert_close, small_kwargs)

DETECTION = DETECTION_CHECKPOINT


@pytest.fixture(scope='module')
def expected():
    return torch.load(FIXTURES / 'official_small_detection_expected.pt', weights_only=True)


def backbone(**overrides):
    """The fixtures' small configuration as a features_only backbone with the released output norms."""
    return timm.create_model('rmt_t', **small_kwargs(features_only=True, feature_norm=True, **overrides))


def assert_released_features(model, expected):
    model.eval()
    for size, x in expected['inputs'].items():
        with torch.no_grad():
            features = model(x)
        want = expected['features'][size]
        assert len(features) == len(want) == 4
        for s, (got, ref) in enumerate(zip(features, want, strict=True)):
            assert got.shape == ref.shape, (size, s)
            assert_close(got, ref, atol=1e-4, name=str((size, s)))


# --- the released detection checkpoint, through every path --------------------------------------------

def _via_pretrained():
    return backbone(pretrained=True, pretrained_cfg_overlay=dict(file=str(DETECTION)))


def _via_checkpoint_path():
    return backbone(checkpoint_path=str(DETECTION))


def _via_load_checkpoint():
    model = backbone()
    timm.models.load_checkpoint(model, str(DETECTION))
    return model


def _via_load_state_dict():
    model = backbone()
    result = model.load_state_dict(load_checkpoint_file(DETECTION)['state_dict'])
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.mark.parametrize('load', [_via_pretrained, _via_checkpoint_path, _via_load_checkpoint, _via_load_state_dict],
                         ids=['pretrained_cfg_overlay', 'checkpoint_path', 'load_checkpoint', 'load_state_dict'])
def test_released_detection_checkpoint_gives_the_released_features(load, expected):
    assert_released_features(load(), expected)


def test_loading_a_detector_says_in_one_log_line_that_neck_and_heads_are_ignored(caplog):
    with caplog.at_level(logging.INFO, logger='rmt.checkpoint'):
        _via_checkpoint_path()
    lines = [r.getMessage() for r in caplog.records if 'ignoring' in r.getMessage()]
    assert lines == [f'{DETECTION}: a detection/segmentation checkpoint; loading its backbone, ignoring neck, '
                     f'roi_head, rpn_head (4 tensors)']


@pytest.mark.parametrize('path', ['checkpoint_path', 'load_state_dict'])
def test_released_detection_checkpoint_loads_into_a_model_without_classifier(path, expected):
    kwargs = small_kwargs(num_classes=0, feature_norm=True)
    if path == 'checkpoint_path':
        model = timm.create_model('rmt_t', checkpoint_path=str(DETECTION), **kwargs)
    else:
        model = timm.create_model('rmt_t', **kwargs)
        model.load_state_dict(load_checkpoint_file(DETECTION)['state_dict'])
    model.eval()
    x = expected['inputs']['70x50']
    with torch.no_grad():
        features = model.forward_intermediates(x, intermediates_only=True)
    for got, ref in zip(features, expected['features']['70x50'], strict=True):
        assert_close(got, ref, atol=1e-4)


def test_stripped_detection_state_dict_loads_too(expected):
    """The backbone keys with the ``backbone.`` prefix already removed, as a user might save them."""
    state = {k[len('backbone.'):]: v for k, v in load_checkpoint_file(DETECTION)['state_dict'].items()
             if k.startswith('backbone.')}
    model = backbone()
    model.load_state_dict(state)
    assert_released_features(model, expected)


def _expected_stage_features():
    return torch.load(FIXTURES / 'official_small_expected.pt', weights_only=True)['70x50']


@pytest.mark.parametrize('path', ['pretrained_cfg_overlay', 'checkpoint_path', 'load_checkpoint', 'load_state_dict'])
@pytest.mark.parametrize('kind', ['released', 'ours'])
def test_classification_files_load_into_features_only_models_through_every_path(path, kind, tmp_path):
    file = SMALL_CHECKPOINT
    if kind == 'ours':
        file = tmp_path / 'ours.pth'
        ours = timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(SMALL_CHECKPOINT)),
                                 **small_kwargs())
        torch.save(ours.state_dict(), file)
    if path == 'pretrained_cfg_overlay':
        model = timm.create_model('rmt_t', **small_kwargs(features_only=True, pretrained=True,
                                                          pretrained_cfg_overlay=dict(file=str(file))))
    elif path == 'checkpoint_path':
        model = timm.create_model('rmt_t', **small_kwargs(features_only=True, checkpoint_path=str(file)))
    else:
        model = timm.create_model('rmt_t', **small_kwargs(features_only=True))
        if path == 'load_checkpoint':
            timm.models.load_checkpoint(model, str(file))
        else:
            state = load_checkpoint_file(file)
            model.load_state_dict(state.get('model', state))
    ref = _expected_stage_features()
    with torch.no_grad():
        features = model.eval()(ref['input'])
    for got, want in zip(features, ref['stage_features'], strict=True):
        assert_close(got, want, atol=1e-4)


def test_classification_file_into_a_normed_backbone_starts_the_norms_fresh():
    model = backbone(checkpoint_path=str(SMALL_CHECKPOINT))
    for norm in model.model.feature_norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


@pytest.mark.parametrize('path', ['pretrained_cfg_overlay', 'checkpoint_path', 'load_state_dict'])
def test_detection_file_into_a_backbone_without_output_norms_says_to_pass_feature_norm(path):
    kwargs = small_kwargs(features_only=True)
    with pytest.raises(ValueError) as err:
        if path == 'pretrained_cfg_overlay':
            timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(DETECTION)), **kwargs)
        elif path == 'checkpoint_path':
            timm.create_model('rmt_t', checkpoint_path=str(DETECTION), **kwargs)
        else:
            timm.create_model('rmt_t', **kwargs).load_state_dict(load_checkpoint_file(DETECTION)['state_dict'])
    message = str(err.value)
    assert '\n' not in message and message.endswith('built without them: pass feature_norm=True')
    if path != 'load_state_dict':
        assert str(DETECTION) in message


@pytest.mark.parametrize('path', ['pretrained_cfg_overlay', 'checkpoint_path'])
def test_detection_file_into_a_classifier_says_it_has_no_head_and_how_to_build_a_backbone(path):
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(DETECTION))) \
        if path == 'pretrained_cfg_overlay' else dict(checkpoint_path=str(DETECTION))
    with pytest.raises(ValueError, match=r'has no classification head .*features_only=True, feature_norm=True') as err:
        timm.create_model('rmt_t', **small_kwargs(feature_norm=True, **kwargs))
    assert '\n' not in str(err.value) and str(DETECTION) in str(err.value)


# --- weights-only reading --------------------------------------------------------------------------------

def test_numpy_scalars_and_dtypes_in_meta_load(tmp_path, expected):
    """mmseg's best-score hook stores numpy scalars in ``meta``; torch's safe globals for numpy rebuild them."""
    state = load_checkpoint_file(DETECTION)
    state['meta']['hook_msgs'].update(best_score=np.float64(0.472), best_iter=np.int64(160000),
                                      dtype=np.dtype('float32'))
    path = tmp_path / 'upernet.pth'
    torch.save(state, path)
    loaded = load_checkpoint_file(path)
    assert loaded['meta']['hook_msgs']['best_score'] == np.float64(0.472)
    assert loaded['meta']['hook_msgs']['dtype'] == np.dtype('float32')
    assert_released_features(backbone(checkpoint_path=str(path)), expected)


def test_code_in_meta_is_refused(tmp_path):
    payload = CodePayload(str(tmp_path / 'payload_ran'))
    state = load_checkpoint_file(DETECTION)
    state['meta']['hook'] = payload
    path = tmp_path / 'evil.pth'
    torch.save(state, path)
    for load in (lambda: load_checkpoint_file(path), lambda: backbone(checkpoint_path=str(path))):
        with pytest.raises(RuntimeError, match=r'refusing to load .*evil.pth: it holds posix.system'):
            load()
    assert not payload.ran()


def test_numpy_arrays_in_meta_are_still_refused(tmp_path):
    path = tmp_path / 'array.pth'
    torch.save({'state_dict': {}, 'meta': {'scores': np.zeros(3)}}, path)
    with pytest.raises(RuntimeError, match='refusing to load'):
        load_checkpoint_file(path)


# --- strict=False ------------------------------------------------------------------------------------------

def test_strict_false_with_released_names_returns_the_missing_head_keys():
    released = {k: v for k, v in load_checkpoint_file(SMALL_CHECKPOINT)['model'].items() if not k.startswith('head.')}
    model = timm.create_model('rmt_t', **small_kwargs())
    result = model.load_state_dict(released, strict=False)
    assert sorted(result.missing_keys) == ['head.fc.bias', 'head.fc.weight']
    assert result.unexpected_keys == []
    ref = load_checkpoint_file(SMALL_CHECKPOINT)['model']
    assert torch.equal(model.head.proj.weight, ref['proj.weight'])


def test_strict_false_classification_file_into_a_normed_backbone_reports_the_norms_missing():
    """The released mmdet init: a classification file into the backbone with extra norms, ``strict=False``."""
    model = backbone()
    result = model.load_state_dict(load_checkpoint_file(SMALL_CHECKPOINT)['model'], strict=False)
    assert sorted(result.missing_keys) == sorted(f'model.feature_norms.{i}.{p}' for i in range(4)
                                                 for p in ('weight', 'bias'))
    assert result.unexpected_keys == []


def test_strict_false_still_raises_on_shape_mismatch_with_both_shapes():
    released = load_checkpoint_file(SMALL_CHECKPOINT)['model']
    with pytest.raises(ValueError, match=r'head\.fc\.weight: checkpoint \(10, 128\) vs model \(7, 128\)') as err:
        timm.create_model('rmt_t', **small_kwargs(num_classes=7)).load_state_dict(released, strict=False)
    assert '\n' not in str(err.value)


def test_strict_false_with_our_names_returns_unexpected_keys():
    model = timm.create_model('rmt_t', **small_kwargs())
    state = dict(model.state_dict(), extra=torch.zeros(1))
    del state['head.fc.bias']
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ['head.fc.bias'] and result.unexpected_keys == ['extra']


# --- no unused parameters ----------------------------------------------------------------------------------

SUBSETS = [s for n in range(1, 5) for s in itertools.combinations(range(4), n)]


@pytest.mark.parametrize('out_indices', SUBSETS, ids=lambda s: ''.join(map(str, s)))
def test_every_parameter_of_a_features_only_model_gets_a_gradient(out_indices):
    model = backbone(out_indices=out_indices).train()
    features = model(torch.randn(2, 3, 32, 32))
    assert len(features) == len(out_indices)
    sum(f.mean() for f in features).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize('indices', [[1, 2], [0, 3], [2]])
def test_every_parameter_after_prune_intermediate_layers_gets_a_gradient(indices):
    model = timm.create_model('rmt_t', **small_kwargs(feature_norm=True, token_label=True)).train()
    take = model.prune_intermediate_layers(indices)
    features = model.forward_intermediates(torch.randn(2, 3, 32, 32), indices=take, intermediates_only=True)
    sum(f.mean() for f in features).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_pruned_backbone_loads_a_file_with_every_stage_and_norm(expected):
    model = backbone(out_indices=(1, 2), checkpoint_path=str(DETECTION)).eval()
    with torch.no_grad():
        features = model(expected['inputs']['64x96'])
    for got, ref in zip(features, expected['features']['64x96'][1:3], strict=True):
        assert_close(got, ref, atol=1e-4)


def _ddp_worker(rank: int, world: int, folder: str, out_indices) -> None:
    dist.init_process_group('gloo', init_method=f'file://{folder}/store', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = backbone(out_indices=out_indices).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(rank)  # each rank its own batch
        for _ in range(2):  # an unused parameter fails the second step
            loss = sum(f.square().mean() for f in ddp(torch.randn(2, 3, 32, 32)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(model.model.stem.conv1.weight.detach(), f'{folder}/{rank}.pt')
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_trains_two_steps_without_find_unused_parameters(tmp_path):
    # spawned (fresh interpreters): a forked child can hang in the OpenMP pool the parent's tests started
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), (1, 2, 3)), nprocs=2)
    weights = [torch.load(tmp_path / f'{rank}.pt') for rank in range(2)]
    assert torch.equal(weights[0], weights[1])  # gradients were all-reduced: both ranks stepped alike


# --- training controls on the features_only model ----------------------------------------------------------

def test_grad_checkpointing_on_the_features_only_model_gives_the_same_gradients():
    torch.manual_seed(0)
    plain, checkpointed = backbone().train(), backbone().train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing()
    assert checkpointed.model.grad_checkpointing and all(s.grad_checkpointing for s in checkpointed.model.stages)
    x = torch.randn(2, 3, 48, 40)
    for model in (plain, checkpointed):
        sum(f.sum() for f in model(x)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_layer_decay_through_create_optimizer_v2_scales_the_stem_least():
    model = backbone()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    stem, first, last = (scale[id(params[n])] for n in (
        'model.stem.conv1.weight', 'model.stages.0.blocks.0.attn.q.weight', 'model.stages.3.blocks.0.attn.q.weight'))
    layers = 1 + sum(small_kwargs()['depths'])  # the stem, then the blocks (a downsampling with its stage's first)
    assert stem == pytest.approx(0.5 ** layers)
    assert stem < first < last == pytest.approx(0.5)
    assert scale[id(params['model.feature_norms.3.weight'])] == 1.0  # the norms after the last block


def _batchnorms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_frozen_stages_get_no_gradient_and_keep_their_batchnorm_statistics():
    model = backbone(drop_path_rate=0.5)
    model.set_frozen_stages(2)
    model.train()
    frozen = [model.model.stem, *model.model.stages[:2]]
    assert all(not m.training for part in frozen for m in part.modules())
    assert all(m.training for m in model.model.stages[2].modules())
    stats = {n: b.clone() for n, b in model.named_buffers() if 'running' in n}
    sum(f.mean() for f in model(torch.randn(2, 3, 32, 32))).backward()
    for name, p in model.named_parameters():
        in_frozen = name.startswith(('model.stem.', 'model.stages.0.', 'model.stages.1.'))
        assert (p.grad is None) == in_frozen, name
    for name, before in stats.items():
        changed = not torch.equal(before, model.get_buffer(name))
        assert changed == name.startswith(('model.stages.2.', 'model.stages.3.')), name  # their downsampling norms


def test_norm_eval_keeps_every_batchnorm_in_eval_and_unfreezing_restores_training():
    model = backbone()
    model.set_frozen_stages(0, norm_eval=True)
    model.train()
    assert all(not bn.training for bn in _batchnorms(model))
    assert not any(p.requires_grad for p in model.model.stem.parameters())
    assert all(p.requires_grad for p in model.model.stages.parameters())
    model.set_frozen_stages(-1)
    assert all(bn.training for bn in _batchnorms(model))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match='frozen_stages must be'):
        model.set_frozen_stages(5)


# --- torchvision's detectors -------------------------------------------------------------------------------

def _synthetic_instances(n: int = 2, size=(256, 320)):
    """Images with two bright rectangles each, their boxes, labels and masks."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(n):
        image = torch.rand(3, *size, generator=g) * 0.5
        boxes = torch.tensor([[30., 40., 130., 160.], [150., 60., 290., 220.]]) + 8 * i
        masks = torch.zeros(2, *size, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[j, y0:y1, x0:x1] = 1
            image[:, y0:y1, x0:x1] += 0.25 * (j + 1)
        images.append(image)
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks))
    return images, targets


@pytest.mark.slow
def test_mask_rcnn_with_the_released_detection_backbone_trains_and_predicts():
    from torchvision.models.detection import MaskRCNN
    torch.manual_seed(0)
    kwargs = small_kwargs()
    kwargs.pop('num_classes')
    model = MaskRCNN(backbone_with_fpn('rmt_t', DETECTION, out_channels=32, **kwargs), num_classes=3,
                     min_size=256, max_size=320, rpn_batch_size_per_image=64, box_batch_size_per_image=64)
    images, targets = _synthetic_instances()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    totals = []
    for _ in range(2):
        torch.manual_seed(1)
        losses = model(images, targets)
        assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
        total = sum(losses.values())
        assert torch.isfinite(total)
        totals.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert totals[1] <= totals[0]
    model.eval()
    with torch.no_grad():
        prediction = model(images[:1])[0]
    n = len(prediction['boxes'])
    assert n > 0 and prediction['masks'].shape == (n, 1, 256, 320) and prediction['scores'].shape == (n,)


@pytest.mark.parametrize('detector', ['FasterRCNN', 'RetinaNet', 'FCOS'])
def test_other_torchvision_detectors_take_the_backbone(detector):
    import torchvision.models.detection as detection
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    kwargs = small_kwargs()
    kwargs.pop('num_classes')
    extra = LastLevelP6P7(32, 32) if detector in ('RetinaNet', 'FCOS') else None
    fpn = backbone_with_fpn('rmt_t', DETECTION, out_indices=(1, 2, 3), out_channels=32, extra_blocks=extra, **kwargs)
    anchors = None
    if detector != 'FCOS':
        levels = 5 if extra is not None else 4
        anchors = detection.anchor_utils.AnchorGenerator(
            tuple((16 * 2 ** i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels)
    args = dict(anchor_generator=anchors) if anchors is not None else {}
    if detector == 'FasterRCNN':
        args['box_roi_pool'] = detection.faster_rcnn.MultiScaleRoIAlign(['0', '1', '2'], 7, 2)
        args['rpn_anchor_generator'] = args.pop('anchor_generator')
    model = getattr(detection, detector)(fpn, num_classes=3, min_size=128, max_size=160, **args).eval()
    with torch.no_grad():
        prediction = model([torch.rand(3, 128, 160)])[0]
    assert set(prediction) >= {'boxes', 'labels', 'scores'}


def test_backbone_with_fpn_names_levels_as_torchvision_does():
    kwargs = small_kwargs()
    kwargs.pop('num_classes')
    fpn = backbone_with_fpn('rmt_t', out_channels=24, frozen_stages=1, **kwargs).eval()
    with torch.no_grad():
        levels = fpn(torch.randn(1, 3, 64, 96))
    assert fpn.out_channels == 24
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        '0': (1, 24, 16, 24), '1': (1, 24, 8, 12), '2': (1, 24, 4, 6), '3': (1, 24, 2, 3), 'pool': (1, 24, 1, 2)}
    assert not any(p.requires_grad for p in fpn.body.model.stages[0].parameters())


# --- mmdet / mmseg through mmpretrain's TIMMBackbone ------------------------------------------------------

def test_converted_file_holds_the_backbone_under_timm_backbone_names_and_keeps_the_heads(tmp_path, expected):
    out = tmp_path / 'converted.pth'
    kwargs = small_kwargs()
    kwargs.pop('num_classes')
    model = save_for_timm_backbone(DETECTION, out, 'rmt_t', **kwargs)
    converted = torch.load(out, weights_only=True)['state_dict']
    original = load_checkpoint_file(DETECTION)['state_dict']
    heads = {k for k in original if not k.startswith('backbone.')}
    assert set(converted) == heads | {'backbone.timm_model.' + k for k in model.state_dict()}
    assert all(torch.equal(converted[k], original[k]) for k in heads)
    assert_released_features(model, expected)


def _mm(package: str) -> None:
    """Skip unless mmpretrain imports and ``package`` (mmdet, mmseg: its configs are the base) is installed."""
    pytest.importorskip('mmpretrain', reason='mmpretrain (with mmengine and mmcv) is not installed')
    if importlib.util.find_spec(package) is None:
        pytest.skip(f'{package} is not installed')


# the README's mmdet 3 / mmseg 1 snippets, with the fixtures' small configuration
MM_CONFIG = """
_base_ = ['{base}']
custom_imports = dict(imports=['mmpretrain.models', 'rmt'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.TIMMBackbone',
        model_name='rmt_t',
        features_only=True,
        out_indices=(0, 1, 2, 3),
        feature_norm=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(file='{file}'),
        {size}),
    {heads})
"""
MM_BASES = {
    'mmdet': ('mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'neck=dict(in_channels=[16, 32, 48, 64])'),
    'mmseg': ('mmseg::_base_/models/upernet_swin.py',
              'decode_head=dict(in_channels=[16, 32, 48, 64]), auxiliary_head=dict(in_channels=48)'),
}


def _mm_backbone(package: str, file):
    """The config's backbone, built as mmdet / mmseg build it (their model registries need mmcv's compiled ops,
    which mmcv-lite lacks, so the backbone is built from mmpretrain's registry, where TIMMBackbone lives)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.utils import import_modules_from_strings
    from mmpretrain.registry import MODELS
    base, heads = MM_BASES[package]
    size = ', '.join(f'{k}={v!r}' for k, v in small_kwargs().items() if k != 'num_classes')
    cfg = Config.fromstring(MM_CONFIG.format(base=base, file=file, size=size, heads=heads), '.py')
    assert cfg.model.backbone.type == 'mmpretrain.TIMMBackbone' and 'depth' not in cfg.model.backbone  # replaced
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope('mmpretrain')
    return MODELS.build(cfg.model.backbone)


@pytest.mark.parametrize('package', ['mmdet', 'mmseg'])
def test_mm_config_with_timm_backbone_loads_the_released_backbone(package, expected):
    _mm(package)
    module = _mm_backbone(package, DETECTION)
    module.eval()  # (mmpretrain's train() returns None)
    for size, x in expected['inputs'].items():
        with torch.no_grad():
            features = module(x)
        assert isinstance(features, tuple)
        for got, ref in zip(features, expected['features'][size], strict=True):
            assert_close(got, ref, atol=1e-4)


@pytest.mark.parametrize('package', ['mmdet', 'mmseg'])
def test_mm_load_from_the_converted_file_fills_the_timm_backbone(package, tmp_path, expected):
    _mm(package)
    from mmengine.runner import load_checkpoint as mm_load_checkpoint
    out = tmp_path / 'converted.pth'
    kwargs = small_kwargs()
    kwargs.pop('num_classes')
    save_for_timm_backbone(DETECTION, out, 'rmt_t', **kwargs)

    class Detector(torch.nn.Module):  # how mmdet's and mmseg's models hold it
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    detector = Detector(_mm_backbone(package, SMALL_CHECKPOINT))  # classification weights: the norms start fresh
    mm_load_checkpoint(detector, str(out), map_location='cpu', strict=False)  # what load_from= does
    detector.eval()
    with torch.no_grad():
        features = detector.backbone(expected['inputs']['70x50'])
    for got, ref in zip(features, expected['features']['70x50'], strict=True):
        assert_close(got, ref, atol=1e-4)

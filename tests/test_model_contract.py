"""The timm model contract, as timm's own tests/test_models.py applies it, for all four variants.

Counts and names are checked on the full models (on the meta device). Depth changes no code
path, so the behaviour checks build each variant with one block per stage ("shallow"): same
widths, heads, decay settings, layer scale and decomposed/full stages, a fraction of the time.
"""
import copy
import inspect
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.models import group_parameters

import rmt  # noqa: F401  (registers the models)
from rmt.model import MODEL_ARGS
from tests.helpers import assert_close, small_kwargs

VARIANTS = ['rmt_t', 'rmt_s', 'rmt_b', 'rmt_l']
TAGGED = ['rmt_t.in1k', 'rmt_s.in1k', 'rmt_s.in1k_tl', 'rmt_b.in1k', 'rmt_b.in1k_tl', 'rmt_l.in1k', 'rmt_l.in1k_tl']
REFERENCE_KEYS = json.loads((Path(__file__).parent / 'fixtures' / 'official_state_dict_keys.json').read_text())
TL_PARAMS = {'rmt_s.in1k_tl': 27_480_240, 'rmt_b.in1k_tl': 54_667_896, 'rmt_l.in1k_tl': 96_105_864}

_models = {}


def shallow(name, **kwargs):
    """The variant with one block per stage."""
    return timm.create_model(name, depths=(1, 1, 1, 1), **kwargs)


def real_model(name):
    """One randomly initialised shallow eval-mode model per variant, shared by the read-only tests."""
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = shallow(name).eval()
    return _models[name]


def eager_output(name, *size):
    """The variant's shared model, a random input of ``size`` and the model's output for it."""
    model = real_model(name)
    x = torch.randn(*size)
    with torch.no_grad():
        return model, x, model(x)


def meta_model(name, **kwargs):
    return timm.create_model(name, device='meta', dtype=torch.float32, **kwargs).eval()


def shallow_meta(name, **kwargs):
    return meta_model(name, depths=(1, 1, 1, 1), **kwargs)


@pytest.mark.parametrize('name', VARIANTS)
def test_parameter_count_equals_released_model(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_KEYS[name]['params']


@pytest.mark.parametrize('name', list(TL_PARAMS))
def test_token_label_parameter_count_equals_released_code(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == TL_PARAMS[name]


@pytest.mark.parametrize('name', TAGGED)
def test_default_cfg_names_real_modules_and_matches_output(name):
    model = meta_model(name)
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state
    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], tuple) else (cfg['classifier'],)
    assert all(c + '.weight' in state for c in classifiers)
    assert model.in_chans == cfg['input_size'][0] and model.num_classes == cfg['num_classes'] == 1000
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    x = torch.randn(1, *cfg['input_size'], device='meta')
    model = shallow_meta(name)
    features = model.forward_features(x)
    assert model.output_fmt == 'NHWC' and features.shape == (1, *cfg['pool_size'], model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
    assert model(x).shape == (1, 1000)


@pytest.mark.parametrize('name', TAGGED)
def test_classifier_removal_gives_pooled_then_unpooled_features(name):
    model = shallow_meta(name)
    x = torch.randn(1, 3, 224, 224, device='meta')
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (1, model.head_hidden_size)
    model.reset_classifier(0, '')
    assert model(x).shape == (1, 7, 7, model.head_hidden_size)  # NHWC, as forward_features
    assert shallow_meta(name, num_classes=0)(x).shape == (1, model.head_hidden_size)
    assert shallow_meta(name, num_classes=0, global_pool='')(x).shape == (1, 7, 7, model.head_hidden_size)


def test_head_reset_other_leaves_only_pool_and_classifier():
    model = shallow_meta('rmt_t')
    model.reset_classifier(7, reset_other=True)
    head = model.head
    assert all(isinstance(m, torch.nn.Identity) for m in (head.proj, head.norm, head.act))
    assert model.head_hidden_size == model.num_features == head.fc.in_features == 512
    assert head.fc.out_features == 7 and head.fc.weight.device.type == 'meta'
    x = torch.randn(2, 3, 4, 512)
    torch.testing.assert_close(head(x, pre_logits=True), x.mean((1, 2)))


def test_head_input_width_changes_only_without_its_projection():
    head = shallow_meta('rmt_t').head
    with pytest.raises(ValueError, match='reset_other=True'):
        head.reset(0, in_features=256)


def test_reset_classifier_keeps_device_dtype_and_pool():
    model = meta_model('rmt_t').to(torch.float64)
    assert inspect.signature(model.reset_classifier).parameters['global_pool'].default is None
    model.reset_classifier(5)
    assert model.get_classifier().weight.dtype == torch.float64
    assert model.get_classifier().weight.device.type == 'meta'
    assert model.head.global_pool.pool_type == 'avg'
    assert not any(m.training for m in model.modules())


def test_frozen_model_stays_frozen_after_classifier_reset():
    model = meta_model('rmt_t').requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, '')
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


def test_factory_device_places_every_tensor():
    model = timm.create_model('rmt_t', device='meta', dtype=torch.float32)
    assert all(t.device.type == 'meta' for t in [*model.parameters(), *model.buffers()])


def test_bfloat16_after_a_float32_forward_gives_bfloat16_output():
    model = shallow_meta('rmt_t')
    x = torch.randn(1, 3, 224, 224, device='meta')
    model(x)
    assert model.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_unknown_constructor_argument_raises_type_error():
    with pytest.raises(TypeError):
        timm.create_model('rmt_t', device='meta', not_a_model_arg=1)


@pytest.mark.parametrize('name', VARIANTS)
def test_group_matcher_groups_every_parameter_by_stage(name):
    model = shallow_meta(name)
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)  # name -> group
    assert sorted(groups) == sorted(n for n, _ in model.named_parameters())
    # stem, one group per block (a stage's downsampling joins its first block), head
    assert len(set(groups.values())) == 1 + 4 + 1
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert len(set(coarse.values())) == 6  # stem, four stages, head


@pytest.mark.parametrize('name', VARIANTS)
def test_weight_decay_spares_exactly_biases_norms_and_layer_scales(name):
    model = shallow_meta(name)
    assert model.no_weight_decay() == set()  # timm's rule (1-D tensors) already covers what RMT needs
    groups = create_optimizer_v2(model, 'adamw', weight_decay=0.05).param_groups
    spared = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    one_dimensional = {id(p) for p in model.parameters() if p.ndim <= 1}
    assert spared == one_dimensional and len(spared) > 50


@pytest.mark.parametrize('name', VARIANTS)
def test_forward_is_finite_and_unchanged_by_grad_checkpointing(name):
    model, x, out = eager_output(name, 1, 3, 64, 64)
    with torch.no_grad():
        model.set_grad_checkpointing(True)
        out2 = model(x)
        model.set_grad_checkpointing(False)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert torch.allclose(out, out2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', VARIANTS)
def test_backward_reaches_every_parameter(name):
    model = shallow(name, num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_grad_checkpointing_gives_the_same_gradients_and_batchnorm_stats():
    torch.manual_seed(0)
    model = timm.create_model('rmt_t', **small_kwargs()).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 48)
    for m in (model, checkpointed):
        m(x).sum().backward()
    for (name, a), b in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(model.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_backward_with_grad_checkpointing_reaches_every_parameter():
    model = timm.create_model('rmt_t', **small_kwargs(token_label=True)).train()
    model.set_grad_checkpointing()
    model(torch.randn(2, 3, 64, 48)).mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize('name', VARIANTS)
def test_features_only_gives_four_nchw_stages_at_strides_4_to_32(name):
    model = shallow(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == list(MODEL_ARGS[name]['embed_dims'])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 72))
    assert [tuple(o.shape) for o in out] == [
        (1, c, -(-96 // r), -(-72 // r)) for c, r in zip(model.feature_info.channels(), [4, 8, 16, 32])]


@pytest.mark.parametrize('name', VARIANTS)
def test_forward_intermediates_agree_with_forward_features(name):
    model = real_model(name)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(model.forward_head(final), model(x))
    assert [f.shape[1] for f in intermediates] == [i['num_chs'] for i in model.feature_info]
    torch.testing.assert_close(early[0], intermediates[1], rtol=0, atol=0)


@pytest.mark.parametrize('index', [0, 1, 2, 3])
def test_pruned_model_keeps_its_tap_and_trains(index):
    model = timm.create_model('rmt_t', **small_kwargs(token_label=True)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([3], prune_head=False)
        torch.testing.assert_close(kept(x), model(x))
    pruned = copy.deepcopy(model)
    take = pruned.prune_intermediate_layers([index])
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0], taps[index])
        torch.testing.assert_close(pruned.forward_features(x).permute(0, 3, 1, 2), taps[index])  # NHWC
    pruned.train()
    (pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0].sum()
     + pruned.forward_features(x).sum()).backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]


@pytest.mark.slow
@pytest.mark.parametrize('name', VARIANTS)
def test_torchscript_saves_loads_and_matches_eager_at_another_size(name, tmp_path):
    model = real_model(name)
    torch.jit.script(model).save(str(tmp_path / 'scripted.pt'))
    loaded = torch.jit.load(str(tmp_path / 'scripted.pt'))
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('quantized', [False, True], ids=['float', 'quantize_dynamic'])
@pytest.mark.parametrize('features_only', [False, True], ids=['classifier', 'features_only'])
def test_torchscript_of_classifiers_and_backbones_and_their_quantized_forms_saves_loads_and_matches(
        features_only, quantized, tmp_path):
    """pytorch#32764: what timm scripts, rmt scripts, backbones and quantize_dynamic forms included."""
    model = timm.create_model('rmt_t', features_only=features_only, **small_kwargs()).eval()
    if quantized:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the eager quantization API is deprecated in favour of torchao
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    torch.jit.script(model).save(str(tmp_path / 'scripted.pt'))
    loaded = torch.jit.load(str(tmp_path / 'scripted.pt'))
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        for got, want in zip(_as_list(loaded(x)), _as_list(model(x)), strict=True):
            assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_model_scripts_after_a_differently_configured_masa_layer_in_the_same_process():
    """TorchScript gives each differently typed module instance its own class; nothing may pin the first one's."""
    torch.jit.script(rmt.MaSA2d(16, 2, learnable_decay=True))
    model = timm.create_model('rmt_t', **small_kwargs()).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert_close(torch.jit.script(model)(x), model(x), atol=1e-5, rtol=1e-4)


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.mark.slow
@pytest.mark.parametrize('name', VARIANTS)
def test_trace_with_gradients_on_saves_loads_and_matches_eager_at_another_size(name, tmp_path):
    model = real_model(name)
    traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))  # autograd on, trace checked against eager
    traced.save(str(tmp_path / 'traced.pt'))
    loaded = torch.jit.load(str(tmp_path / 'traced.pt'))
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def _fx(model, train=False):
    """torchvision's feature extractor as a user calls it: no tracer arguments."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    train_nodes, eval_nodes = get_graph_node_names(model)
    nodes = train_nodes if train else eval_nodes
    return create_feature_extractor(model.train(train), return_nodes=[nodes[-1]])


@pytest.mark.slow
@pytest.mark.parametrize('name', VARIANTS)
def test_torchvision_fx_extractor_matches_eager_at_another_size(name):
    model, x, out = eager_output(name, 1, 3, 96, 80)
    with torch.inference_mode():
        fx_out = list(_fx(model)(x).values())
    assert len(fx_out) == 1
    torch.testing.assert_close(fx_out[0], out, rtol=1e-4, atol=1e-5)


def test_torchvision_fx_extractor_takes_stage_outputs():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = real_model('rmt_t')
    extractor = create_feature_extractor(model, return_nodes={f'stages.{i}': f'stage{i}' for i in range(4)})
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        got = extractor(x)
        want = model.forward_intermediates(x, intermediates_only=True, output_fmt='NHWC')
    assert list(got) == ['stage0', 'stage1', 'stage2', 'stage3']
    for a, b in zip(got.values(), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fx_trace_trains_and_scripts():
    model = timm.create_model('rmt_t', **small_kwargs(num_classes=42))
    traced = _fx(model, train=True)
    out = list(traced(torch.randn(2, 3, 64, 64)).values())[0]
    out.mean().backward()
    grads = {n: p.grad for n, p in traced.named_parameters()}
    assert out.shape == (2, 42) and grads and all(g is not None for g in grads.values())
    scripted = torch.jit.script(_fx(model))
    with torch.inference_mode():
        assert list(scripted(torch.randn(1, 3, 64, 64)).values())[0].shape == (1, 42)


def test_timms_fx_feature_extractor_gives_the_stage_outputs():
    model = timm.create_model('rmt_t', features_only=True, feature_cls='fx', depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        features = model(x)
    assert [tuple(f.shape[1:3]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]

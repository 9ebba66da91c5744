"""Loading checkpoints: every accepted format, and a clear error for everything else."""
import argparse

import pytest
import timm
import torch

from rmt import checkpoint_filter_fn, load_checkpoint_file
from rmt.checkpoint import state_dict_from_checkpoint, weights_key

from tests.helpers import SMALL_CHECKPOINT, SMALL_TL_CHECKPOINT, CodePayload, assert_close, load_small, small_kwargs

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def fresh(**overrides):
    return timm.create_model('rmt_t', **small_kwargs(**overrides)).eval()


def logits(model):
    with torch.no_grad():
        return model(X)


def test_released_file_loads_with_weights_only_unpickling():
    state = load_checkpoint_file(SMALL_CHECKPOINT)
    assert set(state) >= {'model', 'model_ema', 'args'}
    assert isinstance(state['args'], argparse.Namespace)


def test_bare_released_state_dict_gives_the_same_model(small_model):
    model = fresh()
    model.load_state_dict(checkpoint_filter_fn(load_checkpoint_file(SMALL_CHECKPOINT)['model'], model))
    assert torch.equal(logits(model), logits(small_model))


def test_released_position_buffers_are_dropped_after_the_check():
    model = fresh()
    state = checkpoint_filter_fn(load_checkpoint_file(SMALL_CHECKPOINT), model)
    assert not [k for k in state if 'Relpos' in k or 'decay' in k.split('.')[-1]]
    assert set(state) == set(model.state_dict())


def test_weights_are_taken_in_timms_order_without_wrapper_prefixes():
    weights = {'w': torch.zeros(1)}
    assert weights_key({'state_dict': weights, 'model': {}, 'model_ema': {}}) == 'state_dict'
    assert weights_key({'model': weights, 'model_ema': {}}) == 'model'
    assert weights_key({'model': weights, 'model_ema': {}, 'state_dict_ema': {}}, use_ema=True) == 'state_dict_ema'
    assert weights_key({'model': weights, 'model_ema': {}}, use_ema=True) == 'model_ema'
    assert weights_key({'model': weights}, use_ema=True) == 'model'
    wrapped = {'state_dict': {'module.a': 1, '_orig_mod.b': 2, '_orig_mod.module.c': 3, 'd': 4}}
    assert state_dict_from_checkpoint(wrapped) == {'a': 1, 'b': 2, 'c': 3, 'd': 4}


def test_model_weights_are_preferred_over_ema_unless_asked(tmp_path):
    state = load_checkpoint_file(SMALL_CHECKPOINT)
    state['model_ema'] = {k: v + 1 if k.startswith('patch_embed') else v for k, v in state['model_ema'].items()}
    model = fresh()
    plain = checkpoint_filter_fn(state, model)
    ema = checkpoint_filter_fn(state, model, use_ema=True)
    assert torch.equal(plain['stem.conv1.weight'], state['model']['patch_embed.proj.0.weight'])
    assert torch.equal(ema['stem.conv1.weight'], state['model_ema']['patch_embed.proj.0.weight'])


def test_own_state_dict_and_safetensors_round_trip(small_model, tmp_path):
    from safetensors.torch import save_file
    torch.save(small_model.state_dict(), tmp_path / 'own.pth')
    save_file(small_model.state_dict(), str(tmp_path / 'own.safetensors'))
    for name in ('own.pth', 'own.safetensors'):
        model = timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / name)),
                                  **small_kwargs()).eval()
        assert torch.equal(logits(model), logits(small_model)), name


def test_new_class_count_reinitialises_only_the_classifier(small_model):
    model = timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(SMALL_CHECKPOINT)),
                              **small_kwargs(num_classes=37)).eval()
    assert model.get_classifier().out_features == 37
    assert torch.equal(model.head.proj.weight, small_model.head.proj.weight)
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(X), pre_logits=True),
                           small_model.forward_head(small_model.forward_features(X), pre_logits=True))


def test_token_label_checkpoint_in_a_plain_model_warns_and_drops_the_aux_head():
    with pytest.warns(UserWarning, match='aux_head.weight'):
        model = load_small(SMALL_TL_CHECKPOINT)
    assert not model.token_label


def test_unknown_extra_tensor_is_named_and_ignored():
    state = load_checkpoint_file(SMALL_CHECKPOINT)
    state['model']['dist_head.weight'] = torch.zeros(10, 64)
    with pytest.warns(UserWarning, match='dist_head.weight'):
        result = checkpoint_filter_fn(state, fresh())
    assert 'dist_head.weight' not in result


def test_checkpoint_of_another_variant_names_the_disagreeing_keys():
    with pytest.raises(ValueError) as err:
        timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(SMALL_CHECKPOINT)))
    # the position buffers are checked first: they say which configuration the file was made for
    assert str(err.value) == (f"{SMALL_CHECKPOINT}: checkpoint key layers.0.Relpos.angle (8,) does not match this "
                              "model's stage 0 (expected (16,)): the checkpoint was made for another RMT configuration")


def test_position_buffers_of_another_config_are_rejected():
    with pytest.raises(ValueError, match=r'layers\.0\.Relpos\.decay'):
        checkpoint_filter_fn(load_checkpoint_file(SMALL_CHECKPOINT), fresh(heads_ranges=(3, 4, 6, 6)))


def test_missing_keys_are_listed():
    state = load_checkpoint_file(SMALL_CHECKPOINT)
    del state['model']['layers.1.blocks.0.ffn.fc1.weight']
    with pytest.raises(ValueError, match=r'missing keys \(1\): stages\.1\.blocks\.0\.ffn\.fc1\.weight'):
        checkpoint_filter_fn(state, fresh())


def _assert_released_logits(model, expected):
    model.eval()
    for size, case in expected.items():
        with torch.no_grad():
            assert_close(model(case['input']), case['logits'], atol=1e-4, name=str(size))


def test_released_file_loads_through_create_model_checkpoint_path(expected):
    model = timm.create_model('rmt_t', checkpoint_path=str(SMALL_CHECKPOINT), **small_kwargs())
    _assert_released_logits(model, expected)


def test_released_file_loads_through_timm_load_checkpoint(expected):
    model = fresh()
    timm.models.load_checkpoint(model, str(SMALL_CHECKPOINT))
    _assert_released_logits(model, expected)


def test_released_state_dict_loads_through_load_state_dict(expected):
    model = fresh()
    model.load_state_dict(load_checkpoint_file(SMALL_CHECKPOINT)['model'])
    _assert_released_logits(model, expected)


def test_released_state_dict_loads_into_a_features_only_backbone(expected):
    backbone = timm.create_model('rmt_t', features_only=True, **small_kwargs()).eval()
    backbone.load_state_dict({'model.' + k: v for k, v in load_checkpoint_file(SMALL_CHECKPOINT)['model'].items()
                              if not k.startswith(('head.', 'proj.', 'norm.'))})
    with torch.no_grad():
        features = backbone(expected['70x50']['input'])
    for ours, theirs in zip(features, expected['70x50']['stage_features'], strict=True):
        assert_close(ours, theirs, atol=1e-4)


def test_load_state_dict_of_another_config_names_the_disagreeing_keys():
    released = load_checkpoint_file(SMALL_CHECKPOINT)['model']
    with pytest.raises(ValueError, match=r'layers\.0\.Relpos\.decay'):
        fresh(heads_ranges=(3, 4, 6, 6)).load_state_dict(released)
    with pytest.raises(ValueError, match=r'(?s)does not fit.*head\.fc\.weight: checkpoint \(10, 128\) vs model \(7, 128\)'):
        fresh(num_classes=7).load_state_dict(released)


def test_converted_file_of_another_config_says_which_model_it_was_made_for(small_model, tmp_path):
    from safetensors.torch import save_file
    from rmt.checkpoint import model_metadata
    path = tmp_path / 'small.safetensors'
    save_file(small_model.state_dict(), str(path), metadata=model_metadata('rmt_t', dict(small_kwargs())))
    with pytest.raises(ValueError, match='small.safetensors was converted for rmt_t with .*embed_dims'):
        timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_without_a_file_says_how_to_pass_one():
    with pytest.raises(RuntimeError, match='pretrained_cfg_overlay=dict\\(file='):
        timm.create_model('rmt_t', pretrained=True)


def test_truncated_file_is_named_in_the_error(tmp_path):
    data = SMALL_CHECKPOINT.read_bytes()
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match='truncated.pth.*truncated or corrupted'):
        load_checkpoint_file(bad)


def test_truncated_safetensors_file_is_named_in_a_one_line_error(small_model, tmp_path):
    from safetensors.torch import save_file
    save_file(small_model.state_dict(), str(tmp_path / 'whole.safetensors'))
    data = (tmp_path / 'whole.safetensors').read_bytes()
    bad = tmp_path / 'cut.safetensors'
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match='cut.safetensors.*truncated or corrupted') as err:
        load_checkpoint_file(bad)
    assert '\n' not in str(err.value)


def test_file_of_random_bytes_is_called_not_a_checkpoint(tmp_path):
    bad = tmp_path / 'noise.pth'
    bad.write_bytes(bytes(range(7, 256)) * 20)
    with pytest.raises(RuntimeError, match='noise.pth is not a PyTorch checkpoint') as err:
        load_checkpoint_file(bad)
    assert '\n' not in str(err.value)


def test_empty_file_is_named_in_the_error(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(RuntimeError, match='empty.pth: the file is empty'):
        load_checkpoint_file(tmp_path / 'empty.pth')


def test_missing_file_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        load_checkpoint_file(tmp_path / 'nowhere.pth')


def test_loading_never_runs_code_from_the_file(tmp_path):
    payload = CodePayload(str(tmp_path / 'payload_ran'))
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'args': payload}, evil)
    with pytest.raises(RuntimeError, match='refusing to load .*evil.pth: it holds posix.system') as err:
        load_checkpoint_file(evil)
    assert not payload.ran() and '\n' not in str(err.value)


@pytest.mark.parametrize('shape', [(3, 64, 64), (1, 1, 3, 64, 64), (1, 4, 64, 64)])
def test_input_that_is_not_an_image_batch_raises_value_error(shape):
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\), got \[' + ', '.join(map(str, shape))):
        fresh()(torch.randn(*shape))


def test_integer_images_raise_a_one_line_value_error():
    with pytest.raises(ValueError, match='floating-point images.* got torch.uint8') as err:
        fresh()(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert '\n' not in str(err.value)


def test_one_pixel_input_runs():
    assert fresh()(torch.randn(1, 3, 1, 1)).shape == (1, 10)


# --- every timm loading path names the file in one line ---------------------------------------------------

def _unreadable(kind, tmp_path, small_model):
    if kind == 'empty':
        data = b''
    elif kind == 'text':
        data = b'{"model": "not weights"}\n'
    elif kind == 'truncated':
        data = SMALL_CHECKPOINT.read_bytes()[:100_000]
    elif kind == 'random':
        data = bytes(range(7, 256)) * 20
    elif kind == 'list':
        torch.save([torch.zeros(1)], tmp_path / 'list.pth')
        return tmp_path / 'list.pth'
    else:
        from safetensors.torch import save_file
        save_file(small_model.state_dict(), str(tmp_path / 'whole.safetensors'))
        data = (tmp_path / 'whole.safetensors').read_bytes()[:50_000]
    path = tmp_path / (f'{kind}.safetensors' if kind == 'safetensors' else f'{kind}.pth')
    path.write_bytes(data)
    return path


LOADERS = {
    'checkpoint_path': lambda path, **kw: timm.create_model('rmt_t', checkpoint_path=str(path), **small_kwargs(**kw)),
    'features_only checkpoint_path': lambda path, **kw: timm.create_model(
        'rmt_t', features_only=True, checkpoint_path=str(path), **small_kwargs(**kw)),
    'load_checkpoint': lambda path, **kw: timm.models.load_checkpoint(fresh(**kw), str(path)),
}


@pytest.mark.parametrize('loader', LOADERS)
@pytest.mark.parametrize('kind', ['empty', 'text', 'truncated', 'random', 'list', 'safetensors'])
def test_unreadable_file_through_timm_paths_is_one_line_naming_it(kind, loader, tmp_path, small_model):
    path = _unreadable(kind, tmp_path, small_model)
    with pytest.raises(RuntimeError) as err:
        LOADERS[loader](path)
    assert str(path) in str(err.value) and '\n' not in str(err.value)


@pytest.mark.parametrize('loader', LOADERS)
def test_missing_file_through_timm_paths_names_it(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        LOADERS[loader](tmp_path / 'nowhere.pth')


@pytest.mark.parametrize('loader', LOADERS)
def test_another_variant_in_our_names_through_timm_paths_is_one_short_line_naming_the_file(loader, tmp_path):
    other = timm.create_model('rmt_t', **small_kwargs(embed_dims=(32, 64, 96, 128), depths=(1, 3, 1, 1)))
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': other.state_dict()}, path)
    with pytest.raises(ValueError) as err:
        LOADERS[loader](path)
    message = str(err.value)
    assert message.startswith(f'{path} does not fit this RMT model | shape mismatches (')
    assert 'missing keys (' in message and 'unexpected keys (' in message
    assert '\n' not in message and len(message) < 1500


def test_another_variant_through_load_state_dict_is_one_line_not_torchs_list():
    other = timm.create_model('rmt_t', **small_kwargs(depths=(1, 3, 1, 1)))
    with pytest.raises(RuntimeError) as err:  # torch's exception type, still (and a ValueError)
        fresh().load_state_dict(other.state_dict())
    message = str(err.value)
    assert message.startswith('the state dict does not fit this RMT model | missing keys (24): stages.2.blocks.1.')
    assert ' | unexpected keys (22): stages.1.blocks.2.' in message
    assert '\n' not in message and len(message) < 1500

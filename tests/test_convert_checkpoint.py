"""scripts/convert_checkpoint.py: released .pth to a clean, verified .safetensors state dict."""
import os

import pytest
import timm
import torch
from safetensors import safe_open

import rmt
from rmt.checkpoint import read_model_metadata
from rmt.tools.cli import ScriptError
from tests.helpers import FIXTURES, SMALL_CHECKPOINT, SMALL_CONFIG, load_script, script, small_kwargs

convert_checkpoint = load_script('convert_checkpoint')
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

CONFIG = str(SMALL_CONFIG)
RELEASED = str(SMALL_CHECKPOINT)


def load_converted(path):
    return timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                             **small_kwargs()).eval()


def test_converted_released_checkpoint_reproduces_the_released_logits(tmp_path):
    out = tmp_path / 'small.safetensors'
    proc = script('convert_checkpoint', RELEASED, out, '--model', 'rmt_t', '--official-config', CONFIG,
                  '--verify-size', '64')
    assert "converting the plain weights ('model')" in proc.stderr
    with safe_open(str(out), 'pt') as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and not any(k.startswith(('layers.', 'patch_embed.')) for k in keys)  # the project's names
    assert metadata['model'] == 'rmt_t' and metadata['weights'] == 'model'
    assert os.listdir(tmp_path) == ['small.safetensors']  # no temporary left behind
    model = load_converted(str(out))
    for size, case in torch.load(FIXTURES / 'official_small_expected.pt').items():
        with torch.no_grad():
            assert torch.allclose(model(case['input']), case['logits'], atol=1e-4), size


def test_converted_file_names_its_model_and_kwargs(tmp_path):
    out = str(tmp_path / 'small.safetensors')
    convert_checkpoint.main([RELEASED, out, '--model', 'rmt_t', '--official-config', CONFIG, '--verify-size', '48'])
    name, kwargs = read_model_metadata(out)
    assert name == 'rmt_t'
    assert kwargs == small_kwargs()  # the released config's values, in this project's names


def test_conversion_takes_the_plain_weights_like_the_loader_and_ema_when_asked(tmp_path, caplog):
    state = rmt.load_checkpoint_file(RELEASED)
    state['model_ema'] = dict(state['model'], **{'head.weight': state['model']['head.weight'] + 1.0})
    torch.save(state, tmp_path / 'with_ema.pth')
    for flag, expected, said in (([], state['model'], "the plain weights ('model')"),
                                 (['--use-ema'], state['model_ema'], "the EMA weights ('model_ema')")):
        out = str(tmp_path / f'converted{"".join(flag)}.safetensors')
        caplog.clear()
        with caplog.at_level('INFO'):
            convert_checkpoint.main([str(tmp_path / 'with_ema.pth'), out, '--model', 'rmt_t', '--official-config',
                                     CONFIG, '--verify-size', '48', *flag])
        assert torch.equal(rmt.load_checkpoint_file(out)['head.fc.weight'], expected['head.weight']), flag
        assert said in caplog.text, flag
    plain = load_converted(str(tmp_path / 'converted.safetensors'))
    loaded = timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'with_ema.pth')),
                               **small_kwargs())
    assert torch.equal(plain.head.fc.weight, loaded.head.fc.weight)  # the same default as the loader


def test_use_ema_without_ema_weights_is_an_error(tmp_path):
    state = rmt.load_checkpoint_file(RELEASED)
    del state['model_ema']
    torch.save(state, tmp_path / 'plain.pth')
    with pytest.raises(ScriptError, match='--use-ema: .*plain.pth has no EMA weights'):
        convert_checkpoint.main([str(tmp_path / 'plain.pth'), str(tmp_path / 'x.safetensors'), '--model', 'rmt_t',
                                 '--official-config', CONFIG, '--use-ema'])

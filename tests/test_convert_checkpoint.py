"""scripts/convert_checkpoint.py: released .pth to a clean, verified .safetensors state dict."""
import json
import os
import sys

import timm
import torch
from safetensors import safe_open

from _rmt_training import FIXTURES, SCRIPTS, one_thread, script  # noqa: F401  (one_thread: autouse)

sys.path.insert(0, SCRIPTS)
import convert_checkpoint  # noqa: E402

import rmt  # noqa: E402



CONFIG = os.path.join(FIXTURES, 'official_small_config.json')
RELEASED = os.path.join(FIXTURES, 'official_small_checkpoint.pth')


def load_converted(path):
    with open(CONFIG) as f:
        kwargs = rmt.official_config_to_kwargs(json.load(f))
    return timm.create_model('rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs).eval()


def test_converted_released_checkpoint_reproduces_the_released_logits(tmp_path):
    out = tmp_path / 'small.safetensors'
    script('convert_checkpoint', RELEASED, out, '--model', 'rmt_t', '--official-config', CONFIG, '--verify-size', '64')
    with safe_open(str(out), 'pt') as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and not any(k.startswith(('layers.', 'patch_embed.')) for k in keys)  # the project's names
    assert metadata['ema'] == 'True' and metadata['model'] == 'rmt_t'
    assert os.listdir(tmp_path) == ['small.safetensors']  # no temporary left behind
    model = load_converted(str(out))
    for size, case in torch.load(os.path.join(FIXTURES, 'official_small_expected.pt')).items():
        with torch.no_grad():
            assert torch.allclose(model(case['input']), case['logits'], atol=1e-4), size


def test_conversion_takes_the_ema_weights_when_present(tmp_path):
    state = rmt.load_checkpoint_file(RELEASED)
    state['model_ema'] = dict(state['model'], **{'head.weight': state['model']['head.weight'] + 1.0})
    torch.save(state, tmp_path / 'with_ema.pth')
    for flag, expected in (([], state['model_ema']), (['--no-ema'], state['model'])):
        out = str(tmp_path / f'converted{len(flag)}.safetensors')
        convert_checkpoint.main([str(tmp_path / 'with_ema.pth'), out, '--model', 'rmt_t', '--official-config', CONFIG,
                                 '--verify-size', '48', *flag])
        assert torch.equal(rmt.load_checkpoint_file(out)['head.fc.weight'], expected['head.weight'])

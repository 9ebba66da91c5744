#!/usr/bin/env python3
"""Convert a released RMT ``.pth`` (or a training checkpoint of ours) to a clean ``.safetensors`` state dict.

    python scripts/convert_checkpoint.py RMT-S.pth RMT-S.safetensors --model rmt_s

The output holds only the weights, in this project's parameter names, taken from the EMA weights
when the checkpoint has them (``--no-ema`` takes the plain ones). The class count (and the
token-labeling head) is read from the checkpoint. Before the file is written, a model loaded from the
converted weights must give exactly the outputs of the model loaded from the original file; the
file is written atomically. Load the result with
``timm.create_model('rmt_s', pretrained=True, pretrained_cfg_overlay=dict(file='RMT-S.safetensors'))``.
"""
import argparse
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    ScriptError, add_model_kwargs_arg, has_ema, pick_weights, read_checkpoint, rmt, run_main)

from timm import utils  # noqa: E402
from timm.models import create_model  # noqa: E402

_logger = logging.getLogger('convert')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Released RMT checkpoint to a verified .safetensors state dict')
    p.add_argument('input', help='checkpoint: released .pth, or one written by scripts/train.py')
    p.add_argument('output', help='.safetensors file to write')
    p.add_argument('--model', default=None, help='rmt_t, rmt_s, rmt_b or rmt_l (default: from our checkpoints)')
    add_model_kwargs_arg(p)
    p.add_argument('--official-config', default='', metavar='JSON',
                   help='model configuration in the released code\'s argument names (for custom sizes)')
    p.add_argument('--no-ema', action='store_true', default=False, help='take the plain weights even with an EMA')
    p.add_argument('--verify-size', type=int, default=224, help='image size of the output check (default: 224)')
    return p


def _create(name: str, kwargs: dict) -> torch.nn.Module:
    try:
        return create_model(name, **kwargs).eval()
    except (ValueError, RuntimeError, TypeError) as e:
        raise ScriptError(f'cannot create {name} with {kwargs}: {e}') from None


def _load(model: torch.nn.Module, weights: dict, source: str) -> None:
    try:
        model.load_state_dict(rmt.checkpoint_filter_fn(weights, model, source=source), strict=True)
    except (ValueError, RuntimeError) as e:
        raise ScriptError(f'{source} does not fit the model: {e}') from None


def main(argv=None):
    utils.setup_default_logging()
    args = build_parser().parse_args(argv)
    if not args.output.endswith('.safetensors'):
        raise ScriptError(f'output {args.output} should end in .safetensors')
    state = read_checkpoint(args.input)
    use_ema = has_ema(state) and not args.no_ema
    weights = pick_weights(state, use_ema)

    trained = vars(state['args']) if isinstance(state.get('args'), argparse.Namespace) \
        and isinstance(state.get('state_dict'), dict) else {}
    name = args.model or trained.get('model')
    if not name:
        raise ScriptError('--model is required (e.g. --model rmt_s)')
    kwargs = dict(trained.get('model_kwargs') or {})
    if args.official_config:
        with open(args.official_config) as f:
            kwargs.update(rmt.official_config_to_kwargs(json.load(f)))
    kwargs.update(args.model_kwargs)
    for key in ('head.fc.weight', 'head.weight'):  # ours, released
        if key in weights:
            kwargs['num_classes'] = weights[key].shape[0]
            break
    if 'aux_head.weight' in weights:
        kwargs['token_label'] = True

    original = _create(name, kwargs)
    _load(original, weights, args.input)
    clean = {k: v.detach().clone().contiguous() for k, v in original.state_dict().items()}
    _logger.info(f'{args.input}: {"EMA" if use_ema else "plain"} weights, {len(clean)} tensors, '
                 f'{sum(v.numel() for v in clean.values()):,} values, {kwargs.get("num_classes")} classes')

    from safetensors.torch import save_file
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, '.tmp-' + os.path.basename(args.output))  # keeps the .safetensors suffix
    metadata = dict(format='pt', model=name, model_kwargs=repr(kwargs), ema=str(use_ema),
                    source=os.path.basename(args.input))
    try:
        save_file(clean, tmp, metadata=metadata)
        converted = _create(name, kwargs)
        _load(converted, rmt.load_checkpoint_file(tmp), tmp)
        x = torch.randn(2, original.in_chans, args.verify_size, args.verify_size,
                        generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected, got = original(x), converted(x)
        if not torch.equal(expected, got):
            diff = (expected - got).abs().max().item()
            raise ScriptError(f'verification failed: outputs differ by up to {diff:.3g}; '
                              f'{args.output} not written')
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _logger.info(f'Wrote {args.output}: outputs at {args.verify_size} px identical to the original\'s')
    return args.output


if __name__ == '__main__':
    run_main(main, _logger)

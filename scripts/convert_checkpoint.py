#!/usr/bin/env python3
"""Convert a released RMT ``.pth`` (or a training checkpoint of ours) to a clean ``.safetensors`` state dict, or
publish it as a folder in timm's Hugging Face Hub layout.

    python scripts/convert_checkpoint.py RMT-S.pth RMT-S.safetensors --model rmt_s
    python scripts/convert_checkpoint.py RMT-S.pth --hub-dir rmt_s.in1k --model rmt_s

With ``--hub-dir DIR`` it writes ``config.json``, ``model.safetensors`` and a ``README.md`` model card
(:func:`rmt.hub.write_hub_folder`), loads the folder back with ``timm.create_model('local-dir:DIR',
pretrained=True)`` and keeps it only when the outputs equal the original's; ``hf upload org/name DIR``
then publishes it unchanged, and ``timm.create_model('hf-hub:org/name', pretrained=True)`` loads it.

The output holds the weights in this project's parameter names, and names its model and constructor
kwargs in its metadata, so ``scripts/validate.py --checkpoint OUT`` and ``python -m rmt --checkpoint
OUT`` need no model flags. It takes the plain weights (``model`` / ``state_dict``), as loading a
checkpoint does; ``--use-ema`` takes the EMA weights. It logs which it took. The class count (and the
token-labeling head) is read from the checkpoint. Before the file is written, a model loaded from the
converted weights must give exactly the outputs of the model loaded from the original file; the
file is written atomically. Load the result with
``timm.create_model('rmt_s', pretrained=True, pretrained_cfg_overlay=dict(file='RMT-S.safetensors'))``.
"""
import importlib.util
import logging
import os

import torch
from safetensors.torch import load as safetensors_load, save as safetensors_save

from timm import utils
from timm.models import create_model

from rmt import RMT
from rmt.atomic import atomic_write
from rmt.checkpoint import checkpoint_filter_fn, has_ema, model_metadata, state_dict_from_checkpoint, weights_key
from rmt.tools.cli import (
    ArgumentParser, ScriptError, add_model_args, describe_weights, model_kwargs_from_args, model_name, positive_int,
    read_checkpoint, require_model, run_main, saved_settings)
from rmt.hub import write_hub_folder

_logger = logging.getLogger('convert')
DATA_SETTINGS = ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')  # a run's, for the Hub cfg


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description='Released RMT checkpoint to a verified .safetensors state dict')
    p.add_argument('input', metavar='INPUT', help='checkpoint: released .pth, or one written by scripts/train.py')
    p.add_argument('output', metavar='OUTPUT', nargs='?', default=None, help='.safetensors file to write')
    p.add_argument('--hub-dir', metavar='DIR', default=None,
                   help="instead of OUTPUT: a folder in timm's Hub layout (config.json, model.safetensors, README.md)")
    p.add_argument('--repo-id', metavar='ORG/NAME', default=None,
                   help='with --hub-dir: the Hub repository the model card loads from (default: your-org/DIR name)')
    p.add_argument('--license', default='other',
                   help="with --hub-dir: the card's license id (default: other, the authors' terms)")
    p.add_argument('--model', type=model_name, default=None,
                   help='rmt_t, rmt_s, rmt_b or rmt_l (default: from our checkpoints)')
    add_model_args(p)
    p.add_argument('--use-ema', action='store_true', default=False,
                   help='take the EMA weights (model_ema / state_dict_ema) instead of the plain ones')
    p.add_argument('--verify-size', type=positive_int, default=224,
                   help='image size of the output check (default: 224)')
    return p


def _create(name: str, kwargs: dict) -> torch.nn.Module:
    try:
        return create_model(name, **kwargs).eval()
    except (ValueError, RuntimeError, TypeError) as e:
        raise ScriptError(f'cannot create {name} with {kwargs}: {e}') from None


def _load(model: torch.nn.Module, weights: dict, source: str) -> None:
    try:
        model.load_state_dict(checkpoint_filter_fn(weights, model, source=source), strict=True)
    except (ValueError, RuntimeError) as e:
        raise ScriptError(f'{source} does not fit the model: {e}') from None


def _write_hub_folder(args, model: torch.nn.Module, name: str, kwargs: dict, key: str, trained: dict) -> str:
    data_config = {k: trained[k] for k in DATA_SETTINGS if trained.get(k) is not None}  # a training run's
    try:
        write_hub_folder(model, args.hub_dir, name, kwargs, args.input, weights=key or 'state dict',
                         repo_id=args.repo_id, license=args.license, data_config=data_config,
                         verify_size=args.verify_size)
    except RuntimeError as e:
        raise ScriptError(str(e)) from None
    except OSError as e:
        raise ScriptError(f'--hub-dir {args.hub_dir}: cannot write it ({e.strerror or e})') from None
    _logger.info(f'Wrote {args.hub_dir} (config.json, model.safetensors, README.md; {name}, weights '
                 f'{key or "state dict"!r}): loaded through local-dir:, outputs at {args.verify_size} px identical '
                 f'to the original\'s. Publish it with: hf upload ORG/NAME {args.hub_dir}')
    return args.hub_dir


def main(argv=None):
    utils.setup_default_logging()
    args = build_parser().parse_args(argv)
    if (args.output is None) == (args.hub_dir is None):
        raise ScriptError('give either OUTPUT (a .safetensors file) or --hub-dir DIR (a Hub folder), not both' if
                          args.output else 'OUTPUT or --hub-dir DIR is required')
    if args.hub_dir is not None:
        if os.path.exists(args.hub_dir) and not os.path.isdir(args.hub_dir):
            raise ScriptError(f'--hub-dir {args.hub_dir}: a file, expected a folder to write')
        if importlib.util.find_spec('fvcore') is None:
            raise ScriptError('--hub-dir: the model card\'s GFLOPs are counted with fvcore: pip install fvcore')
    elif not args.output.endswith('.safetensors'):
        raise ScriptError(f'OUTPUT {args.output}: expected a file name ending in .safetensors')
    elif os.path.isdir(args.output):
        raise ScriptError(f'OUTPUT {args.output}: a folder, expected a .safetensors file to write')
    state = read_checkpoint(args.input, 'INPUT')
    if args.use_ema and not has_ema(state):
        raise ScriptError(f'--use-ema: {args.input} has no EMA weights')
    key = weights_key(state, args.use_ema)
    weights = state_dict_from_checkpoint(state, args.use_ema)

    trained = saved_settings(args.input, state)
    name = require_model(args.model or trained.get('model'))
    kwargs = dict(trained.get('model_kwargs') or {})
    kwargs.update(model_kwargs_from_args(args))
    for k in ('head.fc.weight', 'head.weight'):  # ours, released
        if k in weights:
            kwargs['num_classes'] = weights[k].shape[0]
            break
    if 'aux_head.weight' in weights:
        kwargs['token_label'] = True

    original = _create(name, kwargs)
    if not isinstance(original, RMT):
        raise ScriptError(f'--model {name}: this script converts RMT checkpoints (rmt_t, rmt_s, rmt_b, rmt_l)')
    _load(original, weights, args.input)
    clean = {k: v.detach().clone().contiguous() for k, v in original.state_dict().items()}
    _logger.info(f'{args.input}: converting {describe_weights(state, args.use_ema)}, {len(clean)} tensors, '
                 f'{sum(v.numel() for v in clean.values()):,} values, {kwargs.get("num_classes")} classes')

    if args.hub_dir is not None:
        return _write_hub_folder(args, original, name, kwargs, key, trained)
    metadata = model_metadata(name, kwargs, weights=key or 'state dict', source=os.path.basename(args.input))
    data = safetensors_save(clean, metadata=metadata)
    converted = _create(name, kwargs)
    _load(converted, safetensors_load(data), args.output)
    x = torch.randn(2, original.in_chans, args.verify_size, args.verify_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(x), converted(x)
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise ScriptError(f'verification failed: outputs differ by up to {diff:.3g}; {args.output} not written')
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic_write(args.output, lambda f: f.write(data))
    except OSError as e:
        raise ScriptError(f'OUTPUT {args.output}: cannot write it ({e.strerror})') from None
    _logger.info(f'Wrote {args.output} ({name}, weights {metadata["weights"]!r}): outputs at {args.verify_size} px '
                 f'identical to the original\'s')
    return args.output


if __name__ == '__main__':
    run_main(main)

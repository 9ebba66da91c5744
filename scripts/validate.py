#!/usr/bin/env python3
"""Top-1, top-5 and loss of a model on an image folder or a timm dataset.

    python scripts/validate.py --data-dir /data/imagenet --model rmt_s --checkpoint RMT-S.pth
    python scripts/validate.py --data-dir pets --checkpoint output/train/my-run/model_best.pth.tar

``--checkpoint`` takes a released RMT file, a ``.safetensors`` file, or a checkpoint written by
``scripts/train.py``. For the latter the model, its arguments, the class count and the evaluation
image settings default to the ones the run trained with, so the numbers match its ``summary.csv``
(the same evaluation code, ``rmt.evaluate``, computes both); a ``.safetensors`` written by
``scripts/convert_checkpoint.py`` names its model and kwargs. Prints a JSON line with the results
as its last output.
"""
import argparse
import json
import logging
from contextlib import suppress
from functools import partial

import torch

from timm import utils
from timm.data import resolve_data_config

from rmt.checkpoint import has_ema
from rmt.cli import (
    ScriptError, add_model_args, apply_saved_settings, build_model, default_device, default_workers, load_weights,
    parse_args_with_config, run_main)
from rmt.data import check_num_classes, create_eval_loader, dataset_classes, open_dataset
from rmt.evaluate import evaluate

_logger = logging.getLogger('validate')

# settings a training checkpoint (or a converted file: model, model_kwargs) supplies when not given
FROM_TRAINING = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'img_size', 'input_size', 'crop_pct', 'mean',
                 'std', 'interpolation', 'class_map', 'dataset')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Validate RMT (or any timm model) with timm', allow_abbrev=False)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of flag values (flags override it)')
    p.add_argument('--data-dir', metavar='DIR', help='dataset root (image folder: DIR/<split>/ or DIR itself)')
    p.add_argument('--dataset', metavar='NAME', default=None, help='timm dataset "<type>/<name>" (default: folder)')
    p.add_argument('--split', metavar='NAME', default='validation')
    p.add_argument('--dataset-download', action='store_true', default=False)
    p.add_argument('--class-map', default=None, metavar='FILE')
    p.add_argument('--model', default=None, metavar='NAME', help='model name (default: from a training checkpoint)')
    p.add_argument('--pretrained', action='store_true', default=False)
    p.add_argument('--checkpoint', default='', metavar='FILE', help='weights: released .pth, ours, or .safetensors')
    p.add_argument('--use-ema', action='store_true', default=False, help='use the EMA weights of the checkpoint')
    add_model_args(p)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--in-chans', type=int, default=None)
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--input-size', default=None, nargs=3, type=int, metavar=('C', 'H', 'W'))
    p.add_argument('--crop-pct', default=None, type=float)
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=float, nargs='+', default=None)
    p.add_argument('--interpolation', default=None, type=str)
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=default_workers(),
                   help='data-loading processes (default: 4, or the number of cores if fewer)')
    p.add_argument('--device', default=default_device(), help='default: cuda when available, else cpu')
    p.add_argument('--amp', action='store_true', default=False)
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    p.add_argument('--channels-last', action='store_true', default=False)
    p.add_argument('--results-file', default='', metavar='FILE', help='also write the results as JSON here')
    return p


def main(argv=None):
    utils.setup_default_logging()
    args = parse_args_with_config(build_parser(), argv)
    state = apply_saved_settings(args, FROM_TRAINING)
    args.dataset = args.dataset or ''
    args.class_map = args.class_map or ''
    if not args.model:
        raise ScriptError('--model is required (only checkpoints written by scripts/train.py and files converted by '
                          'scripts/convert_checkpoint.py name their model)')
    if args.use_ema and state and not has_ema(state):
        raise ScriptError(f'--use-ema: {args.checkpoint} has no EMA weights')
    del state

    dataset = open_dataset(args, args.split, False, args.class_map, require_split=False)  # DIR may be the split
    model = build_model(args, args.num_classes)
    if args.checkpoint:
        load_weights(model, args.checkpoint, use_ema=args.use_ema)
    classes = dataset_classes(dataset)
    check_num_classes(classes, model.num_classes, f'the "{args.split}" split of {args.data_dir}',
                      f'pass --num-classes {len(classes) if classes else ""} and matching weights')

    device = torch.device(args.device)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model, verbose=True)
    loader = create_eval_loader(dataset, data_config, args.batch_size, args.workers, device)
    amp_autocast = partial(torch.autocast, device_type=device.type,
                           dtype=torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16) \
        if args.amp else suppress
    metrics = evaluate(model, loader, device, amp_autocast, args.channels_last)

    results = dict(model=args.model, checkpoint=args.checkpoint, ema=args.use_ema, split=args.split,
                   images=len(dataset), img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
                   top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'])
    _logger.info(f'{args.model} on {len(dataset)} images of "{args.split}" at {data_config["input_size"][-1]} px: '
                 f'top1 {metrics["top1"]:.3f}  top5 {metrics["top5"]:.3f}  loss {metrics["loss"]:.4f}')
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))
    return results


if __name__ == '__main__':
    run_main(main, _logger)

#!/usr/bin/env python3
"""Top-1, top-5 and loss of a model on an image folder or a timm dataset.

    python scripts/validate.py --data-dir /data/imagenet --model rmt_s --checkpoint RMT-S.pth
    python scripts/validate.py --data-dir pets --checkpoint output/train/my-run/model_best.pth.tar

``--checkpoint`` takes a released RMT file, a ``.safetensors`` file, or a checkpoint written by
``scripts/train.py``. For the latter the model, its arguments, the class count and the evaluation
image settings default to the ones the run trained with, so the numbers match its ``summary.csv``
(the same evaluation code, ``rmt.tools.evaluate``, computes both); a ``.safetensors`` written by
``scripts/convert_checkpoint.py`` names its model and kwargs. Prints a JSON line with the results
as its last output.
"""
import json
import logging
import os

import torch

from timm import utils
from timm.data import resolve_data_config

from rmt.checkpoint import has_ema
from rmt.data import dataset_classes
from rmt.tools.cli import (
    ArgumentParser, ScriptError, add_amp_args, add_model_args, apply_saved_settings, autocast_for, available_device,
    build_model, check_num_classes, data_workers, default_device, default_workers, finite_float, load_weights,
    model_name, open_split, parse_args_with_config, positive_float, positive_int, run_main)
from rmt.tools.data import create_eval_loader
from rmt.tools.evaluate import evaluate

_logger = logging.getLogger('validate')


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description='Validate RMT (or any timm model) with timm', allow_abbrev=False)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of flag values (flags override it)')
    p.add_argument('--data-dir', metavar='DIR', help='dataset root (image folder: DIR/<split>/ or DIR itself)')
    p.add_argument('--dataset', metavar='NAME', default=None, help='timm dataset "<type>/<name>" (default: folder)')
    p.add_argument('--split', metavar='NAME', default='validation')
    p.add_argument('--dataset-download', action='store_true', default=False)
    p.add_argument('--class-map', default=None, metavar='FILE')
    p.add_argument('--model', type=model_name, default=None, metavar='NAME',
                   help='model name (default: from a training checkpoint)')
    p.add_argument('--pretrained', action='store_true', default=False)
    p.add_argument('--checkpoint', default='', metavar='FILE', help='weights: released .pth, ours, or .safetensors')
    p.add_argument('--use-ema', action='store_true', default=False, help='use the EMA weights of the checkpoint')
    add_model_args(p)
    p.add_argument('--num-classes', type=positive_int, default=None)
    p.add_argument('--in-chans', type=positive_int, default=None)
    p.add_argument('--img-size', type=positive_int, default=None)
    p.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar=('C', 'H', 'W'))
    p.add_argument('--crop-pct', default=None, type=positive_float)
    p.add_argument('--mean', type=finite_float, nargs='+', default=None)
    p.add_argument('--std', type=positive_float, nargs='+', default=None)
    p.add_argument('--interpolation', default=None, type=str)
    p.add_argument('-b', '--batch-size', type=positive_int, default=256)
    p.add_argument('-j', '--workers', type=data_workers, default=default_workers(),
                   help='data-loading processes, at most the number of cores (default: 4, or the cores if fewer)')
    p.add_argument('--device', type=available_device, default=default_device(),
                   help='default: cuda when available, else cpu')
    add_amp_args(p)
    p.add_argument('--channels-last', action='store_true', default=False)
    p.add_argument('--results-file', default='', metavar='FILE', help='also write the results as JSON here')
    return p


def main(argv=None):
    utils.setup_default_logging()
    args = parse_args_with_config(build_parser(), argv)
    state = apply_saved_settings(args)
    args.dataset = args.dataset or ''
    args.class_map = args.class_map or ''
    folder = os.path.dirname(os.path.abspath(args.results_file)) if args.results_file else ''
    if folder and not os.path.isdir(folder):
        raise ScriptError(f'--results-file {args.results_file}: no folder {folder} to write it in')
    if args.use_ema and state and not has_ema(state):
        raise ScriptError(f'--use-ema: {args.checkpoint} has no EMA weights')
    del state

    dataset = open_split(args, args.split, False, args.class_map, require_split=False)  # DIR may be the split
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
    amp_autocast, _ = autocast_for(args, device)
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
    run_main(main)

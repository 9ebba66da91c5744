#!/usr/bin/env python3
"""Train or fine-tune RMT (or any timm model) on an image folder or a timm dataset.

Takes timm's ``train.py`` flags with the same names and meanings (``--config FILE.yaml`` sets any of
them; the command line wins) and is built from timm's library: datasets, loaders, transforms and
Mixup from ``timm.data``, losses from ``timm.loss``, ``create_optimizer_v2``, ``create_scheduler_v2``,
EMA, loss scaling, checkpoint saving, ``summary.csv`` and distributed set-up from ``timm.utils``;
what the scripts share comes from ``rmt.tools``.

    python scripts/train.py --config configs/rmt_t_in1k.yaml --data-dir /data/imagenet
    torchrun --nproc-per-node 8 scripts/train.py --config configs/rmt_s_in1k.yaml --data-dir /data/imagenet
    python scripts/train.py --config configs/rmt_s_transfer.yaml --data-dir pets \\
        --pretrained-path RMT-S.pth --num-classes 37

Token labeling (``--token-label --token-label-data DIR``, the recipes ``configs/rmt_*_in1k_tl.yaml``)
trains a ``*_tl`` RMT on per-image label maps as the RMT release does: flip, RandAugment and crop of
image and map together, dense targets cut at the model's output grid, MixToken in the model, and the
1.0 / 0.5 class and token loss (:mod:`rmt.token_labeling`).

Fault tolerance: checkpoints are written atomically at the end of every epoch; ``--resume
OUTPUT/last.pth.tar`` restores the epoch, model, optimizer, LR scheduler, EMA and loss-scaler state
and the random streams are re-seeded from ``--seed`` and the epoch number at the start of every
epoch, so a killed run resumed from its last checkpoint continues exactly as if uninterrupted (on
a deterministic device; the interrupted epoch is redone from its start). A non-finite loss stops
the run with a message naming the step.
"""
import argparse
import csv
import difflib
import logging
import math
import os
import sys
import time
from contextlib import suppress
from datetime import datetime, timedelta
from functools import partial

import torch
import torch.nn as nn
import yaml
from torchvision import transforms

from timm import utils
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import clean_state_dict, model_parameters, safe_model_name
from timm.optim import create_optimizer_v2, list_optimizers, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from rmt.data import dataset_classes
from rmt.token_labeling import TokenLabelDataset, TokenLabelLoss, TokenLabelTransform, read_meta
from rmt.tools.cli import (
    ArgumentParser, ScriptError, add_amp_args, add_model_args, autocast_for, available_device, build_model,
    check_fits, check_num_classes, data_workers, default_device, default_workers, finite_float, model_kwargs_from_args,
    model_name, non_negative_float, non_negative_int, open_split, parse_args_with_config, positive_float, positive_int,
    probability, read_checkpoint, run_main)
from rmt.tools.data import create_eval_loader
from rmt.tools.evaluate import evaluate
from rmt.tools.train_utils import AtomicCheckpointSaver, allow_posterize_to_zero_bits, distributed_data_parallel

_logger = logging.getLogger('train')


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description='Train or fine-tune RMT with timm', allow_abbrev=False)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of flag values (flags override it)')
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', metavar='DIR', help='dataset root (image folder: train/ and validation/ or val/)')
    g.add_argument('--dataset', metavar='NAME', default='', help='timm dataset "<type>/<name>" (default: image folder)')
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation', help='"" to train without validation')
    g.add_argument('--dataset-download', action='store_true', default=False)
    g.add_argument('--class-map', default='', metavar='FILE', help='class name to index mapping file')
    g.add_argument('--num-classes', type=positive_int, default=None, metavar='N',
                   help='classes (default: the model\'s)')
    g.add_argument('--img-size', type=positive_int, default=None, metavar='N',
                   help='image size (default: the model\'s)')
    g.add_argument('--in-chans', type=positive_int, default=None, metavar='N')
    g.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar=('C', 'H', 'W'))
    g.add_argument('--crop-pct', default=None, type=positive_float, metavar='PCT',
                   help='validation centre-crop fraction')
    g.add_argument('--mean', type=finite_float, nargs='+', default=None)
    g.add_argument('--std', type=positive_float, nargs='+', default=None)
    g.add_argument('--interpolation', default='', type=str)
    g.add_argument('-b', '--batch-size', type=positive_int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=positive_int, default=None, metavar='N')
    g.add_argument('-j', '--workers', type=data_workers, default=default_workers(), metavar='N',
                   help='data-loading processes per process, at most the number of cores (default: 4, or the cores '
                        'if fewer)')
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--no-prefetcher', action='store_true', default=False)
    g = p.add_argument_group('model')
    g.add_argument('--model', type=model_name, default='rmt_t', metavar='NAME')
    g.add_argument('--pretrained', action='store_true', default=False, help='start from the pretrained weights')
    g.add_argument('--pretrained-path', default=None, metavar='FILE',
                   help='load FILE (released RMT .pth, ours, .safetensors) as the pretrained weights; '
                        'the classifier is re-initialised when the class count differs')
    g.add_argument('--initial-checkpoint', default='', metavar='FILE', help='start from these weights (exact fit)')
    g.add_argument('--resume', default='', metavar='FILE',
                   help='resume a run from its checkpoint (last.pth.tar); it continues in that folder')
    g.add_argument('--no-resume-opt', action='store_true', default=False, help='resume weights but not optimizer')
    g.add_argument('--start-epoch', default=None, type=non_negative_int, metavar='N', help='override the resumed epoch')
    g.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type')
    g.add_argument('--drop', type=probability, default=0.0, metavar='PCT', help='classifier dropout')
    g.add_argument('--drop-path', type=probability, default=None, metavar='PCT', help='stochastic depth rate')
    add_model_args(g)
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND')
    g = p.add_argument_group('optimisation')
    g.add_argument('--opt', default='sgd', type=optimizer_name, metavar='NAME', help="timm optimizer, e.g. sgd, adamw")
    g.add_argument('--opt-eps', default=None, type=positive_float)
    g.add_argument('--opt-betas', default=None, type=probability, nargs='+')
    g.add_argument('--momentum', type=non_negative_float, default=0.9)
    g.add_argument('--weight-decay', type=non_negative_float, default=2e-5)
    g.add_argument('--clip-grad', type=positive_float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--layer-decay', type=positive_float, default=None)
    g.add_argument('--grad-accum-steps', type=positive_int, default=1, metavar='N')
    g.add_argument('--sched', type=str, default='cosine', metavar='NAME',
                   choices=('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant', 'rsqrt'))
    g.add_argument('--sched-on-updates', action='store_true', default=False, help='step the LR every update')
    g.add_argument('--lr', type=positive_float, default=None, help='learning rate (default: from --lr-base)')
    g.add_argument('--lr-base', type=positive_float, default=0.1, help='lr = lr_base * global batch / lr_base_size')
    g.add_argument('--lr-base-size', type=positive_int, default=256)
    g.add_argument('--lr-base-scale', type=str, default='', choices=('', 'linear', 'sqrt'),
                   help='"linear" or "sqrt" (default: by optimizer)')
    g.add_argument('--warmup-lr', type=non_negative_float, default=1e-5)
    g.add_argument('--min-lr', type=non_negative_float, default=0.)
    g.add_argument('--epochs', type=positive_int, default=300)
    g.add_argument('--warmup-epochs', type=non_negative_int, default=5)
    g.add_argument('--warmup-prefix', action='store_true', default=False)
    g.add_argument('--cooldown-epochs', type=non_negative_int, default=0)
    g.add_argument('--decay-epochs', type=positive_float, default=90)
    g.add_argument('--decay-milestones', type=non_negative_int, nargs='+', default=[90, 180, 270])
    g.add_argument('--decay-rate', '--dr', type=positive_float, default=0.1)
    g.add_argument('--patience-epochs', type=non_negative_int, default=10)
    g = p.add_argument_group('augmentation and regularisation')
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--scale', type=probability, nargs='+', default=[0.08, 1.0], help='random-resized-crop scale')
    g.add_argument('--ratio', type=positive_float, nargs='+', default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=probability, default=0.5)
    g.add_argument('--vflip', type=probability, default=0.)
    g.add_argument('--color-jitter', type=non_negative_float, default=0.4)
    g.add_argument('--aa', type=str, default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--reprob', type=probability, default=0., help='random erasing probability')
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--recount', type=positive_int, default=1)
    g.add_argument('--mixup', type=non_negative_float, default=0.0, help='mixup alpha (on if > 0)')
    g.add_argument('--cutmix', type=non_negative_float, default=0.0, help='cutmix alpha (on if > 0)')
    g.add_argument('--cutmix-minmax', type=probability, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=probability, default=1.0)
    g.add_argument('--mixup-switch-prob', type=probability, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'))
    g.add_argument('--mixup-off-epoch', type=non_negative_int, default=0)
    g.add_argument('--smoothing', type=probability, default=0.1, help='label smoothing')
    g.add_argument('--bce-loss', action='store_true', default=False)
    g.add_argument('--train-interpolation', type=str, default='random')
    g = p.add_argument_group('token labeling (the released flag names)')
    g.add_argument('--token-label', action='store_true', default=False,
                   help='train a token-labeling RMT (the aux head is added) on per-image label maps, with MixToken')
    g.add_argument('--token-label-data', default='', metavar='DIR',
                   help='label folder: DIR/<class>/<image name>.pt, from scripts/make_token_labels.py or the '
                        'released label_top5_train_nfnet')
    g.add_argument('--token-label-size', type=positive_int, default=None, metavar='N',
                   help="dense target grid, N x N: the model's output grid (default: that grid, input size / 32)")
    g.add_argument('--dense-weight', type=non_negative_float, default=0.5, help='weight of the per-token loss')
    g.add_argument('--cls-weight', type=non_negative_float, default=1.0, help='weight of the class loss')
    g.add_argument('--token-label-corrected-boxes', action='store_true', default=False,
                   help="cut the dense targets with the crop box in the image's own axes; by default the boxes are "
                        "the released code's, whose axes are swapped (roi_align reads (top, left) as (x, y))")
    g = p.add_argument_group('EMA, precision, devices, output')
    g.add_argument('--model-ema', action='store_true', default=False, help='track an EMA of the weights')
    g.add_argument('--model-ema-decay', type=probability, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true', default=False)
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    g.add_argument('--device', type=available_device, default=default_device(),
                   help='default: cuda when available, else cpu')
    g.add_argument('--dist-bn', type=str, default='reduce', choices=('reduce', 'broadcast', ''),
                   help='sync BatchNorm stats after each epoch')
    add_amp_args(g)
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=positive_int, default=50, metavar='N', help='log every N optimizer updates')
    g.add_argument('--checkpoint-hist', type=positive_int, default=10, metavar='N', help='numbered checkpoints to keep')
    g.add_argument('--eval-metric', default='top1',
                   choices=[p + m for p in ('', 'ema_') for m in ('top1', 'top5', 'loss')],
                   help='top1, top5, loss, or ema_top1... to pick the best')
    g.add_argument('--output', default='', metavar='DIR', help='output root (default: ./output/train)')
    g.add_argument('--experiment', default='', metavar='NAME', help='run folder name (default: date-model-size)')
    return p


def optimizer_name(text: str) -> str:
    """``--opt``: a timm optimizer name, optionally as ``lookahead_<name>``."""
    parts = text.lower().split('_')
    if parts[-1] not in list_optimizers() or len(parts) > 2 or (len(parts) == 2 and parts[0] != 'lookahead'):
        close = difflib.get_close_matches(parts[-1], list_optimizers(), n=3)
        raise argparse.ArgumentTypeError(f'unknown optimizer {text!r}' + (f': did you mean {", ".join(close)}?'
                                                                          if close else ''))
    return text


def format_time(seconds: float) -> str:
    return str(timedelta(seconds=int(round(max(seconds, 0.)))))


def seed_epoch(args, epoch: int) -> None:
    """Re-seed every random stream from (seed, epoch, rank): data order, augmentation, mixup, drop path.

    This is what makes a resumed run identical to an uninterrupted one without storing RNG states.
    """
    utils.random_seed(args.seed + 100_003 * (epoch + 1), args.rank)


def prune_summary(path: str, start_epoch: int) -> None:
    """Drop rows of epochs that will be trained again after a resume (and any torn last line)."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, kept = rows[0], [rows[0]]
    for row in rows[1:]:
        if len(row) == len(header) and row[0].strip().isdigit() and int(row[0]) < start_epoch:
            kept.append(row)
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


# optimizer settings that come from this run's arguments, never from a resumed checkpoint
OPTIMIZER_SETTINGS = ('lr', 'lr_scale', 'weight_decay', 'momentum', 'betas', 'eps')


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Resume the optimizer's state (moments, step counts) under this run's settings.

    ``optimizer.load_state_dict`` also brings back the checkpoint's param-group settings, among them
    ``initial_lr``, the base the LR scheduler is built on: a resume with a new ``--lr`` kept the old
    schedule while args.yaml recorded the new one. The settings the arguments give
    (:data:`OPTIMIZER_SETTINGS`: ``--lr``, ``--layer-decay``, ``--weight-decay``, ``--momentum``,
    ``--opt-betas``, ``--opt-eps``) are kept from the optimizer this run built, and ``initial_lr`` is
    dropped so that the scheduler takes this run's ``--lr``.
    """
    settings = [{k: group[k] for k in OPTIMIZER_SETTINGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, settings):
        group.pop('initial_lr', None)
        group.update(own)


def restore_scheduler(lr_scheduler, saved: dict) -> None:
    """Restore the scheduler's saved state, unless the schedule changed (a new --lr, --epochs, --sched, ...):
    then the scheduler built from this run's arguments stays, as args.yaml records them."""
    fresh = lr_scheduler.state_dict()
    changed = sorted(k for k in fresh if k in saved and k not in ('best', 'last_epoch', 'metric')
                     and fresh[k] != saved[k])
    if changed:
        _logger.warning(f'The LR schedule differs from the checkpoint\'s ({", ".join(changed)}): following this run\'s '
                        f'arguments')
    else:
        lr_scheduler.load_state_dict(saved)


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_mixup_batch(args) -> None:
    """timm's Mixup and CutMix mix each image with its mirror in the batch (i with B-1-i) and refuse a batch of odd
    size at the first step; refuse an odd ``--batch-size`` (per process) at start instead. The training loader
    drops the last partial batch of an epoch (and each process's, after the distributed sampler's padding), so
    every batch is ``--batch-size``."""
    if mixup_active(args) and args.batch_size % 2:
        even = ' or '.join(str(n) for n in (args.batch_size - 1, args.batch_size + 1) if n > 0)
        raise ScriptError(f'--batch-size {args.batch_size}: mixup and CutMix (--mixup {args.mixup}, --cutmix '
                          f'{args.cutmix}) pair the images of a batch and need an even batch size per process; use '
                          f'-b {even}, or turn them off with --mixup 0 --cutmix 0')


def setup_token_label_args(args) -> None:
    """Check the token-labeling flags, and record in ``args`` what ``--token-label`` implies (the aux head;
    mixup and CutMix off, as the release has them), so the run's args.yaml and checkpoints say it."""
    if not args.token_label:
        if args.token_label_data:
            raise ScriptError('--token-label-data is given without --token-label: add --token-label to train on it')
        return
    if not args.token_label_data:
        raise ScriptError('--token-label needs --token-label-data DIR: label files from scripts/make_token_labels.py '
                          'or the released label_top5_train_nfnet')
    if not os.path.isdir(args.token_label_data):
        raise ScriptError(f'--token-label-data {args.token_label_data}: no such folder')
    for flag, on in (('--no-aug', args.no_aug), ('--bce-loss', args.bce_loss)):
        if on:
            raise ScriptError(f'{flag} cannot be combined with --token-label (its loss and crops follow the release)')
    args.mixup = args.cutmix = 0.
    args.cutmix_minmax = None
    args.model_kwargs = dict(args.model_kwargs, token_label=True)


def check_one_batch(args, dataset) -> None:
    """Training drops the last partial batch (timm's training loader), so a split smaller than one batch per
    process would train nothing: refuse it."""
    try:
        images = len(dataset)
    except TypeError:  # an iterable dataset of unknown length
        return
    per_process = math.ceil(images / args.world_size)  # the distributed sampler pads to equal shares
    if per_process < args.batch_size:
        where = f' per process ({images} over {args.world_size})' if args.world_size > 1 else ''
        raise ScriptError(f'--batch-size {args.batch_size}: the "{args.train_split}" split of {args.data_dir} has '
                          f'{per_process} images{where}, fewer than one batch, and training drops the last partial '
                          f'batch, so no step would be made; use a --batch-size of at most {max(per_process, 1)}')


def token_label_grid(args, model, input_size) -> tuple:
    """The model's output grid at the training size: the dense targets' grid, which ``--token-label-size``
    names (the released flag) and must match."""
    grid = model.output_grid(input_size[1:])
    if args.token_label_size is not None and (args.token_label_size,) * 2 != grid:
        raise ScriptError(f'--token-label-size {args.token_label_size}: {args.model} at {input_size[1]}x'
                          f'{input_size[2]} px has a {grid[0]}x{grid[1]} output grid; leave the flag out, or give it '
                          f'{grid[0]}' + (' (a square grid: use a square --img-size)' if grid[0] != grid[1] else ''))
    return grid


def create_token_label_loader(args, dataset, data_config, interpolation, device):
    """The training loader of token labeling: the image folder paired with its label files.

    ``TokenLabelTransform`` flips, RandAugments and crops image and map together, so timm's
    ``create_loader`` only converts the image (``no_aug``); as ``no_aug`` also turns timm's random
    erasing off, it is added back here, on the device after normalising (prefetcher) or on the CPU.
    """
    joint = TokenLabelTransform(
        data_config['input_size'][1:], scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        auto_augment=args.aa, color_jitter=args.color_jitter, interpolation=interpolation, mean=data_config['mean'])
    try:
        labelled = TokenLabelDataset(dataset, args.token_label_data, args.num_classes, joint_transform=joint)
    except (OSError, ValueError, TypeError) as e:
        raise ScriptError(f'--token-label-data {args.token_label_data}: {e}') from None
    loader = create_loader(
        labelled, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        use_prefetcher=args.prefetcher, no_aug=True, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, persistent_workers=False)
    if args.reprob > 0:
        erasing = partial(RandomErasing, args.reprob, mode=args.remode, max_count=args.recount)
        if args.prefetcher:
            loader.random_erasing = erasing(device=device)
        else:
            labelled.transform = transforms.Compose([labelled.transform, erasing(device='cpu')])
    return loader, labelled


def train_one_epoch(epoch, num_epochs, model, loader, optimizer, loss_fn, args, device, lr_scheduler,
                    amp_autocast, loss_scaler, model_ema, mixup_fn, last_checkpoint):
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False
    model.train()
    num_batches = len(loader)
    accum = args.grad_accum_steps
    updates_per_epoch = (num_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    first_short_group = num_batches - num_batches % accum  # batches from here on form a shorter last group
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.time()
    optimizer.zero_grad()
    for batch_idx, (images, target) in enumerate(loader):
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        group = accum if batch_idx < first_short_group else num_batches % accum
        if not args.prefetcher:
            images, target = images.to(device), target.to(device)
            if mixup_fn is not None:
                images, target = mixup_fn(images, target)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        no_sync = model.no_sync() if args.distributed and not need_update else suppress()
        with no_sync:
            with amp_autocast():
                loss = loss_fn(model(images), target)
            bad = (~torch.isfinite(loss.detach())).int()
            if args.distributed:
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            if bad.item():
                raise ScriptError(
                    f'non-finite loss ({loss.item()}) at epoch {epoch}, step {batch_idx + 1}/{num_batches} '
                    f'(optimizer update {num_updates + 1}); stopping instead of training on garbage. The last good '
                    f'checkpoint is {last_checkpoint or "(none yet)"}; try a lower --lr, --clip-grad, or fp32.')
            loss_sum += loss.detach().double() * images.shape[0]
            seen += images.shape[0]
            if group > 1:
                loss = loss / group
            params = model_parameters(model, exclude_head='agc' in args.clip_mode)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=params, need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(params, value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        if model_ema is not None:
            model_ema.update(utils.unwrap_model(model), step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        update_idx = batch_idx // accum
        if utils.is_primary(args) and (update_idx % args.log_interval == 0 or update_idx == updates_per_epoch - 1):
            elapsed = time.time() - start
            rate = seen * args.world_size / max(elapsed, 1e-9)
            eta = elapsed / (update_idx + 1) * (updates_per_epoch - update_idx - 1)
            lrs = [g['lr'] for g in optimizer.param_groups]
            _logger.info(
                f'Train: {epoch}/{num_epochs - 1} [{update_idx + 1:>5d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:3.0f}%)]  loss {loss.item() * group:.4f} '
                f'({loss_sum.item() / seen:.4f})  lr {sum(lrs) / len(lrs):.3e}  {rate:.1f} img/s  '
                f'epoch ETA {format_time(eta)}')
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    if args.distributed:
        torch.distributed.all_reduce(totals)
    elapsed = time.time() - start
    return dict(loss=(totals[0] / totals[1].clamp(min=1)).item()), totals[1].item() / max(elapsed, 1e-9), elapsed


def main(argv=None):
    utils.setup_default_logging()
    args = parse_args_with_config(build_parser(), argv)
    # the run's args.yaml and checkpoints name every model kwarg, with no reference to another file
    args.model_kwargs, args.official_config = model_kwargs_from_args(args), ''
    setup_token_label_args(args)
    check_mixup_batch(args)
    args_text = yaml.safe_dump(vars(args), default_flow_style=False)
    with allow_posterize_to_zero_bits():  # the paper's RandAugment policy with Pillow >= 13
        train(args, args_text)


def train(args, args_text: str) -> None:
    """The run ``main`` set up: data, model, optimizer and schedule, resume, then the epochs."""
    device = utils.init_distributed_device(args)
    primary = utils.is_primary(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    elif primary:
        _logger.info(f'Training with a single process on {args.device}.')
    args.prefetcher = device.type == 'cuda' and not args.no_prefetcher

    amp_autocast, scale_loss = autocast_for(args, device)
    loss_scaler = utils.NativeScaler(device=device.type) if scale_loss else None
    utils.random_seed(args.seed, args.rank)

    # data first: a bad --data-dir or a class-count mismatch fails before anything is built
    dataset_train = open_split(args, args.train_split, True, args.class_map)
    check_one_batch(args, dataset_train)
    dataset_eval = open_split(args, args.val_split, False, args.class_map) if args.val_split else None
    train_classes = dataset_classes(dataset_train)
    train_root = getattr(getattr(dataset_train, 'reader', None), 'root', None)
    if dataset_eval is not None:
        eval_root = getattr(getattr(dataset_eval, 'reader', None), 'root', None)
        if train_root and eval_root and os.path.abspath(train_root) == os.path.abspath(eval_root):
            raise ScriptError(
                f'the "{args.train_split}" and "{args.val_split}" splits both resolve to {train_root}: give --data-dir '
                f'a {args.train_split}/ and a {args.val_split}/ (or val/) folder, or pass --val-split "" to skip '
                f'validation')
        eval_classes = dataset_classes(dataset_eval)
        if train_classes and eval_classes and train_classes != eval_classes:
            raise ScriptError(
                f'the "{args.val_split}" split has classes {eval_classes[:10]} but "{args.train_split}" has '
                f'{train_classes[:10]}: labels would not match; use the same class folders or a --class-map')

    model = build_model(args, args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                        global_pool=args.gp)
    args.num_classes = model.num_classes
    check_num_classes(train_classes, model.num_classes, f'the "{args.train_split}" split of {args.data_dir}',
                      f'pass --num-classes {len(train_classes) if train_classes else ""}')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if primary:
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, '
                     f'{model.num_classes} classes.')
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    if args.token_label:
        try:
            model.set_token_label_training()
        except (AttributeError, ValueError) as e:
            raise ScriptError(f'--token-label: {args.model} cannot train with token labels ({e})') from None
        grid = token_label_grid(args, model, data_config['input_size'])
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    if not args.lr:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        ratio = global_batch / args.lr_base_size
        args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)
        if primary:
            _logger.info(f'Learning rate {args.lr:.3g}: --lr-base {args.lr_base} scaled ({scale}) from batch '
                         f'{args.lr_base_size} to the global batch {global_batch}.')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))

    resume_state = None
    if args.resume:
        resume_state = read_checkpoint(args.resume, '--resume')
        if not isinstance(resume_state.get('state_dict'), dict) or 'epoch' not in resume_state:
            raise ScriptError(f'--resume {args.resume} is not a training checkpoint of this script; to start from '
                              f'its weights use --initial-checkpoint or --pretrained-path')
        weights = clean_state_dict(resume_state['state_dict'])
        run = resume_state.get('args')
        made_by = f' (a run of {run.model} with {run.model_kwargs or "no kwargs"})' \
            if isinstance(run, argparse.Namespace) and hasattr(run, 'model') else ''
        check_fits(weights, model, f'--resume {args.resume}{made_by}',
                   f'; this run builds {args.model} with {args.model_kwargs or "no kwargs"}: resume with the run\'s '
                   f'own arguments (--config {os.path.join(os.path.dirname(args.resume) or ".", "args.yaml")})')
        model.load_state_dict(weights)
        if not args.no_resume_opt:
            try:
                load_optimizer_state(optimizer, resume_state['optimizer'])
            except (KeyError, ValueError) as e:
                raise ScriptError(f'--resume {args.resume}: its optimizer state does not fit --opt {args.opt} with '
                                  f'these arguments ({e}); add --no-resume-opt to start the optimizer afresh') from None
            if loss_scaler is not None and loss_scaler.state_dict_key in resume_state:
                loss_scaler.load_state_dict(resume_state[loss_scaler.state_dict_key])

    model_ema = None
    if args.model_ema:
        model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                     device='cpu' if args.model_ema_force_cpu else None)
        if resume_state is not None:
            if isinstance(resume_state.get('state_dict_ema'), dict):
                model_ema.module.load_state_dict(clean_state_dict(resume_state['state_dict_ema']))
            else:
                _logger.warning(f'{args.resume} has no EMA weights: the EMA restarts from the resumed weights')

    if args.distributed:
        model = distributed_data_parallel(model, device)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    collate_fn = mixup_fn = None
    if mixup_active(args):  # never with --token-label
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = data_config['interpolation'] if args.no_aug or not args.train_interpolation \
        else args.train_interpolation
    if args.token_label:
        loader_train, labelled = create_token_label_loader(args, dataset_train, data_config, train_interpolation,
                                                           device)
        k, h, w = labelled.label_shape[1:]
        teacher = read_meta(args.token_label_data).get('teacher')
        token_label_summary = (
            f'Token labeling: top-{k} label maps of {h}x{w} from {args.token_label_data}'
            f'{f" (teacher {teacher})" if teacher else ""}, dense targets at {grid[0]}x{grid[1]} with '
            f'{"corrected" if args.token_label_corrected_boxes else "released (swapped-axis)"} boxes, loss '
            f'{args.cls_weight} x class + {args.dense_weight} x tokens, MixToken on; mixup and CutMix off.')
    else:
        loader_train = create_loader(
            dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
            use_prefetcher=args.prefetcher, no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
            color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=train_interpolation,
            mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
            collate_fn=collate_fn, pin_memory=args.pin_mem, device=device,
            persistent_workers=False)  # fresh workers each epoch, seeded from the epoch: exact resumes
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_eval_loader(dataset_eval, data_config, args.validation_batch_size or args.batch_size,
                                         args.workers, device, args.distributed, args.prefetcher)

    if args.token_label:
        try:
            train_loss_fn = TokenLabelLoss(args.num_classes, args.cls_weight, args.dense_weight, args.smoothing,
                                           release_boxes=not args.token_label_corrected_boxes)
        except ValueError as e:
            raise ScriptError(f'--cls-weight/--dense-weight: {e}') from None
    elif mixup_active(args):
        train_loss_fn = BinaryCrossEntropy(target_threshold=None) if args.bce_loss else SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = BinaryCrossEntropy(smoothing=args.smoothing) if args.bce_loss \
            else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device=device)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    start_epoch = 0
    if resume_state is not None:
        start_epoch = resume_state['epoch'] + 1
        if isinstance(resume_state.get('lr_scheduler'), dict) and not args.no_resume_opt:
            restore_scheduler(lr_scheduler, resume_state['lr_scheduler'])
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if start_epoch >= num_epochs:
        flag = f'--start-epoch {args.start_epoch}' if args.start_epoch is not None else f'--resume {args.resume}'
        raise ScriptError(f'{flag}: the run would start at epoch {start_epoch} of {num_epochs} (epochs 0..'
                          f'{num_epochs - 1}), so no step would be made; raise --epochs to continue it')
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = output_dir = None
    if primary:
        if args.resume:
            output_dir = os.path.dirname(os.path.abspath(args.resume))  # a resumed run continues in its folder
        else:
            name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                                safe_model_name(args.model), str(data_config['input_size'][-1])])
            output_dir = utils.get_outdir(args.output or './output/train', name)
        log_file = logging.FileHandler(os.path.join(output_dir, 'log.txt'))
        log_file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        logging.getLogger().addHandler(log_file)
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, decreasing='loss' in args.eval_metric,
            max_history=args.checkpoint_hist, lr_scheduler=lr_scheduler)
        if resume_state is not None:
            saver.load_state_dict(resume_state.get('saver', {}))
            prune_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        _logger.info(f'Output folder {output_dir}; epochs {start_epoch}..{num_epochs - 1} of {num_epochs}, '
                     f'{updates_per_epoch} updates each, LR stepped per '
                     f'{"update" if args.sched_on_updates else "epoch"}.')
        if args.token_label:
            _logger.info(token_label_summary)
    del resume_state

    last_checkpoint = os.path.join(output_dir, 'last.pth.tar') if output_dir else ''
    if not (last_checkpoint and os.path.exists(last_checkpoint)):
        last_checkpoint = args.resume
    run_start = time.time()
    eval_metrics, best_metric, best_epoch = {}, None, None
    try:
        for epoch in range(start_epoch, num_epochs):
            seed_epoch(args, epoch)
            if hasattr(dataset_train, 'set_epoch'):
                dataset_train.set_epoch(epoch)
            elif args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            train_metrics, rate, train_time = train_one_epoch(
                epoch, num_epochs, model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler,
                amp_autocast, loss_scaler, model_ema, mixup_fn, last_checkpoint)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
            eval_start = time.time()
            eval_metrics = {}
            if loader_eval is not None:
                eval_metrics = evaluate(model, loader_eval, device, amp_autocast, args.channels_last, args.distributed)
                if model_ema is not None and not args.model_ema_force_cpu:
                    ema_metrics = evaluate(model_ema.module, loader_eval, device, amp_autocast, args.channels_last,
                                           args.distributed)
                    eval_metrics.update({'ema_' + k: v for k, v in ema_metrics.items()})
            metric = eval_metrics.get(args.eval_metric)
            if primary:
                lrs = [g['lr'] for g in optimizer.param_groups]
                utils.update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'),
                                     lr=sum(lrs) / len(lrs))
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=metric)
                last_checkpoint = os.path.join(output_dir, 'last.pth.tar')
                done = epoch + 1 - start_epoch
                eta = (time.time() - run_start) / done * (num_epochs - epoch - 1)
                shown = '  '.join(f'{k} {v:.4f}' if 'loss' in k else f'{k} {v:.2f}' for k, v in eval_metrics.items())
                _logger.info(f'Epoch {epoch}/{num_epochs - 1}: train loss {train_metrics["loss"]:.4f}  {shown}  '
                             f'| {rate:.1f} img/s, {format_time(train_time)} train + '
                             f'{format_time(time.time() - eval_start)} eval | run ETA {format_time(eta)}')
            lr_scheduler.step(epoch + 1, metric)
    except KeyboardInterrupt:
        if primary:
            _logger.error(f'Interrupted; continue with --resume {last_checkpoint or "(no checkpoint yet)"}')
        sys.exit(130)

    if primary:
        final = '  '.join(f'{k} {v:.4f}' if 'loss' in k else f'{k} {v:.2f}' for k, v in eval_metrics.items())
        best = f'; best {args.eval_metric} {best_metric:.4f} (epoch {best_epoch})' if best_metric is not None else ''
        _logger.info(f'Done: {args.model}, {num_epochs - start_epoch} epochs in {format_time(time.time() - run_start)}'
                     f'; final {final or "(no validation)"}{best}; checkpoints and summary.csv in {output_dir}')
    if args.distributed:
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    run_main(main)

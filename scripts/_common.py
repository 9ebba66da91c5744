"""Pieces shared by the training, validation and conversion scripts.

One home per idea: YAML config handling, model building and weight loading, dataset opening with
clear errors, the evaluation loop (so training logs and ``validate.py`` compute the same numbers)
and atomic checkpoint writing. Everything else comes from timm.
"""
import argparse
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import yaml

try:  # run as `python scripts/train.py` from anywhere: the project is importable once installed
    import rmt
except ImportError:  # a source checkout that was not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    import rmt

from timm import utils
from timm.data import create_dataset, create_loader
from timm.models import clean_state_dict, create_model, load_checkpoint
from timm.utils import CheckpointSaver

_logger = logging.getLogger('rmt.scripts')


def _allow_posterize_to_zero_bits() -> None:
    """Keep timm's RandAugment working with Pillow >= 13.

    ``rand-m9-mstd0.5-inc1`` (the paper's policy) asks for 0 bits when the noisy magnitude reaches
    its maximum, which older Pillow turned into a black image and Pillow 13 rejects with a
    ``ValueError`` that stops training at random. Restore the old result for ``bits == 0``.
    """
    from PIL import Image, ImageOps
    if getattr(ImageOps.posterize, '_zero_bits_ok', False):
        return
    posterize = ImageOps.posterize

    def posterize_any_bits(image, bits):
        if bits == 0:
            return Image.new(image.mode, image.size)  # every bit cleared
        return posterize(image, bits)
    posterize_any_bits._zero_bits_ok = True
    ImageOps.posterize = posterize_any_bits


_allow_posterize_to_zero_bits()


class ScriptError(SystemExit):
    """A problem with the user's inputs or the run: printed as one clear message, exit status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_main(main, logger: logging.Logger) -> None:
    """Run a script's ``main`` and turn :class:`ScriptError` into a clean message instead of a traceback."""
    try:
        main()
    except ScriptError as e:
        logger.error(e.message)
        raise


# --- arguments ---------------------------------------------------------------------------------------

def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` YAML file supplies defaults, the command line overrides them.

    The file's keys are the flags' names (``batch_size`` or ``batch-size``); an unknown key is an error
    rather than a silently ignored typo.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        if not os.path.isfile(known.config):
            raise ScriptError(f'--config {known.config}: no such file')
        with open(known.config) as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            raise ScriptError(f'--config {known.config}: expected a mapping of flag names to values')
        cfg = {k.replace('-', '_'): v for k, v in cfg.items()}
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            raise ScriptError(f'--config {known.config}: unknown keys {unknown} (keys are the script\'s flag names)')
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


def add_model_kwargs_arg(parser) -> None:
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                        help='extra model constructor arguments, key=value (values parsed as Python literals), '
                             'e.g. embed_dims="(16,32,48,64)"')


# --- models and weights ------------------------------------------------------------------------------

def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint file read safely (weights only): released ``.pth``, ours, or ``.safetensors``."""
    try:
        return rmt.load_checkpoint_file(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise ScriptError(str(e)) from None


def pick_weights(state: Dict[str, Any], use_ema: bool) -> Dict[str, Any]:
    """The weights to use from a checkpoint dict: EMA weights when asked for and present.

    Handles our training checkpoints (``state_dict``/``state_dict_ema``) and the released ones
    (``model``/``model_ema``); a bare state dict is returned as is.
    """
    for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model', 'model_ema'):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def has_ema(state: Dict[str, Any]) -> bool:
    return any(isinstance(state.get(k), dict) for k in ('state_dict_ema', 'model_ema'))


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> None:
    """Load a checkpoint file (released format or ours) into ``model``, strictly, with clear errors."""
    state = read_checkpoint(path)
    weights = pick_weights(state, use_ema)
    try:
        if isinstance(model, rmt.RMT):
            weights = rmt.checkpoint_filter_fn(weights, model, source=path)
        else:
            weights = clean_state_dict(weights)
        model.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError) as e:
        raise ScriptError(f'cannot load {path} into {type(model).__name__}: {e}') from None
    _logger.info(f'Loaded {"EMA " if use_ema and has_ema(state) else ""}weights from {path}')


def build_model(args, num_classes: Optional[int], **extra) -> nn.Module:
    """Create ``args.model`` with timm, loading ``--pretrained``/``--pretrained-path`` or ``--initial-checkpoint``.

    ``--pretrained-path FILE`` loads FILE as the pretrained weights (released or ours): the classifier
    is re-initialised when its class count differs from ``num_classes``.
    """
    kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    in_chans = getattr(args, 'in_chans', None) or (args.input_size[0] if getattr(args, 'input_size', None) else None)
    if in_chans:
        kwargs['in_chans'] = in_chans
    pretrained_path = getattr(args, 'pretrained_path', None)
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise ScriptError(f'--pretrained-path {pretrained_path}: no such file')
        kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_path)
    pretrained = bool(getattr(args, 'pretrained', False) or pretrained_path)
    try:
        model = create_model(args.model, pretrained=pretrained, **kwargs)
    except (ValueError, RuntimeError, TypeError) as e:
        hint = '; give the weights file with --pretrained-path FILE' if pretrained and not pretrained_path else ''
        raise ScriptError(f'cannot create model {args.model} ({"pretrained" if pretrained else "from scratch"}): '
                          f'{e}{hint}') from None
    if pretrained_path:
        _logger.info(f'Loaded pretrained weights from {pretrained_path}')
    initial = getattr(args, 'initial_checkpoint', None)
    if initial:
        if isinstance(model, rmt.RMT):
            load_weights(model, initial)
        else:
            load_checkpoint(model, initial)
    return model


# --- data --------------------------------------------------------------------------------------------

_SPLIT_SYNONYMS = (('train', 'training'), ('validation', 'val', 'valid', 'eval', 'evaluation'))


def open_dataset(args, split: str, is_training: bool, class_map: str = '', require_split: bool = True):
    """``timm.data.create_dataset`` with a clear message for a missing or empty data folder.

    For an image folder, ``require_split`` insists on a ``DIR/<split>`` folder (or a synonym such as
    ``val``) rather than silently reading all of ``DIR``, which would mix the splits.
    """
    folder_dataset = not args.dataset or args.dataset.lower() in ('folder', 'imagefolder', 'image_folder')
    if not args.data_dir:
        if folder_dataset:
            raise ScriptError('--data-dir is required: a folder with train/ and validation/ (or val/) '
                              'sub-folders of class folders of images')
    elif folder_dataset and not os.path.exists(args.data_dir):
        raise ScriptError(f'--data-dir {args.data_dir} does not exist')
    elif folder_dataset and require_split and os.path.isdir(args.data_dir):
        names = next((s for s in _SPLIT_SYNONYMS if split in s), (split,))
        if not any(os.path.isdir(os.path.join(args.data_dir, n)) for n in names):
            raise ScriptError(f'--data-dir {args.data_dir} has no "{split}" split: expected a sub-folder named '
                              f'{" or ".join(names)}')
    try:
        return create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=class_map,
            download=getattr(args, 'dataset_download', False), batch_size=args.batch_size,
            seed=getattr(args, 'seed', 42))
    except Exception as e:  # timm raises a mix of types; all mean "cannot read this data"
        raise ScriptError(f'cannot open the "{split}" split of {args.dataset or "the image folder"} at '
                          f'{args.data_dir}: {type(e).__name__}: {e}') from None


def dataset_classes(dataset) -> Optional[list]:
    """Class names of a dataset, in label order, when the dataset tells them (image folders, torchvision)."""
    for obj in (getattr(dataset, 'reader', None), dataset):
        class_to_idx = getattr(obj, 'class_to_idx', None)
        if class_to_idx:
            return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        classes = getattr(obj, 'classes', None)
        if classes:
            return list(classes)
    return None


def check_num_classes(classes: Optional[list], num_classes: int, where: str, fix: str) -> None:
    if classes is not None and len(classes) != num_classes:
        shown = ', '.join(map(str, classes[:5])) + (', ...' if len(classes) > 5 else '')
        raise ScriptError(f'class-count mismatch: {where} has {len(classes)} classes ({shown}) but the model has '
                          f'{num_classes} outputs; {fix}')


def create_eval_loader(dataset, data_config, batch_size, workers, device, distributed=False, prefetcher=False):
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        use_prefetcher=prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=workers, distributed=distributed, crop_pct=data_config['crop_pct'],
        device=device, persistent_workers=False)


# --- evaluation --------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, device, amp_autocast, channels_last=False, distributed=False) -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 (percent) of ``model`` over ``loader``, exact per-sample means."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1 hits, top5 hits, count
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(images)
        output = output.float()
        k = min(5, output.shape[-1])
        hits = output.topk(k, dim=-1).indices.eq(target[:, None])
        totals += torch.stack([
            nn.functional.cross_entropy(output, target, reduction='sum').double(),
            hits[:, :1].sum().double(), hits.sum().double(), torch.tensor(float(len(target)), device=device,
                                                                          dtype=torch.float64)])
    if distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.)
    return dict(loss=loss / count, top1=100. * top1 / count, top5=100. * top5 / count)


# --- atomic checkpoints ------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: temp file in the same folder, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` with crash-safe files and the LR scheduler's state in each checkpoint.

    timm writes ``tmp`` then renames it, but unlinks the target first and never fsyncs, so a crash can
    leave no ``last`` or a torn one on some filesystems; here every file appears whole or not at all.
    """

    def __init__(self, *args, lr_scheduler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_scheduler = lr_scheduler

    def _save(self, save_path, epoch, metric=None):
        state = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'version': 2,  # the epoch stored is the last completed one
            'state_dict': utils.get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'saver': self.state_dict(epoch, metric),
        }
        if self.args is not None:
            state['args'] = self.args
        if self.model_ema is not None:
            state['state_dict_ema'] = utils.get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.lr_scheduler is not None:
            state['lr_scheduler'] = self.lr_scheduler.state_dict()
        if metric is not None:
            state['metric'] = metric
        atomic_torch_save(state, save_path)

    def _replace(self, src, dst):
        os.replace(src, dst)  # atomic on POSIX and Windows; the target is never removed first
        _fsync_dir(os.path.dirname(os.path.abspath(dst)))

    def _duplicate(self, src, dst):
        tmp = dst + '.tmp'
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            with open(src, 'rb') as fi, open(tmp, 'wb') as fo:
                shutil.copyfileobj(fi, fo)
                fo.flush()
                os.fsync(fo.fileno())
        self._replace(tmp, dst)

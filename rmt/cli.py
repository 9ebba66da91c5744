"""What the command-line scripts share: clear errors, ``--config`` files, model arguments, model building.

The scripts in ``scripts/`` (train, validate, convert_checkpoint, ...) are thin programs on top of
this module, :mod:`rmt.data`, :mod:`rmt.evaluate` and timm, as timm's own ``train.py`` is on top of
``timm``. A problem with the user's input is raised as :class:`ScriptError` and printed as one line.
"""
import argparse
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch
import yaml
from torch import nn

from timm import utils
from timm.models import create_model, load_checkpoint

from .checkpoint import (
    checkpoint_filter_fn, has_ema, load_checkpoint_file, official_config_to_kwargs, read_model_metadata,
    state_dict_from_checkpoint, weights_key)
from .model import RMT

__all__ = [
    'ScriptError', 'run_main', 'default_device', 'default_workers', 'parse_args_with_config', 'add_model_args',
    'model_kwargs_from_args', 'read_checkpoint', 'saved_settings', 'apply_saved_settings', 'describe_weights',
    'load_weights', 'build_model',
]

_logger = logging.getLogger(__name__)


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


def default_workers(most: int = 4) -> int:
    """Data-loading processes: ``most``, or fewer on a machine with fewer cores (PyTorch warns beyond them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(most, cores))


def _read_config(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ScriptError(f'--config {path}: no such file')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or type(e).__name__
        raise ScriptError(f'--config {path}: not valid YAML{where}: {problem}') from None
    if not isinstance(cfg, dict):
        raise ScriptError(f'--config {path}: expected a mapping of flag names to values')
    return {str(k).replace('-', '_'): v for k, v in cfg.items()}


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` YAML file supplies defaults, the command line overrides them.

    The file's keys are the flags' names (``batch_size`` or ``batch-size``); an unknown key is an error
    rather than a silently ignored typo.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = _read_config(known.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            raise ScriptError(f'--config {known.config}: unknown keys {unknown} (keys are the script\'s flag names)')
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


def add_model_args(parser) -> None:
    """``--model-kwargs`` and ``--official-config``: the model's constructor arguments beyond its name."""
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                        help='extra model constructor arguments, key=value (values parsed as Python literals), '
                             'e.g. embed_dims="(16,32,48,64)"')
    parser.add_argument('--official-config', default='', metavar='JSON',
                        help="model configuration in the released code's argument names (custom sizes); "
                             '--model-kwargs override it')


def model_kwargs_from_args(args) -> Dict[str, Any]:
    """Constructor kwargs from ``--official-config`` then ``--model-kwargs`` (which wins)."""
    kwargs: Dict[str, Any] = {}
    path = getattr(args, 'official_config', '')
    if path:
        try:
            with open(path) as f:
                kwargs.update(official_config_to_kwargs(json.load(f)))
        except OSError as e:
            raise ScriptError(f'--official-config {path}: {e.strerror}') from None
        except (json.JSONDecodeError, ValueError) as e:
            raise ScriptError(f'--official-config {path}: {e}') from None
    kwargs.update(getattr(args, 'model_kwargs', None) or {})
    return kwargs


# --- checkpoint files ----------------------------------------------------------------------------------

def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint file read safely (weights only): released ``.pth``, ours, or ``.safetensors``."""
    try:
        return load_checkpoint_file(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise ScriptError(str(e)) from None


def saved_settings(path: str, checkpoint: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The settings a file carries: a training run's arguments (checkpoints of ``scripts/train.py``), or
    the model name and kwargs of a converted ``.safetensors``; ``{}`` for a released file."""
    try:
        made_for = read_model_metadata(path)
    except RuntimeError as e:
        raise ScriptError(str(e)) from None
    if made_for is not None:
        return dict(model=made_for[0], model_kwargs=made_for[1])
    if checkpoint is None:
        return {}
    # released files carry the authors' own, unrelated args; ours also hold a timm `state_dict`
    if isinstance(checkpoint.get('args'), argparse.Namespace) and isinstance(checkpoint.get('state_dict'), dict):
        return vars(checkpoint['args'])
    return {}


def apply_saved_settings(args, keys: Sequence[str]) -> Dict[str, Any]:
    """Read ``args.checkpoint`` and set each of ``keys`` that ``args`` leaves unset (None or {}) to the value the
    file carries (:func:`saved_settings`): a run's model, kwargs, class count, ... need not be repeated.

    Returns the checkpoint as read (weights-only), or {} without ``--checkpoint``.
    """
    if not args.checkpoint:
        return {}
    state = read_checkpoint(args.checkpoint)
    saved = saved_settings(args.checkpoint, state)
    for key in keys:
        if getattr(args, key) in (None, {}) and saved.get(key) not in (None, {}):
            setattr(args, key, saved[key])
    return state


def describe_weights(checkpoint: Dict[str, Any], use_ema: bool) -> str:
    """Which weights of ``checkpoint`` are used, in words, e.g. "the EMA weights ('model_ema')"."""
    key = weights_key(checkpoint, use_ema)
    if not key:
        return 'the state dict'
    kind = 'EMA' if key in ('model_ema', 'state_dict_ema') else 'plain'
    other = ''
    if kind == 'plain' and has_ema(checkpoint):
        other = ' (the file also has EMA weights: --use-ema takes those)'
    return f"the {kind} weights ('{key}'){other}"


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> None:
    """Load a checkpoint file (released format or ours) into ``model``, strictly, with clear errors."""
    checkpoint = read_checkpoint(path)
    try:
        if isinstance(model, RMT):
            weights = checkpoint_filter_fn(checkpoint, model, use_ema=use_ema, source=path)
        else:
            weights = state_dict_from_checkpoint(checkpoint, use_ema)
        model.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError) as e:
        raise ScriptError(f'cannot load {path} into {type(model).__name__}: {e}') from None
    _logger.info(f'Loaded {describe_weights(checkpoint, use_ema)} of {path}')


def build_model(args, num_classes: Optional[int], default_model: Optional[str] = None,
                weights_flag: str = '--pretrained-path', **extra) -> nn.Module:
    """Create ``args.model`` with timm, loading ``--pretrained``/``--pretrained-path`` or ``--initial-checkpoint``.

    The kwargs are ``--official-config`` and ``--model-kwargs`` over those that a converted
    ``.safetensors`` weights file names for the same model; without ``args.model`` the model is the
    file's (else ``default_model``). ``--pretrained-path FILE`` loads FILE as the pretrained weights
    (released or ours): the classifier is re-initialised when its class count differs. ``weights_flag``
    names that option in messages (a script may call it ``--checkpoint``).
    """
    pretrained_path = getattr(args, 'pretrained_path', None)
    initial = getattr(args, 'initial_checkpoint', None)
    for path, flag in ((pretrained_path, weights_flag), (initial, '--initial-checkpoint')):
        if path and not os.path.isfile(path):
            raise ScriptError(f'{flag} {path}: no such file')
    made_for = next((s for s in (saved_settings(p) for p in (pretrained_path, initial) if p) if s), {})
    name = args.model or made_for.get('model') or default_model
    if not name:
        raise ScriptError('--model is required')
    kwargs: Dict[str, Any] = dict(made_for['model_kwargs']) if made_for.get('model') == name else {}
    kwargs.update(model_kwargs_from_args(args))
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    in_chans = getattr(args, 'in_chans', None) or (args.input_size[0] if getattr(args, 'input_size', None) else None)
    if in_chans:
        kwargs['in_chans'] = in_chans
    if pretrained_path:
        kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_path)
    pretrained = bool(getattr(args, 'pretrained', False) or pretrained_path)
    try:
        model = create_model(name, pretrained=pretrained, **kwargs)
    except (ValueError, RuntimeError, TypeError) as e:
        hint = '; give the weights file with --pretrained-path FILE' if pretrained and not pretrained_path else ''
        raise ScriptError(f'cannot create model {name} ({"pretrained" if pretrained else "from scratch"}): '
                          f'{e}{hint}') from None
    if pretrained_path:
        _logger.info(f'Loaded pretrained weights from {pretrained_path}')
    if initial:
        if isinstance(model, RMT):
            load_weights(model, initial)
        else:
            load_checkpoint(model, initial)
    return model

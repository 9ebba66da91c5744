"""What the command-line scripts share: one-line errors, checked arguments, ``--config`` files, model building.

The scripts in ``scripts/`` (train, validate, convert_checkpoint, ...) and ``python -m rmt`` are thin
programs on top of this module, the rest of :mod:`rmt.tools`, the library and timm, as timm's own
``train.py`` is on top of ``timm``.

One rule for user mistakes (a path, a name, a value, a file of the wrong kind): the script raises
:class:`ScriptError` with a message naming the argument, the value and what is expected, and
:func:`run_main` prints it as one line on stderr and exits with status 2, as argparse does for its
own errors (:class:`ArgumentParser` turns those into :class:`ScriptError` too, without the usage
text). Anything else is a bug and keeps its traceback. The library (:mod:`rmt.checkpoint`, ...) and
:mod:`rmt.tools.data` raise ordinary exceptions (``ValueError``, ``FileNotFoundError``); the scripts
turn the ones that mean bad input into :class:`ScriptError` where they call it.
"""
import argparse
import ast
import difflib
import json
import logging
import math
import os
import re
import sys
from contextlib import suppress
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

from timm.models import create_model, is_model, list_models, parse_model_name, split_model_name_tag

from ..checkpoint import (
    checkpoint_filter_fn, has_ema, load_checkpoint_file, official_config_to_kwargs, read_model_metadata,
    state_dict_from_checkpoint, state_dict_misfit, weights_key)
from ..model import RMT
from .data import open_dataset

__all__ = [
    'ScriptError', 'run_main', 'ArgumentParser', 'positive_int', 'non_negative_int', 'positive_float',
    'non_negative_float', 'finite_float', 'probability', 'data_workers', 'available_device', 'model_name',
    'ParseModelKwargs',
    'default_device', 'default_workers', 'parse_args_with_config', 'add_model_args', 'model_kwargs_from_args',
    'autocast_for', 'read_checkpoint', 'saved_settings', 'FROM_TRAINING', 'apply_saved_settings', 'require_model',
    'describe_weights', 'load_weights', 'check_fits', 'open_split', 'check_num_classes', 'build_model', 'add_amp_args',
    'cores',
]

_logger = logging.getLogger(__name__)


class ScriptError(Exception):
    """A mistake in the user's input (a path, a name, a value): one line naming it and what is expected.

    An ordinary exception (``except Exception`` catches it); only :func:`run_main` turns it into an exit.
    """

    def __init__(self, message: str):
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__('; '.join(lines))


def run_main(main: Callable, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Any:
    """Run a script's ``main(argv)``; a :class:`ScriptError` becomes ``PROG: error: MESSAGE`` on stderr, exit 2."""
    try:
        return main(argv)
    except ScriptError as e:
        prog = prog or os.path.basename(sys.argv[0])
        print(f'{prog}: error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a :class:`ScriptError` (one line, exit 2 under :func:`run_main`)
    rather than the usage text and a message; ``--help`` is unchanged."""

    def error(self, message: str):
        raise ScriptError(message)


# --- checked values: argparse types --------------------------------------------------------------------

def _number(kind: Callable, expected: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}')
        return value
    parse.__name__ = expected.replace(' ', '_')
    return parse


positive_int = _number(int, 'a positive integer', lambda v: v > 0)
non_negative_int = _number(int, 'an integer >= 0', lambda v: v >= 0)
finite_float = _number(float, 'a finite number', math.isfinite)
positive_float = _number(float, 'a finite number > 0', lambda v: math.isfinite(v) and v > 0)
non_negative_float = _number(float, 'a finite number >= 0', lambda v: math.isfinite(v) and v >= 0)
probability = _number(float, 'a number from 0 to 1', lambda v: 0 <= v <= 1)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(most: int = 4) -> int:
    """Data-loading processes: ``most``, or fewer on a machine with fewer cores (PyTorch warns beyond them)."""
    return max(1, min(most, cores()))


def data_workers(text: str) -> int:
    """``-j``: an integer >= 0, at most the number of cores (more only compete for them)."""
    return min(non_negative_int(text), cores())


def available_device(text: str) -> str:
    """``--device``: a torch device that is here (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f'expected a device such as cpu or cuda, got {text!r}') from None
    if dev.type == 'cuda' and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        found = f'{torch.cuda.device_count()} CUDA devices' if torch.cuda.is_available() else 'no CUDA device'
        raise argparse.ArgumentTypeError(f'{text!r}: this machine has {found}; use --device cpu')
    return text


def model_name(text: str) -> str:
    """A timm model name, optionally with a pretrained tag (``rmt_s.in1k_tl``); ``hf-hub:`` names pass as they are."""
    if parse_model_name(text)[0]:
        return text
    arch, tag = split_model_name_tag(text)
    if not is_model(arch):
        close = difflib.get_close_matches(arch, list_models(), n=4)
        raise argparse.ArgumentTypeError(
            f'unknown model {text!r}: ' + (f'did you mean {", ".join(close)}?' if close else 'see timm.list_models()'))
    if tag and text not in list_models(arch, include_tags=True):
        tags = [n.split('.', 1)[1] for n in list_models(arch, include_tags=True) if '.' in n]
        raise argparse.ArgumentTypeError(f'{arch} has no tag {tag!r}; its tags: {", ".join(tags) or "none"}')
    return text


class ParseModelKwargs(argparse.Action):
    """``key=value ...`` into a dict, each value a Python literal; a bare word stays a string
    (``act=gelu``), but a malformed literal (``depths=(1,1,1``) is an error, not a string."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, text = item.partition('=')
            if not sep or not key.isidentifier():
                raise argparse.ArgumentError(self, f'expected key=value, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                if not re.fullmatch(r'[A-Za-z_][\w.\-]*', text):
                    raise argparse.ArgumentError(
                        self, f'{item!r}: {text!r} is not a Python literal (e.g. depths="(1,1,1,1)")') from None
                kwargs[key] = text
        setattr(namespace, self.dest, kwargs)


# --- arguments and --config files -----------------------------------------------------------------------

def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


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
    except (OSError, UnicodeDecodeError) as e:
        raise ScriptError(f'--config {path}: cannot read it ({e})') from None
    if not isinstance(cfg, dict):
        raise ScriptError(f'--config {path}: expected a mapping of flag names to values')
    return {str(k).replace('-', '_'): v for k, v in cfg.items()}


def _check_config_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A config file's value through the flag's own type and choices, as if it were given on the command line."""
    if value is None or (action.type in (None, str) and not action.choices):
        return value
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        converted = [v if action.type in (None, str) else action.type(str(v)) for v in items]
    except argparse.ArgumentTypeError as e:
        raise ScriptError(f'--config {path}: {key}: {e}') from None
    except (TypeError, ValueError):
        kind = getattr(action.type, '__name__', 'value')
        raise ScriptError(f'--config {path}: {key}: {value!r} is not a valid {kind}') from None
    bad = [v for v in converted if action.choices and v not in action.choices]
    if bad:
        raise ScriptError(f'--config {path}: {key}: {bad[0]!r} is not one of {", ".join(map(str, action.choices))}')
    return converted if isinstance(value, (list, tuple)) else converted[0]


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` YAML file supplies defaults, the command line overrides them.

    The file's keys are the flags' names (``batch_size`` or ``batch-size``), its values go through the
    flags' checks; an unknown key is an error rather than a silently ignored typo.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = _read_config(known.config)
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(cfg) - set(actions))
        if unknown:
            raise ScriptError(f'--config {known.config}: unknown keys {unknown} (keys are the script\'s flag names)')
        parser.set_defaults(**{k: _check_config_value(actions[k], k, v, known.config) for k, v in cfg.items()})
    return parser.parse_args(argv)


def add_model_args(parser) -> None:
    """``--model-kwargs`` and ``--official-config``: the model's constructor arguments beyond its name."""
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseModelKwargs,
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
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ScriptError(f'--official-config {path}: expected a JSON object of the released config ({e})') \
                from None
    kwargs.update(getattr(args, 'model_kwargs', None) or {})
    return kwargs


def autocast_for(args, device: torch.device) -> Tuple[Callable, bool]:
    """``--amp`` / ``--amp-dtype``: the autocast context to run the model in, and whether to scale the loss.

    float16 on CUDA (with loss scaling) unless ``--amp-dtype bfloat16``. On the CPU, autocast is off unless
    ``--amp-dtype bfloat16`` is given: a training step under float16 autocast took about 40x as long as in
    float32 there, and is refused; under bfloat16 1.7x, even with AMX (README, "Training and fine-tuning").
    """
    if not args.amp:
        return suppress, False
    dtype = args.amp_dtype or (None if device.type == 'cpu' else 'float16')
    if dtype is None:
        _logger.info('--amp: autocast stays off on the CPU (float32 is faster there); --amp-dtype bfloat16 turns it on')
        return suppress, False
    if device.type == 'cpu' and dtype == 'float16':
        raise ScriptError('--amp-dtype float16: float16 autocast on the CPU is about 40x slower than float32; '
                          'use --amp-dtype bfloat16 or leave --amp off')
    return partial(torch.autocast, device_type=device.type, dtype=getattr(torch, dtype)), \
        device.type == 'cuda' and dtype == 'float16'


def add_amp_args(parser) -> None:
    parser.add_argument('--amp', action='store_true', default=False,
                        help='mixed precision: float16 on CUDA; on the CPU only with --amp-dtype bfloat16')
    parser.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                        help='autocast dtype (default: float16 on CUDA, none on the CPU)')


# --- checkpoint files ----------------------------------------------------------------------------------

def read_checkpoint(path: str, flag: str = '--checkpoint') -> Dict[str, Any]:
    """A checkpoint file read safely (weights only): released ``.pth``, ours, or ``.safetensors``."""
    try:
        return load_checkpoint_file(path)
    except FileNotFoundError:
        kind = 'a folder, expected a checkpoint file' if os.path.isdir(path) else 'no such file'
        raise ScriptError(f'{flag} {path}: {kind}') from None
    except (OSError, RuntimeError) as e:
        raise ScriptError(f'{flag} {path}: {e}') from None


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


# what a checkpoint of scripts/train.py (or a converted file: model, model_kwargs) supplies when a script has
# the flag and leaves it unset
FROM_TRAINING = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'img_size', 'input_size', 'crop_pct', 'mean',
                 'std', 'interpolation', 'class_map', 'dataset')
MODEL_REQUIRED = ('--model is required (only checkpoints written by scripts/train.py and files converted by '
                  'scripts/convert_checkpoint.py name their model)')


def require_model(name: Optional[str]) -> str:
    if not name:
        raise ScriptError(MODEL_REQUIRED)
    return name


def apply_saved_settings(args) -> Dict[str, Any]:
    """Read ``args.checkpoint`` and set each :data:`FROM_TRAINING` setting that ``args`` has and leaves unset
    (None or {}) to the value the file carries (:func:`saved_settings`): a run's model, kwargs, class count,
    ... need not be repeated. Then ``args.model`` is required.

    Returns the checkpoint as read (weights-only), or {} without ``--checkpoint``.
    """
    state: Dict[str, Any] = {}
    if args.checkpoint:
        state = read_checkpoint(args.checkpoint)
        saved = saved_settings(args.checkpoint, state)
        for key in FROM_TRAINING:
            if hasattr(args, key) and getattr(args, key) in (None, {}) and saved.get(key) not in (None, {}):
                setattr(args, key, saved[key])
    require_model(args.model)
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


def load_weights(model: nn.Module, path: str, use_ema: bool = False, flag: str = '--checkpoint') -> None:
    """Load a checkpoint file (released format or ours) into ``model``, strictly, with clear errors."""
    checkpoint = read_checkpoint(path, flag)
    try:
        if isinstance(model, RMT):
            weights = checkpoint_filter_fn(checkpoint, model, use_ema=use_ema, source=path)
        else:
            weights = state_dict_from_checkpoint(checkpoint, use_ema)
        check_fits(weights, model, f'{flag} {path}')
        model.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError) as e:
        raise ScriptError(f'{flag} {path}: does not fit {type(model).__name__}: {e}') from None
    _logger.info(f'Loaded {describe_weights(checkpoint, use_ema)} of {path}')


def check_fits(state_dict: Dict[str, Any], model: nn.Module, what: str, hint: str = '') -> None:
    """One line when ``state_dict`` does not fit ``model`` exactly: how many tensors disagree, the first names."""
    missing, unexpected, mismatched = state_dict_misfit(state_dict, model)
    count = len(missing) + len(unexpected) + len(mismatched)
    if count:
        names = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(model.state_dict()[k].shape)}' for k in mismatched[:3]]
        names += [f'{k} (missing)' for k in missing[:3 - len(names)]]
        names += [f'{k} (not in the model)' for k in unexpected[:max(0, 3 - len(names))]]
        raise ScriptError(f'{what} was made for another model or config: {count} of {len(model.state_dict())} '
                          f'tensors disagree ({", ".join(names)}{", ..." if count > len(names) else ""}){hint}')


def open_split(args, split: str, is_training: bool, class_map: str = '', require_split: bool = True):
    """:func:`rmt.tools.data.open_dataset` with its errors (a missing, misshapen or unreadable folder) as one line."""
    try:
        return open_dataset(args, split, is_training, class_map, require_split)
    except (OSError, ValueError) as e:
        raise ScriptError(str(e)) from None


def check_num_classes(classes: Optional[list], num_classes: int, where: str, fix: str) -> None:
    if classes is not None and len(classes) != num_classes:
        shown = ', '.join(map(str, classes[:5])) + (', ...' if len(classes) > 5 else '')
        raise ScriptError(f'class-count mismatch: {where} has {len(classes)} classes ({shown}) but the model has '
                          f'{num_classes} outputs; {fix}')


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
            raise ScriptError(f'{flag} {path}: ' + ('a folder, expected a checkpoint file' if os.path.isdir(path)
                                                     else 'no such file'))
    made_for = next((s for s in (saved_settings(p) for p in (pretrained_path, initial) if p) if s), {})
    name = require_model(args.model or made_for.get('model') or default_model)
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
    except (ValueError, RuntimeError, TypeError, OSError) as e:  # OSError: pretrained weights not downloadable
        hint = f'; give the weights file with {weights_flag} FILE' if pretrained and not pretrained_path else ''
        how = f'pretrained from {weights_flag} {pretrained_path}' if pretrained_path else \
            'pretrained' if pretrained else 'from scratch'
        raise ScriptError(f'cannot create model {name} ({how}): {e}{hint}') from None
    if pretrained_path:
        _logger.info(f'Loaded pretrained weights from {pretrained_path}')
    if initial:  # the plain weights of an RMT file, as everywhere here; timm's default (EMA first) for other models
        load_weights(model, initial, use_ema=not isinstance(model, RMT), flag='--initial-checkpoint')
    return model

"""Checkpoint files: reading them safely, the weights inside, and the released names.

* :func:`load_checkpoint_file` reads a ``.pth`` / ``.pth.tar`` (weights-only unpickling, with
  ``argparse.Namespace`` allowed for the ``args`` that training checkpoints carry, and numpy scalars
  and dtypes for the ``meta`` of mmdet / mmseg checkpoints) or a ``.safetensors`` file. Every failure
  is a one-line error naming the file.
* :func:`state_dict_from_checkpoint` picks the weights of a training checkpoint in timm's order
  (``state_dict_ema`` / ``model_ema`` when asked for, then ``state_dict``, then ``model``) and strips
  the ``module.`` / ``_orig_mod.`` prefixes with timm's ``clean_state_dict``.
* :func:`to_model_names` turns any state dict we accept into this model's names: the backbone of a
  released detector or segmentor (``backbone.*``; necks and heads are ignored), the wrappers of
  timm's ``features_only`` and mmpretrain's ``TIMMBackbone``, and the released code's names
  (``patch_embed.*``, ``layers.*``, ``extra_norms.*``; :func:`remap_released`, which also checks the
  released position buffers against the model's configuration).
* :func:`released_names_hook` applies it inside ``model.load_state_dict`` with torch's meaning of
  ``strict``, so ``timm.create_model(..., checkpoint_path=...)``, ``timm.models.load_checkpoint`` and
  a plain ``load_state_dict`` take every such file; :func:`checkpoint_filter_fn` is timm's pretrained
  path. For RMT models, :func:`load_checkpoint` takes the place of timm's ``load_checkpoint`` (which
  ``checkpoint_path=`` also calls), so the file is read here and named in every error.
* A converted ``.safetensors`` names its model and constructor kwargs in its metadata
  (:func:`model_metadata`, :func:`read_model_metadata`).

timm's ``load_state_dict`` is not used for reading: it returns only the weights (a run's ``args``
and a converted file's metadata are needed too), its errors do not name the file, and it reports
a file of random bytes as needing "non-allowlisted pickle globals". Its order of keys and its
prefix cleaning are what is wanted, and are used here.
"""
import argparse
import contextvars
import functools
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from timm.models import adapt_input_conv, clean_state_dict

from .position import decay_rates, rotary_angles
from .timm_compat import TIMM_LOAD_CHECKPOINT

__all__ = [
    'load_checkpoint_file', 'weights_key', 'has_ema', 'state_dict_from_checkpoint', 'is_released', 'remap_released',
    'to_model_names', 'CheckpointMismatchError', 'loading', 'released_names_hook', 'state_dict_misfit',
    'checkpoint_filter_fn', 'load_checkpoint', 'pretrained_source', 'HUB_WEIGHT_FILES', 'official_config_to_kwargs',
    'model_metadata', 'read_model_metadata',
]

_logger = logging.getLogger(__name__)


# --- reading -----------------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def _reading_safetensors(path: str):
    """A ``.safetensors`` file that cannot be read becomes a one-line ``RuntimeError`` naming it."""
    from safetensors import SafetensorError
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise RuntimeError(f'cannot read checkpoint {path}: the .safetensors file is truncated or corrupted '
                           f'({_first_line(e)})') from None


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    with _reading_safetensors(path):
        return load_file(path, device='cpu')


@functools.lru_cache(maxsize=None)
def _safe_globals() -> Tuple[Any, ...]:
    """What weights-only unpickling may rebuild beyond tensors and containers.

    ``argparse.Namespace``: the ``args`` of released and timm training checkpoints. numpy scalars and
    dtypes: the ``meta`` of mmcv / mmengine checkpoints (mmseg's best-score bookkeeping stores numpy
    scalars), under the module path numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) pickle them
    with. None of these runs code from the file; anything else is refused.
    """
    allowed: List[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return tuple(allowed)
    core = getattr(np, '_core', None) or np.core
    scalar = core.multiarray.scalar
    allowed += [scalar, (scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'), np.dtype]
    dtype_classes = vars(getattr(np, 'dtypes', object)).values()  # numpy >= 1.25: a class per dtype
    allowed += [t for t in dtype_classes if isinstance(t, type) and issubclass(t, np.dtype)]
    return tuple(allowed)


def _read_pickle(path: str) -> Any:
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        raise RuntimeError(f'cannot read checkpoint {path}: the file is empty')
    zipped = head == b'PK\x03\x04'  # torch.save's format; the legacy one is a pickle (protocol opcode 0x80)
    if not zipped and head[0] != 0x80:
        raise RuntimeError(f'{path} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)')
    try:
        with torch.serialization.safe_globals(list(_safe_globals())):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r'GLOBAL (\S+)', str(e))
        if blocked:
            raise RuntimeError(
                f'refusing to load {path}: it holds {blocked.group(1)}, not only tensors and containers, and '
                f'loading it could run code from the file') from None
        raise RuntimeError(f'cannot read checkpoint {path}: not a PyTorch checkpoint, or corrupted '
                           f'({_first_line(e)})') from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise RuntimeError(f'cannot read checkpoint {path}: the file is truncated or corrupted '
                           f'({_first_line(e)})') from None


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The contents of a checkpoint file: ``.safetensors``, or a ``torch.save`` file (``.pth``, ``.pth.tar``, ...).

    Never runs code from the file: only tensors, containers, ``argparse.Namespace`` (which released
    and training checkpoints carry as ``args``) and numpy scalars and dtypes (in mmdet / mmseg
    ``meta``) are unpickled. Raises ``FileNotFoundError`` or a one-line ``RuntimeError`` naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    state = _read_safetensors(path) if path.endswith('.safetensors') else _read_pickle(path)
    if not isinstance(state, dict):
        raise RuntimeError(f'checkpoint {path} holds a {type(state).__name__}, not a state dict')
    return state


def weights_key(checkpoint: Dict[str, Any], use_ema: bool = False) -> str:
    """The key of the weights in a training checkpoint, in timm's order ('' for a bare state dict).

    EMA weights (``state_dict_ema`` from timm's scripts, ``model_ema`` from the released code) when
    ``use_ema`` and present; else ``state_dict`` (timm, mmdet, mmseg), else ``model`` (released).
    """
    keys = ('state_dict_ema', 'model_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
    return next((k for k in keys if isinstance(checkpoint.get(k), dict)), '')


def has_ema(checkpoint: Dict[str, Any]) -> bool:
    return any(isinstance(checkpoint.get(k), dict) for k in ('state_dict_ema', 'model_ema'))


def state_dict_from_checkpoint(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, Any]:
    """The weights of a checkpoint (see :func:`weights_key`), without DDP / ``torch.compile`` prefixes."""
    key = weights_key(checkpoint, use_ema)
    return clean_state_dict(checkpoint[key] if key else checkpoint)


# --- the released names --------------------------------------------------------------------------------

_RELEASED_RENAMES = [
    (r'^patch_embed\.proj\.(0|3|6|9)\.', lambda m: f'stem.conv{(int(m.group(1)) // 3) + 1}.'),
    (r'^patch_embed\.proj\.(1|4|7|10)\.', lambda m: f'stem.norm{(int(m.group(1)) - 1) // 3 + 1}.'),
    (r'^layers\.(\d+)\.downsample\.reduction\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.conv.'),
    (r'^layers\.(\d+)\.downsample\.norm\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.norm.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.retention_layer_norm\.', '.norm1.'),
    (r'\.final_layer_norm\.', '.norm2.'),
    (r'\.retention\.lepe\.conv\.', '.attn.lce.'),
    (r'\.retention\.out_proj\.', '.attn.proj.'),
    (r'\.retention\.(q|k|v)_proj\.', r'.attn.\1.'),
    (r'\.pos\.conv\.', '.cpe.conv.'),
    (r'\.gamma_1$', '.ls1.gamma'),
    (r'\.gamma_2$', '.ls2.gamma'),
    (r'^proj\.', 'head.proj.'),
    (r'^norm\.', 'head.norm.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
    (r'^extra_norms\.', 'feature_norms.'),  # the released detection/segmentation backbones
]

_CLASSIFIER = ('head.fc.', 'aux_head.')
_FEATURE_NORMS = 'feature_norms.'


class CheckpointMismatchError(ValueError, RuntimeError):
    """A state dict that does not fit the model, in one line: a ``ValueError``, and the ``RuntimeError``
    that torch's ``load_state_dict`` raises, so callers catching either keep working."""


def is_released(state_dict: Dict[str, Any]) -> bool:
    """Whether a state dict uses the released code's names."""
    return any(k.startswith(('patch_embed.', 'layers.')) for k in state_dict)


def _check_position_buffer(key: str, value: torch.Tensor, model: nn.Module, stage: int, kind: str) -> None:
    if stage >= len(model.stages):
        return  # a pruned model; the stage's weights are ignored with it
    relpos = model.stages[stage].relpos
    expected = rotary_angles(relpos.head_dim) if kind == 'angle' else \
        decay_rates(relpos.num_heads, relpos.decay_exponent, relpos.heads_range)
    if value.shape != expected.shape or not torch.allclose(value.float().cpu(), expected, rtol=1e-5, atol=1e-6):
        raise CheckpointMismatchError(
            f'checkpoint key {key} {tuple(value.shape)} does not match this model\'s stage {stage} '
            f'(expected {tuple(expected.shape)}): the checkpoint was made for another RMT configuration')


def remap_released(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Released key names and layouts to this model's; the position buffers are checked, then dropped.

    Raises ``ValueError`` when a position buffer disagrees with ``model``'s configuration.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r'^layers\.(\d+)\.Relpos\.(angle|decay)$', key)
        if m:
            _check_position_buffer(key, value, model, int(m.group(1)), m.group(2))
            continue
        for pattern, repl in _RELEASED_RENAMES:
            key = re.sub(pattern, repl, key)
        if key.endswith(('.ls1.gamma', '.ls2.gamma')):
            value = value.reshape(-1)
        out[key] = value
    return out


def state_dict_misfit(state_dict: Dict[str, Any], model: nn.Module) -> Tuple[List[str], List[str], List[str]]:
    """The keys of ``state_dict`` that keep it from loading into ``model`` strictly: ``(missing, unexpected,
    mismatched)``, the last those whose shapes differ, in the model's order (unexpected: the state dict's)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k].shape]
    return missing, unexpected, mismatched


def _strip_wrappers(state_dict: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The backbone's weights, without the prefixes of what held it.

    A detector or segmentor (mmdet, mmseg: ``backbone.*`` beside ``neck.*``, ``rpn_head.*``,
    ``decode_head.*``, ...) gives its ``backbone.*`` tensors and the rest is ignored, said in one log
    line; then mmpretrain's ``TIMMBackbone`` (``timm_model.``) and timm's ``features_only`` wrapper
    (``model.``) are unwrapped when every key carries them.
    """
    if any(k.startswith('backbone.') for k in state_dict):
        ignored = sorted({k.split('.', 1)[0] for k in state_dict if not k.startswith('backbone.')})
        if ignored:
            count = sum(not k.startswith('backbone.') for k in state_dict)
            _logger.info(f'{source}: a detection/segmentation checkpoint; loading its backbone, ignoring '
                         f'{", ".join(ignored)} ({count} tensors)')
        state_dict = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    for wrapper in ('timm_model.', 'model.'):
        if state_dict and all(k.startswith(wrapper) for k in state_dict):
            state_dict = {k[len(wrapper):]: v for k, v in state_dict.items()}
    return state_dict


def to_model_names(state_dict: Dict[str, Any], model: nn.Module, source: str = 'the state dict') -> Dict[str, Any]:
    """Any state dict we accept, in ``model``'s names (see :func:`_strip_wrappers` and :func:`remap_released`)."""
    state_dict = _strip_wrappers(state_dict, source)
    if is_released(state_dict):
        try:
            state_dict = remap_released(state_dict, model)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f'{source}: {e}') from None
    return state_dict


def _names(keys: List[str], limit: int = 5) -> str:
    return ', '.join(keys[:limit]) + (', ...' if len(keys) > limit else '')


def _fit(state_dict: Dict[str, Any], model: nn.Module, source: str, strict: bool = True) -> Dict[str, Any]:
    """``state_dict`` (in ``model``'s names) adapted to what ``model`` builds, or a one-line error.

    * Tensors of parts the model does not build on purpose are ignored: what
      ``prune_intermediate_layers`` removed, and the classifier when the model has none (``num_classes=0``).
    * A file with per-stage output norms (``feature_norms``, the released ``extra_norms``) for a model
      built without them raises, saying to pass ``feature_norm=True``.
    * A file without a classification head (a detection/segmentation backbone) raises for a model with
      classes, saying how to build a backbone. With ``strict=False`` it is torch's missing keys instead.
    * When ``strict``, what a file of the other kind cannot have keeps the model's own values, said in a
      log line: the output norms for a classification file, the head's projection in a ``num_classes=0``
      model for a backbone file. (With ``strict=False`` they are reported missing, as torch does.)
    """
    expected = model.state_dict()
    absent = tuple(getattr(model, 'pruned_prefixes', ())) + (_CLASSIFIER if model.num_classes == 0 else ())
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.startswith(absent)}

    head_in_model = [k for k in expected if k.startswith('head.')]
    headless_file = bool(head_in_model) and any(k.startswith('stem.') for k in state_dict) \
        and not any(k.startswith(('head.', 'aux_head.')) for k in state_dict)
    if strict and headless_file and model.num_classes > 0:
        raise CheckpointMismatchError(
            f'{source} has no classification head (it is a detection/segmentation backbone): build a backbone '
            f'instead, with features_only=True, feature_norm=True (or num_classes=0 for a model without classifier)')
    extra_norms = sorted(k for k in state_dict if k.startswith(_FEATURE_NORMS) and k not in expected)
    if extra_norms and not any(k.startswith(_FEATURE_NORMS) for k in expected):
        raise CheckpointMismatchError(
            f'{source} has per-stage output norms ({_names(extra_norms, 2)}: the extra_norms of a detection/'
            f'segmentation backbone) and this model was built without them: pass feature_norm=True')
    if strict:
        own = []
        if not any(k.startswith(_FEATURE_NORMS) for k in state_dict):
            own += [k for k in expected if k.startswith(_FEATURE_NORMS)]
        if headless_file:
            own += head_in_model
        if own:
            _logger.info(f'{source}: {_names(own, 2)} ({len(own)} tensors) not in the file; they keep '
                         f'their initial values')
            state_dict.update({k: expected[k] for k in own})
    return state_dict


def _check_fit(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str,
               strict: bool = True, allow_unexpected: bool = False) -> List[str]:
    """Raise a one-line :class:`CheckpointMismatchError` naming (the first few) mismatched shapes, and missing
    and unexpected keys when ``strict``; return the unexpected keys."""
    expected = model.state_dict()
    missing, unexpected, mismatched = map(sorted, state_dict_misfit(state_dict, model))
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}'
                  for k in mismatched]
    if mismatched or (strict and (missing or (unexpected and not allow_unexpected))):
        parts = [f'{source} does not fit this {type(model).__name__} model']
        if mismatched:
            parts.append(f'shape mismatches ({len(mismatched)}): ' + '; '.join(mismatched[:5])
                         + ('; ...' if len(mismatched) > 5 else ''))
        if missing and strict:
            parts.append(f'missing keys ({len(missing)}): ' + _names(missing))
        if unexpected and strict:
            parts.append(f'unexpected keys ({len(unexpected)}): ' + _names(unexpected))
        raise CheckpointMismatchError(' | '.join(parts))
    return unexpected


# How the enclosing load is made: what it loads (for messages) and `strict`, which torch does not tell
# load_state_dict hooks (it passes them strict=True always). None: not known (our model inside another).
_loading = contextvars.ContextVar('rmt_loading', default=('the state dict', None))


@contextmanager
def loading(strict: Optional[bool] = None, source: Optional[str] = None):
    """Tell :func:`released_names_hook` the ``strict`` of the ``load_state_dict`` call it runs in, and what is
    being loaded (a file's name, for messages). Used by ``RMT.load_state_dict``, ``RMTFeatures.load_state_dict``
    and :func:`load_checkpoint`."""
    current_source, current_strict = _loading.get()
    token = _loading.set((current_source if source is None else source, current_strict if strict is None else strict))
    try:
        yield
    finally:
        _loading.reset(token)


def released_names_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata, strict: bool,
                        missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook of :class:`~rmt.model.RMT`: any state dict we accept loads, with torch's ``strict``.

    The keys are put in this model's names first (:func:`to_model_names`: released names, a detector's
    backbone, wrapper prefixes) and adapted to what the model builds (:func:`_fit`). Shape mismatches
    raise a one-line :class:`CheckpointMismatchError` with both shapes; with ``strict=True``, so do missing
    and unexpected keys (instead of torch's list of every key). With ``strict=False``, or when the model
    is loaded as part of another module, torch loads what fits and reports the missing and unexpected keys.
    (torch passes hooks ``strict=True`` whatever the call said; the call's own is read from :func:`loading`.)
    """
    keys = [k for k in state_dict if k.startswith(prefix)]
    local = {k[len(prefix):]: state_dict[k] for k in keys}
    source, strict = _loading.get()
    converted = _fit(to_model_names(local, module, source), module, source, bool(strict))
    _check_fit(converted, module, source, bool(strict))
    for k in keys:
        del state_dict[k]
    state_dict.update({prefix + k: v for k, v in converted.items()})


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: nn.Module,
        use_ema: bool = False,
        source: str = 'checkpoint',
) -> Dict[str, torch.Tensor]:
    """Turn a released RMT checkpoint, or one of ours, into a state dict for ``model`` (timm's pretrained path).

    Accepts a training checkpoint (released: ``model``, maybe ``model_ema``, ``args``, optimizer
    state, ...; timm's: ``state_dict``, ...; the weights are picked by :func:`state_dict_from_checkpoint`),
    a released detection/segmentation checkpoint (mmdet / mmseg: its backbone), a bare state dict in the
    released names, or one in this project's names. Drops the released position buffers after checking
    them, keeps the model's own classifier when the class count differs, starts the feature norms fresh
    for a classification checkpoint, adapts the stem to ``in_chans``, and raises ``ValueError`` naming
    the disagreeing keys when the checkpoint does not fit the model. Tensors the model does not have are
    named in a warning and dropped.
    """
    state_dict = to_model_names(state_dict_from_checkpoint(state_dict, use_ema), model, source)

    expected = model.state_dict()
    # a new class count (or none): the classifiers are not loaded, the model keeps its own
    classifier_keys = [k for k in state_dict if k.startswith(_CLASSIFIER)]
    new_classes = any(k in expected and expected[k].shape != state_dict[k].shape for k in classifier_keys) \
        or ('head.fc.weight' in state_dict and 'head.fc.weight' not in expected)
    if new_classes:
        _logger.info(f'{source}: classifier not loaded (model has {model.num_classes} classes)')
        for k in classifier_keys:
            state_dict.pop(k)
        state_dict.update({k: v for k, v in expected.items() if k.startswith(_CLASSIFIER)})
    state_dict = _fit(state_dict, model, source)
    # another input channel count: adapt the first conv as timm does
    stem_key = 'stem.conv1.weight'
    if stem_key in state_dict and stem_key in expected and state_dict[stem_key].shape[1] != model.in_chans:
        state_dict[stem_key] = adapt_input_conv(model.in_chans, state_dict[stem_key])

    unexpected = _check_fit(state_dict, model, source, allow_unexpected=True)
    if unexpected:
        warnings.warn(f'{source}: ignoring keys this model does not have: {", ".join(unexpected)}')
        for k in unexpected:
            state_dict.pop(k)
    return state_dict


def load_checkpoint(model: nn.Module, checkpoint_path: str, use_ema: bool = True,
                    device: Union[str, torch.device] = 'cpu', strict: bool = True, remap: bool = False,
                    filter_fn: Optional[Callable] = None, weights_only: bool = True) -> Any:
    """timm's ``load_checkpoint`` for RMT models (``import rmt`` routes them here, also from
    ``create_model(checkpoint_path=...)``; see :func:`rmt.timm_compat.route_load_checkpoint`), reading the file
    here: every failure is one line naming the file, and the files :func:`load_checkpoint_file` accepts (numpy
    scalars in an mmdet ``meta``, for one) load. ``remap=True``, ``weights_only=False`` and numpy weight files
    go to timm's function unchanged. ``device`` is not needed: the weights are copied into the model's own
    tensors.
    """
    if remap or not weights_only or str(checkpoint_path).lower().endswith(('.npz', '.npy')):
        return TIMM_LOAD_CHECKPOINT(model, checkpoint_path, use_ema=use_ema, device=device, strict=strict,
                                    remap=remap, filter_fn=filter_fn, weights_only=weights_only)
    state_dict = state_dict_from_checkpoint(load_checkpoint_file(checkpoint_path), use_ema)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    with loading(source=str(checkpoint_path)):
        return model.load_state_dict(state_dict, strict=strict)


# --- where pretrained weights come from ----------------------------------------------------------------

# The weight files of a folder in timm's Hub layout, in timm's order of preference (then any file by extension).
HUB_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
_WEIGHT_EXTENSIONS = ('.safetensors', '.pth', '.pth.tar', '.bin')


def _folder_weights(folder: str) -> str:
    for name in HUB_WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'local-dir:{folder}: no such folder')
    for ext in _WEIGHT_EXTENSIONS:
        found = sorted(f for f in os.listdir(folder) if f.endswith(ext))
        if found:
            return os.path.join(folder, found[0])
    raise FileNotFoundError(f'local-dir:{folder} holds no weights file ({", ".join(HUB_WEIGHT_FILES)})')


def _hub_weights(hub_id: str, filename: Optional[str], cache_dir: Optional[str]) -> str:
    """The local path of a Hub repository's weight file (``org/name`` or ``org/name@revision``), downloaded into
    the Hub cache when not there (``HF_HUB_OFFLINE=1``: only from the cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    import timm
    repo_id, _, revision = hub_id.partition('@')
    names = (filename,) if filename else HUB_WEIGHT_FILES[:2]
    for name in names:
        try:
            return hf_hub_download(repo_id, name, revision=revision or None, cache_dir=cache_dir,
                                   library_name='timm', library_version=timm.__version__)
        except EntryNotFoundError as e:
            error = e
    raise FileNotFoundError(f'hf-hub:{hub_id} has no weights file ({" or ".join(names)}): {_first_line(error)}')


def pretrained_source(cfg: Any, custom_load: bool = True, cache_dir: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Pretrained-cfg entries that make timm load the weights ``cfg`` names with :meth:`rmt.RMT.load_pretrained`.

    ``cfg`` is timm's resolved ``PretrainedCfg``. A ``local-dir:`` folder gives its weight file, a Hub
    repository (``hf-hub:`` or ``hf_hub_id``) the file fetched into the Hub cache, each as ``file`` with
    ``custom_load`` (timm reads these sources itself otherwise: its own errors, and EMA weights first);
    ``file`` and ``url`` get ``custom_load`` (unless ``custom_load=False``); a ``state_dict`` goes
    through timm's path with :func:`checkpoint_filter_fn` as it is. Returns ``None`` when ``cfg`` names
    no weights. Raises ``FileNotFoundError`` naming the folder or repository that holds no weights.
    """
    # timm's order (its _resolve_pretrained_source): the cfg's source, then state_dict, file, hf_hub_id, url
    if cfg.source == 'local-dir':
        return dict(file=_folder_weights(cfg.file), source=None, custom_load=True)
    if cfg.source == 'hf-hub' or (cfg.hf_hub_id and not cfg.state_dict and not cfg.file):
        return dict(file=_hub_weights(cfg.hf_hub_id, cfg.hf_hub_filename, cache_dir), source=None, custom_load=True)
    if cfg.state_dict:
        return {}
    if cfg.file or cfg.url:
        return dict(custom_load=custom_load)
    return None


def official_config_to_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Model kwargs from a config in the released code's argument names (for custom sizes)."""
    names = dict(
        embed_dims='embed_dims', depths='depths', num_heads='num_heads', init_values='decay_exponents',
        heads_ranges='heads_ranges', mlp_ratios='mlp_ratios', chunkwise_recurrents='decomposed',
        layerscales='layer_scales', layer_init_values='layer_init_values', projection='projection',
        num_classes='num_classes', in_chans='in_chans',
    )
    unknown = sorted(set(cfg) - set(names))
    if unknown:
        raise ValueError(f'unknown keys in the released config: {unknown}')
    return {names[k]: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}


# --- the model a converted file is for -----------------------------------------------------------------

def model_metadata(model_name: str, model_kwargs: Dict[str, Any], **extra: Any) -> Dict[str, str]:
    """``.safetensors`` metadata naming the model (``model``) and its constructor kwargs (``model_kwargs``, JSON)."""
    metadata = {'format': 'pt', 'model': model_name, 'model_kwargs': json.dumps(model_kwargs, sort_keys=True)}
    metadata.update({k: str(v) for k, v in extra.items()})
    return metadata


def read_model_metadata(path: Union[str, os.PathLike]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(model name, kwargs)`` stored in a ``.safetensors`` file by :func:`model_metadata`, else ``None``."""
    path = os.fspath(path)
    if not path.endswith('.safetensors') or not os.path.isfile(path):
        return None
    from safetensors import safe_open
    with _reading_safetensors(path), safe_open(path, 'pt') as f:
        metadata = f.metadata() or {}
    if 'model' not in metadata:
        return None
    try:
        kwargs = json.loads(metadata.get('model_kwargs') or '{}')
    except json.JSONDecodeError:
        raise RuntimeError(f'{path}: its model_kwargs metadata is not JSON: {metadata["model_kwargs"][:200]}') from None
    return metadata['model'], {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}

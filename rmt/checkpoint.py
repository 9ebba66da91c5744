"""Checkpoint files: reading them safely, the weights inside, and the released names.

* :func:`load_checkpoint_file` reads a ``.pth`` / ``.pth.tar`` (weights-only unpickling, with
  ``argparse.Namespace`` allowed for the ``args`` that training checkpoints carry) or a
  ``.safetensors`` file. Every failure is a one-line error naming the file.
* :func:`state_dict_from_checkpoint` picks the weights of a training checkpoint in timm's order
  (``state_dict_ema`` / ``model_ema`` when asked for, then ``state_dict``, then ``model``) and strips
  the ``module.`` / ``_orig_mod.`` prefixes with timm's ``clean_state_dict``.
* The released code's names (``patch_embed.*``, ``layers.*``, ...) are mapped to this model's by
  :func:`remap_released`, which also checks the released position buffers against the model's
  configuration. :func:`released_names_hook` applies it inside ``model.load_state_dict``, so
  ``timm.create_model(..., checkpoint_path=...)``, ``timm.models.load_checkpoint`` and a plain
  ``load_state_dict`` take released files too; :func:`checkpoint_filter_fn` is timm's pretrained path.
* A converted ``.safetensors`` names its model and constructor kwargs in its metadata
  (:func:`model_metadata`, :func:`read_model_metadata`).

timm's ``load_state_dict`` is not used for reading: it returns only the weights (a run's ``args``
and a converted file's metadata are needed too), its errors do not name the file, and it reports
a file of random bytes as needing "non-allowlisted pickle globals". Its order of keys and its
prefix cleaning are what is wanted, and are used here.
"""
import argparse
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from timm.models import clean_state_dict
from timm.models._manipulate import adapt_input_conv

from .position import decay_rates, rotary_angles

__all__ = [
    'load_checkpoint_file', 'weights_key', 'has_ema', 'state_dict_from_checkpoint', 'is_released', 'remap_released',
    'released_names_hook', 'state_dict_misfit', 'checkpoint_filter_fn', 'official_config_to_kwargs', 'model_metadata',
    'read_model_metadata',
]

_logger = logging.getLogger(__name__)


# --- reading -----------------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError) as e:
        raise RuntimeError(f'cannot read checkpoint {path}: the .safetensors file is truncated or corrupted '
                           f'({_first_line(e)})') from None


def _read_pickle(path: str) -> Any:
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        raise RuntimeError(f'cannot read checkpoint {path}: the file is empty')
    zipped = head == b'PK\x03\x04'  # torch.save's format; the legacy one is a pickle (protocol opcode 0x80)
    if not zipped and head[0] != 0x80:
        raise RuntimeError(f'{path} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
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

    Never runs code from the file: only tensors, containers and ``argparse.Namespace`` (which released
    and training checkpoints carry as ``args``) are unpickled. Raises ``FileNotFoundError`` or a
    one-line ``RuntimeError`` naming the file.
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
    ``use_ema`` and present; else ``state_dict`` (timm), else ``model`` (released).
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


def is_released(state_dict: Dict[str, Any]) -> bool:
    """Whether a state dict uses the released code's names."""
    return any(k.startswith(('patch_embed.', 'layers.')) for k in state_dict)


def _check_position_buffer(key: str, value: torch.Tensor, model: nn.Module, stage: int, kind: str) -> None:
    if stage >= len(model.stages):
        return  # a pruned model; the stage's weights are dropped as unexpected keys
    relpos = model.stages[stage].relpos
    expected = rotary_angles(relpos.head_dim) if kind == 'angle' else \
        decay_rates(relpos.num_heads, relpos.decay_exponent, relpos.heads_range)
    if value.shape != expected.shape or not torch.allclose(value.float().cpu(), expected, rtol=1e-5, atol=1e-6):
        raise ValueError(
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


def _check_fit(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str) -> List[str]:
    """Raise ``ValueError`` naming the missing and mismatched keys; return the unexpected ones."""
    expected = model.state_dict()
    missing, unexpected, mismatched = map(sorted, state_dict_misfit(state_dict, model))
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}'
                  for k in mismatched]
    if missing or mismatched:
        lines = [f'{source} does not fit this {type(model).__name__} model']
        if mismatched:
            lines.append('shape mismatches: ' + '; '.join(mismatched[:20]))
        if missing:
            lines.append(f'missing keys ({len(missing)}): ' + ', '.join(missing[:20]))
        if unexpected:
            lines.append(f'unexpected keys ({len(unexpected)}): ' + ', '.join(unexpected[:20]))
        raise ValueError('\n'.join(lines))
    return unexpected


def released_names_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata, strict: bool,
                        missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook of :class:`~rmt.model.RMT`: a state dict in the released names is
    mapped to this model's first, with the checks of :func:`remap_released` (and, when ``strict``, a
    ``ValueError`` naming missing and mismatched keys instead of torch's dump)."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    local = {k[len(prefix):]: state_dict[k] for k in keys}
    if not is_released(local):
        return
    converted = remap_released(local, module)
    if strict:
        _check_fit(converted, module, 'the released state dict')
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
    a bare state dict in the released names, or one in this project's names. Drops the released position
    buffers after checking them, keeps the model's own classifier when the class count differs, starts
    the feature norms fresh for a classification checkpoint, adapts the stem to ``in_chans``, and raises
    ``ValueError`` naming the disagreeing keys when the checkpoint does not fit the model. Tensors the
    model does not have are named in a warning and dropped.
    """
    state_dict = state_dict_from_checkpoint(state_dict, use_ema)
    if is_released(state_dict):
        try:
            state_dict = remap_released(state_dict, model)
        except ValueError as e:
            raise ValueError(f'{source}: {e}') from None

    expected = model.state_dict()
    # a new class count (or none): the classifiers are not loaded, the model keeps its own
    classifier_keys = [k for k in state_dict if k.startswith(('head.fc.', 'aux_head.'))]
    new_classes = any(k in expected and expected[k].shape != state_dict[k].shape for k in classifier_keys) \
        or ('head.fc.weight' in state_dict and 'head.fc.weight' not in expected)
    if new_classes:
        _logger.info(f'{source}: classifier not loaded (model has {model.num_classes} classes)')
        for k in classifier_keys:
            state_dict.pop(k)
        state_dict.update({k: v for k, v in expected.items() if k.startswith(('head.fc.', 'aux_head.'))})
    # a dense-prediction backbone (feature_norm=True) from a classification checkpoint: the norms start fresh
    if not any(k.startswith('feature_norms.') for k in state_dict):
        state_dict.update({k: v for k, v in expected.items() if k.startswith('feature_norms.')})
    # another input channel count: adapt the first conv as timm does
    stem_key = 'stem.conv1.weight'
    if stem_key in state_dict and stem_key in expected and state_dict[stem_key].shape[1] != model.in_chans:
        state_dict[stem_key] = adapt_input_conv(model.in_chans, state_dict[stem_key])

    unexpected = _check_fit(state_dict, model, source)
    if unexpected:
        warnings.warn(f'{source}: ignoring keys this model does not have: {", ".join(unexpected)}')
        for k in unexpected:
            state_dict.pop(k)
    return state_dict


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
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, 'pt') as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise RuntimeError(f'cannot read checkpoint {path}: the .safetensors file is truncated or corrupted '
                           f'({_first_line(e)})') from None
    if 'model' not in metadata:
        return None
    try:
        kwargs = json.loads(metadata.get('model_kwargs') or '{}')
    except json.JSONDecodeError:
        raise RuntimeError(f'{path}: its model_kwargs metadata is not JSON: {metadata["model_kwargs"][:200]}') from None
    return metadata['model'], {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}

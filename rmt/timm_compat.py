"""Every name of timm's or torch's that is not their public API, in one place.

What the rest of the package needs from these private names is imported or patched here only, each
with what breaks if timm or torch changes it. ``tests/test_timm_compat.py`` checks each of them
against the installed timm and torch, and fails (it does not skip) when one has moved. A name that
cannot be imported stops ``import rmt`` with an ``ImportError`` naming it and the timm version.

* ``FeatureGetterNet``, ``feature_take_indices`` (``timm.models._features``): not exported by
  ``timm.models``. ``features_only`` models subclass the first (``build_model_with_cfg`` tests
  ``issubclass(feature_cls, FeatureGetterNet)`` against this very class); ``forward_intermediates``
  and ``prune_intermediate_layers`` pick their stages with the second.
* ``BatchNorm`` (``torch.nn.modules.batchnorm._BatchNorm``): the base class of every BatchNorm
  (1d/2d/3d, lazy and synchronised); frozen stages and ``norm_eval`` find the layers with it.
* :func:`route_load_checkpoint`: makes timm's ``load_checkpoint`` (``timm.models.load_checkpoint``,
  and the name ``create_model(checkpoint_path=...)`` calls in ``timm.models._factory``) call our
  loader for RMT models. Every other model goes to timm's function, unchanged.
"""
import warnings
from typing import Any, Callable, Optional, Tuple

from torch import nn

import timm
import timm.models

__all__ = ['FeatureGetterNet', 'feature_take_indices', 'BatchNorm', 'TIMM_LOAD_CHECKPOINT', 'route_load_checkpoint',
           'load_checkpoint']


def _missing(name: str, error: BaseException) -> ImportError:
    return ImportError(f'rmt needs {name}, which timm {timm.__version__} does not have ({error}); install the timm '
                       f'version rmt supports (pyproject.toml)')


# If timm moves these, `import rmt` fails here with the name (features_only and forward_intermediates need them).
try:
    from timm.models._features import FeatureGetterNet, feature_take_indices
except ImportError as e:
    raise _missing('timm.models._features.FeatureGetterNet and feature_take_indices', e) from None
# The loader's homes. If timm renames the modules, `import rmt` fails here.
try:
    from timm.models import _factory, _helpers
except ImportError as e:
    raise _missing('timm.models._factory and timm.models._helpers', e) from None

# If torch renames it, frozen stages and norm_eval stop finding BatchNorm layers: `import rmt` fails here instead.
BatchNorm = nn.modules.batchnorm._BatchNorm

# timm's own load_checkpoint: what every model but ours gets, and what our loader falls back to.
TIMM_LOAD_CHECKPOINT: Optional[Callable[..., Any]] = getattr(_helpers, 'load_checkpoint', None)

_route: Optional[Tuple[Callable[[nn.Module], bool], Callable[..., Any]]] = None


def load_checkpoint(model: nn.Module, checkpoint_path: str, *args, **kwargs) -> Any:
    """timm's ``load_checkpoint``, with the models the route takes (:func:`route_load_checkpoint`) sent to ours."""
    if _route is not None and _route[0](model):
        return _route[1](model, checkpoint_path, *args, **kwargs)
    return TIMM_LOAD_CHECKPOINT(model, checkpoint_path, *args, **kwargs)


def _homes():
    """Where timm's callers look ``load_checkpoint`` up: the public ``timm.models``, the module that defines it,
    and the module ``create_model`` calls it from (for ``checkpoint_path=``)."""
    return {'timm.models': timm.models, 'timm.models._helpers': _helpers, 'timm.models._factory': _factory}


def route_load_checkpoint(takes: Callable[[nn.Module], bool], load: Callable[..., Any]) -> bool:
    """Make timm's ``load_checkpoint`` call ``load`` for the models ``takes(model)`` is true of.

    The function is replaced where timm's callers look it up (see :func:`_homes`); other models go to
    timm's function unchanged. If timm has moved it (a home without timm's ``load_checkpoint``, or
    ``create_model`` no longer calling a module-level ``load_checkpoint``), the homes that still have it
    are routed and a ``RuntimeWarning`` names the rest: there, RMT checkpoints still load (released
    names are mapped by the model's ``load_state_dict``), but the file is read by timm, whose errors
    do not name it. Returns whether every home was routed.
    """
    global _route
    if TIMM_LOAD_CHECKPOINT is None:
        warnings.warn(f'rmt: timm {timm.__version__} has no timm.models._helpers.load_checkpoint; RMT checkpoints '
                      f'load through timm\'s own functions, without rmt\'s file errors', RuntimeWarning, stacklevel=2)
        return False
    moved = [name for name, module in _homes().items()
             if getattr(module, 'load_checkpoint', None) not in (TIMM_LOAD_CHECKPOINT, load_checkpoint)]
    create_code = getattr(getattr(_factory, 'create_model', None), '__code__', None)
    if create_code is None or 'load_checkpoint' not in create_code.co_names:
        moved.append('timm.models.create_model (checkpoint_path=)')
    _route = (takes, load)
    for name, module in _homes().items():
        if name not in moved:
            module.load_checkpoint = load_checkpoint
    if moved:
        warnings.warn(f'rmt: timm {timm.__version__} moved load_checkpoint ({", ".join(moved)}); there RMT '
                      f'checkpoints are read by timm (loading works, errors do not name the file)',
                      RuntimeWarning, stacklevel=2)
    return not moved

"""Former home of the position tables, now :mod:`rmt.position`; these names are kept for one release.

``SpatialDecay`` is :class:`rmt.position.RelPos2d`, ``DecayTables`` is :class:`rmt.position.PositionTables`
(whose ``mask_h`` / ``mask_w`` / ``mask_2d`` are now ``bias_h`` / ``bias_w`` / ``bias_2d``).
"""
import warnings

from . import position

_RENAMED = {'SpatialDecay': 'RelPos2d', 'DecayTables': 'PositionTables', 'decay_rates': 'decay_rates',
            'rotary_angles': 'rotary_angles', 'rotary_tables': 'rotary_tables', 'theta_shift': 'theta_shift',
            'theta_shift_reference': 'theta_shift_reference'}


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(f'rmt.decay.{name} is now rmt.position.{_RENAMED[name]}', FutureWarning, stacklevel=2)
        return getattr(position, _RENAMED[name])
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

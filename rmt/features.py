"""The ``features_only`` model: timm's ``FeatureGetterNet`` with the controls a detection backbone is trained with.

``timm.create_model('rmt_*', features_only=True)`` returns :class:`RMTFeatures`. It computes what
timm's getter wrapper computes (the model's ``forward_intermediates`` for ``out_indices``, NCHW) and
adds, on the wrapper itself, what detection and segmentation training use: gradient checkpointing,
timm's ``group_matcher`` / ``no_weight_decay`` (so ``create_optimizer_v2(..., layer_decay=...)`` sees
the stages), freezing the stem and first stages (mmdet's ``frozen_stages`` / ``norm_eval``), and a
``load_state_dict`` that also takes keys without the wrapper's ``model.`` prefix (a plain model's, a
released classification or detection file's).
"""
from typing import Any, Dict, Set

import torch
from torch import nn

from .checkpoint import loading
from .timm_compat import FeatureGetterNet

__all__ = ['RMTFeatures']

_PREFIX = 'model.'


def _prefixed(pattern: Any) -> Any:
    """A ``group_matcher`` regex (or list of ``(regex, ordinal)``) of the model, for names under ``model.``."""
    if isinstance(pattern, str):
        return r'^model\.' + pattern.lstrip('^')
    return [(_prefixed(p), order) for p, order in pattern]


def _model_prefix_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args) -> None:
    """Keys without ``model.`` go to the wrapped model, whose own hook maps released and downstream names."""
    local = [k for k in state_dict if k.startswith(prefix)]
    if local and not any(k.startswith(prefix + _PREFIX) for k in local):
        for k in local:
            state_dict[prefix + _PREFIX + k[len(prefix):]] = state_dict.pop(k)


class RMTFeatures(FeatureGetterNet):
    """Stage outputs of an RMT (``forward_intermediates`` for ``out_indices``), NCHW, as timm's getter gives them.

    The wrapped model (``.model``) is pruned by timm to what the outputs use: later stages, the head,
    and the output norms of stages not taken are removed, so every parameter gets a gradient (DDP needs
    no ``find_unused_parameters``).
    """

    def __init__(self, model: nn.Module, out_indices: Any = 4, **kwargs):
        super().__init__(model, out_indices=out_indices, **kwargs)
        self.register_load_state_dict_pre_hook(_model_prefix_hook)

    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, also with keys without ``model.`` (see :meth:`rmt.RMT.load_state_dict`)."""
        with loading(strict=strict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the stem and each block in the backward pass (less memory at detection sizes)."""
        self.model.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The model's parameter groups (stem, then blocks by stage), for layer-wise lr decay."""
        return {name: _prefixed(pattern) for name, pattern in self.model.group_matcher(coarse).items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {_PREFIX + name for name in self.model.no_weight_decay()}

    @torch.jit.ignore
    def set_frozen_stages(self, frozen_stages: int = -1, norm_eval: bool = False) -> None:
        """Freeze the stem and the first ``frozen_stages`` stages (see :meth:`rmt.RMT.set_frozen_stages`)."""
        self.model.set_frozen_stages(frozen_stages, norm_eval)

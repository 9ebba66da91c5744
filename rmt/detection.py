"""RMT backbones in the detectors and segmenters people use: torchvision's, and mmdet / mmseg through mmpretrain.

* :func:`backbone_with_fpn` builds what torchvision's ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` and
  ``FCOS`` take as ``backbone``: a ``features_only`` RMT (with the per-stage output norms of the
  released detection backbones) under torchvision's ``FeaturePyramidNetwork``, loading any file
  ``timm.create_model`` loads (released classification, detection and segmentation checkpoints, ours).
* :func:`save_for_timm_backbone` rewrites a released mmdet / mmseg checkpoint so that mmdet 3 / mmseg 1
  configs running RMT through mmpretrain's ``TIMMBackbone`` load the whole detector with ``load_from=``:
  the backbone's keys become ``backbone.timm_model.model.*`` in this project's names, the neck and heads
  are kept as they are.
"""
import os
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

import timm

from .checkpoint import load_checkpoint_file, state_dict_from_checkpoint
from .atomic import atomic_torch_save

__all__ = ['RMTWithFPN', 'backbone_with_fpn', 'save_for_timm_backbone']


class RMTWithFPN(nn.Module):
    """A ``features_only`` RMT and torchvision's FPN: images (B, 3, H, W) -> ``OrderedDict`` of pyramid levels.

    The levels are named ``'0'``..``'3'`` for the stage outputs (strides 4 to 32 with all four stages) and
    ``'pool'`` for the extra level, as torchvision's ``BackboneWithFPN`` names them (what
    ``MultiScaleRoIAlign``'s defaults expect); each has ``out_channels`` channels.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[Any] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def backbone_with_fpn(
        name: str,
        pretrained_file: Optional[Union[str, os.PathLike]] = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        out_channels: int = 256,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        grad_checkpointing: bool = False,
        **kwargs,
) -> RMTWithFPN:
    """An RMT + FPN backbone for torchvision's detectors: ``MaskRCNN(backbone_with_fpn('rmt_s', 'RMT-S.pth'), 91)``.

    Args:
        name: an RMT model name (``rmt_t`` ... ``rmt_l``).
        pretrained_file: weights to load: a released classification checkpoint (the output norms start
            fresh), a released detection/segmentation checkpoint (its backbone), or one of ours.
        out_indices: the stages the FPN takes.
        out_channels: FPN width.
        extra_blocks: torchvision's extra FPN levels (default: ``LastLevelMaxPool``, the ``'pool'`` level
            Faster/Mask R-CNN use; RetinaNet's recipe uses ``LastLevelP6P7``).
        frozen_stages, norm_eval: freeze the stem and the first stages, keep BatchNorms in eval mode
            (mmdet's options; see :meth:`rmt.RMT.set_frozen_stages`).
        grad_checkpointing: recompute activations in the backward pass (less memory, more time).
        **kwargs: passed to ``timm.create_model`` (``feature_norm`` defaults to True, as in the released
            detection backbones; ``drop_path_rate``, custom sizes, ...).
    """
    kwargs.setdefault('feature_norm', True)
    if pretrained_file is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.fspath(pretrained_file)))
    body = timm.create_model(name, features_only=True, out_indices=tuple(out_indices), **kwargs)
    body.set_frozen_stages(frozen_stages, norm_eval)
    body.set_grad_checkpointing(grad_checkpointing)
    return RMTWithFPN(body, out_channels, extra_blocks)


def save_for_timm_backbone(
        checkpoint_path: Union[str, os.PathLike],
        output_path: Union[str, os.PathLike],
        model_name: str,
        prefix: str = 'backbone.timm_model.',
        **model_kwargs,
) -> nn.Module:
    """Write a detection/segmentation checkpoint for mmdet 3 / mmseg 1 configs whose backbone is mmpretrain's
    ``TIMMBackbone(model_name, features_only=True, feature_norm=True, ...)``.

    The backbone is loaded (checked and mapped) into that timm model, and written under ``prefix`` in the
    names ``TIMMBackbone`` gives it (``backbone.timm_model.model.stages.0...``); every other tensor
    (neck, heads) is kept under its own name. ``model_kwargs`` must match the config's backbone
    (``out_indices``, custom sizes). Returns the loaded backbone.
    """
    model_kwargs.setdefault('feature_norm', True)
    backbone = timm.create_model(model_name, features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=os.fspath(checkpoint_path)), **model_kwargs)
    state_dict = state_dict_from_checkpoint(load_checkpoint_file(checkpoint_path))
    out = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    out.update({prefix + k: v for k, v in backbone.state_dict().items()})
    atomic_torch_save({'state_dict': out, 'meta': {'converted_from': os.path.basename(os.fspath(checkpoint_path)),
                                                   'model': model_name}}, output_path)
    return backbone

"""RMT (Retentive Networks Meet Vision Transformers) backbones for timm.

Importing the package registers ``rmt_t``, ``rmt_s``, ``rmt_b`` and ``rmt_l`` with timm.

The model is ``decay -> attention -> blocks -> model`` (each module imports only those before it,
and ``mixtoken``); ``features`` is its ``features_only`` form; ``checkpoint`` reads, maps and writes
checkpoint files; ``detection`` puts the backbone into torchvision's detectors and mmdet / mmseg;
``export`` and ``flops`` serve deployment; ``token_labeling`` holds token-labeling training (labels,
targets, loss).
The command-line scripts in ``scripts/`` are thin: what they share lives in ``cli`` (arguments,
config files, model building), ``data`` (datasets and loaders) and ``evaluate``.
"""
from .attention import ATTN_IMPLS, MaSA, set_attn_budget
from .checkpoint import checkpoint_filter_fn, load_checkpoint_file, official_config_to_kwargs
from .decay import SpatialDecay
from .features import RMTFeatures
from .model import RMT
from . import detection  # so that `import rmt` gives rmt.detection.backbone_with_fpn

__all__ = ['ATTN_IMPLS', 'MaSA', 'RMT', 'RMTFeatures', 'SpatialDecay', 'checkpoint_filter_fn', 'load_checkpoint_file',
           'official_config_to_kwargs', 'set_attn_budget']
__version__ = '0.1.0'

"""RMT (Retentive Networks Meet Vision Transformers) backbones for timm.

Importing the package registers ``rmt_t``, ``rmt_s``, ``rmt_b`` and ``rmt_l`` with timm.

The model is ``position -> attention -> blocks -> model`` (each module imports only those before it,
and ``mixtoken``); ``attention`` is also MaSA on its own (``masa``, ``MaSA1d`` / ``MaSA2d`` / ``MaSA3d``); ``features`` is its ``features_only`` form; ``checkpoint`` reads checkpoint
files and maps their weights, from every source timm resolves (files, URLs, ``local-dir:``, ``hf-hub:``);
``hub`` publishes them as a folder in timm's Hugging Face Hub layout; ``timm_compat`` holds every private
timm and torch name the package uses (and routes timm's ``load_checkpoint`` for RMT models);
``detection`` puts the backbone into torchvision's detectors and mmdet /
mmseg; ``export`` and ``flops`` serve deployment; ``token_labeling`` holds token-labeling training
(labels, targets, loss); ``data`` holds datasets (class lists, an image folder that names the files it
skips) and ``atomic`` writes files whole. The command-line layer (one-line errors, checked arguments,
config files, the evaluation loop, the training checkpoint saver) is the subpackage ``tools``, which
the scripts in ``scripts/`` and ``python -m rmt`` are built on; nothing else in ``rmt`` imports it.
Every submodule is reachable from ``import rmt`` alone (``rmt.export.export_program(...)``): the ones
not imported here load on first use.
"""
import importlib

from .attention import ATTN_IMPLS, MaSA, MaSA1d, MaSA2d, MaSA3d, masa, plan_attention, set_dispatch_thresholds
from .checkpoint import checkpoint_filter_fn, load_checkpoint_file, official_config_to_kwargs
from .position import RelPos
from .features import RMTFeatures
from .model import RMT
from . import detection  # so that `import rmt` gives rmt.detection.backbone_with_fpn

__all__ = ['ATTN_IMPLS', 'MaSA', 'MaSA1d', 'MaSA2d', 'MaSA3d', 'RMT', 'RMTFeatures', 'RelPos', 'masa',
           'checkpoint_filter_fn', 'load_checkpoint_file', 'official_config_to_kwargs', 'plan_attention',
           'set_dispatch_thresholds']
__version__ = '0.1.0'

_LAZY = ('atomic', 'data', 'export', 'flops', 'hub', 'mixtoken', 'token_labeling', 'tools')


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

"""RMT (Retentive Networks Meet Vision Transformers) backbones for timm.

Importing the package registers ``rmt_t``, ``rmt_s``, ``rmt_b`` and ``rmt_l`` with timm.
"""
from .attention import ATTN_IMPLS, MaSA, set_attn_budget
from .decay import SpatialDecay
from .model import RMT, checkpoint_filter_fn, load_checkpoint_file, official_config_to_kwargs

__all__ = ['ATTN_IMPLS', 'MaSA', 'RMT', 'SpatialDecay', 'checkpoint_filter_fn', 'load_checkpoint_file',
           'official_config_to_kwargs', 'set_attn_budget']
__version__ = '0.1.0'

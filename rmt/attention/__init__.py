"""MaSA, Manhattan self-attention (RMT, paper section 3.2), as a function, as layers, and the paths that compute it.

* :func:`masa`: decayed attention over a 1-, 2- or 3-D grid of tokens, full or decomposed, with prefix
  tokens, key padding and per-head, per-sample or per-token (data-dependent) decay;
  :func:`masa_reference` is its naive definition, what every path is tested against.
* :class:`MaSA1d`, :class:`MaSA2d`, :class:`MaSA3d`: the layer (projections, theta shift, attention,
  LCE), standalone; the RMT models use :class:`MaSA2d`.
* :mod:`.backends`: which path computes a call (``triton``, ``bmm``, ``sdpa``, ``blocked``,
  ``reference``), one ordered table; :mod:`.paths` the torch paths, :mod:`.triton_op` the Triton
  op with its guard and fallbacks, :mod:`.kernels` the kernels, :mod:`.verify` their check against the
  exact path on first use (:func:`set_kernel_verification`, :func:`kernel_report`) and the self-test.
"""
from .backends import (
    ATTN_IMPLS, BACKENDS, AttentionPlan, DispatchThresholds, Problem, dispatch_thresholds, plan_attention,
    set_dispatch_thresholds)
from .functional import masa, masa_attention
from .layers import MaSA, MaSA1d, MaSA2d, MaSA3d, plan_masa
from .reference import masa_reference
from .triton_op import clear_kernel_failures, kernel_failures
from .verify import kernel_report, kernel_verification, set_kernel_verification

__all__ = ['ATTN_IMPLS', 'BACKENDS', 'AttentionPlan', 'DispatchThresholds', 'Problem', 'MaSA', 'MaSA1d', 'MaSA2d',
           'MaSA3d', 'masa', 'masa_attention', 'masa_reference', 'plan_attention', 'plan_masa',
           'set_dispatch_thresholds', 'dispatch_thresholds', 'kernel_failures', 'clear_kernel_failures',
           'kernel_report', 'kernel_verification', 'set_kernel_verification']

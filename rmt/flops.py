"""Parameter and FLOP counts with fvcore, attention included whatever kernel computes it.

fvcore's :class:`~fvcore.nn.FlopCountAnalysis` traces the model with ``torch.jit.trace`` and counts
one multiply-add as one flop for the ops it has handles for (convs, linears, matmuls, einsums, norms).
The released RMT code computed attention with explicit matmuls, which fvcore counts; this model
computes it with fused ``scaled_dot_product_attention`` by default, which fvcore does not know and
would silently skip. :func:`sdpa_flop_jit` counts a fused attention call exactly as fvcore counts
the two matmuls it replaces (``q @ k^T`` and ``attn @ v``), so the totals are the same whichever
attention path the model takes. Elementwise ops (softmax, masks, rotary shift, activations) are not
counted, as in fvcore's figures for the released code.

Example::

    import timm, rmt
    from rmt.flops import count_flops
    params, flops, table = count_flops(timm.create_model('rmt_t'), (3, 224, 224))
"""
import warnings
from math import prod
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple, Union

import torch
from torch import nn

from timm.layers import get_device_dtype

__all__ = ['SDPA_OPS', 'sdpa_flop_jit', 'flop_analysis', 'count_flops', 'flops_by_operator', 'FlopCount']

# The fused attention ops a trace may record; q, k, v are the first three inputs of each.
SDPA_OPS = (
    'aten::scaled_dot_product_attention',
    'aten::_scaled_dot_product_attention_math',
    'aten::_scaled_dot_product_flash_attention',
    'aten::_scaled_dot_product_flash_attention_for_cpu',
    'aten::_scaled_dot_product_efficient_attention',
    'aten::_scaled_dot_product_cudnn_attention',
)


def _shape(value: Any) -> List[int]:
    if not value.isCompleteTensor():
        raise ValueError(f'fused attention input without a known shape in the trace: {value}')
    return list(value.type().sizes())


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for fused attention: flops of ``q @ k^T`` plus ``attn @ v``.

    q is (..., L, E), k (..., S, E), v (..., S, Ev), with the leading dims broadcast as the matmuls
    would. fvcore counts a matmul ``(..., n, k) @ (..., k, m)`` as ``prod(first operand) * m``, so the
    two matmuls are ``prod(q) * S`` and ``prod(batch) * L * S * Ev``.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    L, S, Ev = q[-2], k[-2], v[-1]
    batch = torch.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2]), tuple(v[:-2]))
    scores = prod(batch) * L * q[-1] * S   # q @ k^T
    weighted = prod(batch) * L * S * Ev    # softmax(...) @ v
    return scores + weighted


def _example_input(model: nn.Module, input_size: Sequence[int], batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, *input_size, **get_device_dtype(model))


def flop_analysis(model: nn.Module, inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]]):
    """A fvcore ``FlopCountAnalysis`` of ``model`` on ``inputs`` with the fused-attention handles set.

    Warnings about uncounted elementwise ops and unused modules are turned off.
    """
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**{op: sdpa_flop_jit for op in SDPA_OPS})
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


class FlopCount(NamedTuple):
    params: int
    """Number of parameters (buffers excluded)."""
    flops: int
    """Multiply-adds of one forward pass, counted as fvcore counts them."""
    table: str
    """fvcore's per-module table (params and flops)."""


def _traced(model: nn.Module, input_size: Sequence[int], batch_size: int, read):
    """``read(analysis)`` for a trace of ``model`` in eval mode, its mode restored afterwards."""
    if len(input_size) != 3:
        raise ValueError(f'input_size must be (C, H, W), got {tuple(input_size)}')
    x = _example_input(model, input_size, batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about shape-dependent Python values
            return read(flop_analysis(model, (x,)))
    finally:
        model.train(was_training)


def count_flops(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 1,
        max_depth: int = 2,
) -> FlopCount:
    """Parameters and fvcore FLOPs of ``model`` on a (batch_size, *input_size) input.

    The model is traced in eval mode with whatever attention path it is set to; fused attention is
    counted as the equivalent matmuls, so ``set_attn_impl('reference')`` and the default fused path
    give the same total. ``input_size`` is (C, H, W).
    """
    from fvcore.nn import flop_count_table

    def read(analysis):
        return int(analysis.total()), flop_count_table(analysis, max_depth=max_depth)

    flops, table = _traced(model, input_size, batch_size, read)
    params = sum(p.numel() for p in model.parameters())
    return FlopCount(params, flops, table)


def flops_by_operator(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, int]:
    """FLOPs per fvcore operator kind ('conv', 'linear', 'matmul', 'scaled_dot_product_attention', ...)."""
    return _traced(model, input_size, 1, lambda analysis: dict(analysis.by_operator()))

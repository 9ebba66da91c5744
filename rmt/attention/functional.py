"""MaSA as a function: decayed attention over a 1-, 2- or 3-D grid of tokens, and the layers' pipeline.

:func:`masa` is the attention of the paper (section 3.2) on its own: ``softmax(q k^T * scale + bias) v``
with ``bias = decay * distance`` between token positions, full or decomposed along the axes, with
prefix tokens, key padding and data-dependent decay. :func:`masa_attention` is what a MaSA layer
runs on its raw projections (theta shift, attention, LCE add), shared by the standalone layers and
the RMT models. Both plan their path with :func:`rmt.attention.backends.plan_attention`, and
:func:`compute` is the one place a plan's path is turned into a call.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .backends import AttentionPlan, Problem, autocast_dtype, dispatch_thresholds, plan_attention
from .paths import blocked_attention, decomposed_attention, full_attention, movedim
from .triton_op import masa_triton
from ..position import PositionTables, pair_order, pairs_split, theta_shift

__all__ = ['masa', 'masa_attention', 'compute', 'problem_of']


def problem_of(x: torch.Tensor, grid: List[int], num_heads: int, head_dim: int, decomposed: bool,
               num_prefix: int = 0, masked: bool = False, decay: Optional[torch.Tensor] = None) -> Problem:
    """The :class:`Problem` of a MaSA call on ``x`` (any tensor in the call's device and dtype)."""
    dtype = x.dtype
    if not torch.jit.is_scripting() and x.is_floating_point():
        dtype = autocast_dtype(x) or dtype  # under autocast q, k and v are half precision even when x is not
    per_token = decay is not None and decay.dim() > 1
    decay_grad = False
    if decay is not None and not torch.jit.is_scripting():
        decay_grad = bool(decay.requires_grad and torch.is_grad_enabled())
    return Problem(dtype, grid, num_heads, head_dim, decomposed, num_prefix, masked, per_token, decay_grad,
                   x.shape[0])


def compute(plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
            axis_biases: List[torch.Tensor], bias: torch.Tensor, scale: float, decomposed: bool,
            prefix: Optional[List[torch.Tensor]] = None,
            mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decayed attention of heads-first (B, n, *grid, d) q, k, v on ``plan``'s torch path; returns the grid
    output (B, n, *grid, d) and the prefix output (B, n, P, d) (empty without prefix tokens).

    ``decay``: (n,) or (B, n, L) log decay; ``axis_biases`` / ``bias``: its precomputed per-axis and full
    tables (empty to build them here); ``prefix``: [q, k, v] of the prefix tokens; ``mask``: (B, P + L)
    bool, True where a key takes part. (The ``triton`` path runs on channels-last projections: see
    :func:`masa_attention`.)
    """
    grid = list(q.shape[2:-1])
    if plan.impl == 'blocked':
        grid_mask = None if mask is None else mask.reshape([q.shape[0]] + grid)
        return blocked_attention(q, k, v, decay, grid_mask, scale, dispatch_thresholds().block_bytes), q.new_empty(0)
    if decomposed:
        return decomposed_attention(q, k, v, decay, axis_biases, scale, plan.impl, prefix, mask)
    if len(grid) == 1 and len(axis_biases) > 0:
        bias = axis_biases[0]
    return full_attention(q, k, v, decay, bias, scale, plan.impl, prefix, mask)


def _heads_first(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, *grid, C) -> (B, n, *grid, d), a view."""
    return movedim(x.unflatten(-1, (num_heads, x.shape[-1] // num_heads)), -2, 1)


def masa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: Optional[torch.Tensor],
                   tables: PositionTables, plan: AttentionPlan, num_heads: int, decomposed: bool,
                   rotate: bool = True, decay: Optional[torch.Tensor] = None,
                   prefix: Optional[List[torch.Tensor]] = None, mask: Optional[torch.Tensor] = None,
                   kernel_config: Optional[List[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A MaSA layer's attention from its raw projections: ``lce + attention(theta(q), theta(k), v)``.

    q, k, v, lce: channels-last (B, *grid, C), q and k before the theta shift (``rotate``: apply it from
    ``tables``); ``lce`` is updated in place on the torch paths (pass a tensor this call may own), or
    None. ``decay``: a per-token (B, n, L) log decay instead of the tables' per-head one. ``prefix``:
    [q, k, v] of prefix tokens (B, P, C); ``mask``: (B, P + L) bool, True where a key takes part.
    Returns the grid output (B, *grid, C) and the prefix output (B, P, C) (empty without prefix).
    ``kernel_config``: a :class:`rmt.attention.kernels.KernelConfig` for the Triton path.
    """
    if plan.impl == 'triton':
        return _masa_triton(q, k, v, lce, tables, num_heads, decomposed, rotate, kernel_config), q.new_empty(0)
    C = q.shape[-1]
    # the batch as -1: exported graphs may hold a batch the trace saw as 1 where the input's is symbolic
    shape = [-1] + list(q.shape[1:-1]) + [num_heads, C // num_heads]
    flat = [-1] + list(q.shape[1:-1]) + [C]
    scale = (C // num_heads) ** -0.5
    q, k, v = q.view(shape), k.view(shape), v.view(shape)
    split = rotate and pairs_split(q, tables)
    if rotate:
        q, k = theta_shift(q, tables), theta_shift(k, tables)
    heads: Optional[List[torch.Tensor]] = None
    if prefix is not None:
        heads = [_heads_first(t, num_heads) for t in prefix]
        if split:  # the prefix's q and k in the channel order the grid's now have
            heads = [pair_order(heads[0]), pair_order(heads[1]), heads[2]]
    if decay is None:
        decay, axis_biases, bias = tables.decay, tables.axis_bias, tables.bias
    else:
        axis_biases, bias = [], tables.bias.new_empty(0)
    out, out_prefix = compute(plan, movedim(q, -2, 1), movedim(k, -2, 1), movedim(v, -2, 1), decay, axis_biases, bias,
                              scale, decomposed, heads, mask)
    out = movedim(out, 1, -2)
    if out_prefix.numel() > 0:
        out_prefix = movedim(out_prefix, 1, -2).flatten(-2)
    if lce is None:
        return out.reshape(flat), out_prefix
    if not torch.jit.is_scripting() and _graph_capture():
        return (lce.view(shape) + out).reshape(flat), out_prefix  # an in-place add would replay views at traced sizes
    # in place: the sum keeps the conv output's layout and reads ``out`` in whatever layout the attention
    # kernel left it, with no copy
    return lce.view(shape).add_(out).view(flat), out_prefix


@torch.jit.unused
def _graph_capture() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@torch.jit.unused
def _masa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: Optional[torch.Tensor],
                 tables: PositionTables, num_heads: int, decomposed: bool, rotate: bool,
                 kernel_config: Optional[List[int]]) -> torch.Tensor:
    from .backends import _ieee
    rotation = tables.rotation if rotate else None
    return masa_triton(q, k, v, lce, rotation, tables.decay, num_heads, decomposed, kernel_config, _ieee(q.dtype))


# --- the function -------------------------------------------------------------------------------------

def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                  grid: Optional[Sequence[int]], num_prefix_tokens: int) -> List[int]:
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f'masa: q, k and v must have one shape, got {list(q.shape)}, {list(k.shape)}, '
                         f'{list(v.shape)}')
    if grid is None:
        if not 4 <= q.dim() <= 6:
            raise ValueError(f'masa: expected q of shape (B, heads, *grid, d) with 1 to 3 grid axes, or (B, heads, '
                             f'N, d) with grid=, got {list(q.shape)}')
        if num_prefix_tokens:
            raise ValueError('masa: prefix tokens need the (B, heads, N, d) layout and grid=')
        grid = list(q.shape[2:-1])
    else:
        grid = [int(s) for s in grid]
        tokens = 1
        for s in grid:
            tokens *= s
        if not 1 <= len(grid) <= 3 or min(grid) < 1:
            raise ValueError(f'masa: grid must have 1 to 3 positive sizes, got {tuple(grid)}')
        if q.dim() != 4 or q.shape[2] != num_prefix_tokens + tokens:
            raise ValueError(f'masa: expected q of shape (B, heads, {num_prefix_tokens} + {tokens}, d) for '
                             f'{num_prefix_tokens} prefix tokens and grid {tuple(grid)}, got {list(q.shape)}')
    if num_prefix_tokens < 0:
        raise ValueError(f'masa: num_prefix_tokens must be >= 0, got {num_prefix_tokens}')
    B, n = q.shape[0], q.shape[1]
    tokens = 1
    for s in grid:
        tokens *= s
    if decay.dim() not in (1, 2, 3) or decay.shape[-1 if decay.dim() == 1 else 1] != n or \
            (decay.dim() > 1 and decay.shape[0] not in (1, B)) or (decay.dim() == 3 and decay.shape[2] != tokens):
        raise ValueError(f'masa: decay must be (heads,) = ({n},), per sample (B, heads) = ({B}, {n}) or per grid token '
                         f'(B, heads, L) = ({B}, {n}, {tokens}), got {list(decay.shape)}')
    if not decay.is_floating_point():
        raise ValueError(f'masa: decay must be a floating-point log decay, got {decay.dtype}')
    return grid


def masa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
         grid: Optional[Sequence[int]] = None, *, decomposed: bool = False, attn_mask: Optional[torch.Tensor] = None,
         num_prefix_tokens: int = 0, scale: Optional[float] = None, impl: str = 'auto') -> torch.Tensor:
    """Manhattan self-attention (RMT, paper section 3.2): ``softmax(q k^T * scale + decay * distance) v``.

    Tokens sit on a grid of 1, 2 or 3 axes (a sequence, an image (H, W), a volume or clip (D, H, W)); the
    distance between two is ``sum_a |t_a - t'_a|`` (the Manhattan distance). No theta shift is applied
    (rotate q and k beforehand, or use the layers, :class:`rmt.attention.MaSA2d` and friends).

    Args:
        q, k, v: (B, heads, *grid, d) (1 to 3 grid axes, ``grid`` left None), or (B, heads, N, d) tokens with
            ``grid`` given: N = num_prefix_tokens + prod(grid), the prefix tokens first, then the grid in
            raster order (last axis fastest).
        decay: the log decay ``ln(gamma)``, normally negative (attention weights shrink by ``gamma`` per
            token of distance; RMT's are :func:`rmt.position.decay_rates`): per head (heads,), per sample
            (B, heads), or per grid token (B, heads, L), L = prod(grid), where query t's rate scales its
            distances (data-dependent decay). Differentiable on every path that accepts it.
        grid: the grid's sizes, for the token layout.
        decomposed: attend along each grid axis in turn, last axis first, each pass's output the next
            one's values (the paper's decomposed MaSA; never forms an (L x L) tensor), instead of once
            over all tokens. With one axis both are the same.
        attn_mask: (B, N) bool key padding: True where a token takes part. Queries of padded tokens get 0.
        num_prefix_tokens: tokens without position (class, register tokens): they attend to and are
            attended by every token with zero decay (in decomposed form they join every axis pass as keys
            and attend once over all tokens).
        scale: logit scale, ``d ** -0.5`` by default.
        impl: ``'auto'`` or a path of :data:`rmt.attention.ATTN_IMPLS`.

    Returns:
        The attention output in q's layout and dtype.

    Raises:
        ValueError: misshapen inputs, an unknown path, or a forced path that cannot honour an input (the
        Triton kernels take no prefix tokens, masks, per-token decay or decay gradients).
    """
    tokens_layout = grid is not None
    grid = _check_inputs(q, k, v, decay, grid, num_prefix_tokens)
    B, n, d = q.shape[0], q.shape[1], q.shape[-1]
    P = num_prefix_tokens
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or list(attn_mask.shape) != [B, P + _count(grid)]:
            raise ValueError(f'masa: attn_mask must be a (B, N) = ({B}, {P + _count(grid)}) bool key padding mask '
                             f'(True: the token takes part), got {list(attn_mask.shape)} {attn_mask.dtype}')
    if decay.dim() == 2:
        decay = decay[:, :, None].expand(B, n, _count(grid))
    elif decay.dim() == 3 and decay.shape[0] != B:
        decay = decay.expand(B, n, _count(grid))
    if tokens_layout:
        qg, kg, vg = [t[:, :, P:].unflatten(2, grid) for t in (q, k, v)]
        prefix = [q[:, :, :P], k[:, :, :P], v[:, :, :P]] if P > 0 else None
    else:
        qg, kg, vg, prefix = q, k, v, None
    problem = problem_of(q, grid, n, d, decomposed, P, attn_mask is not None, decay)
    plan = plan_attention(impl, problem, q.device)
    default_scale = d ** -0.5
    scale = default_scale if scale is None else float(scale)
    if plan.impl == 'triton':
        qc = movedim(qg, 1, -2).flatten(-2) * (scale / default_scale)
        kc, vc = [movedim(t, 1, -2).flatten(-2) for t in (kg, vg)]
        out = _heads_first(masa_triton(qc, kc.contiguous(), vc.contiguous(), None, None, decay, n, decomposed), n)
        out_prefix = q.new_empty(0)
    else:
        out, out_prefix = compute(plan, qg, kg, vg, decay, [], q.new_empty(0), scale, decomposed, prefix, attn_mask)
    if attn_mask is not None:
        out = out.masked_fill(~attn_mask[:, P:].reshape([B, 1] + grid + [1]), 0)
        if prefix is not None:
            out_prefix = out_prefix.masked_fill(~attn_mask[:, None, :P, None], 0)
    if not tokens_layout:
        return out.contiguous()
    out = out.flatten(2, -2)
    return torch.cat([out_prefix, out], dim=2) if prefix is not None else out.contiguous()


def _count(grid: List[int]) -> int:
    count = 1
    for s in grid:
        count *= s
    return count

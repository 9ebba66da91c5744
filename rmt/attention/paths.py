"""MaSA's torch paths: decayed attention over a grid of tokens with standard PyTorch operators.

Every path computes ``softmax(q k^T * scale + bias) v`` where the bias is the decay
(:mod:`rmt.position`), plus ``-inf``-like entries for padded keys. Inputs are heads-first views
``(B, n, *grid, d)`` of any strides (the models pass views of their channels-last projections, so
nothing is copied that the operator does not need), prefix tokens ``(B, n, P, d)`` beside them.

* full: one pass over all tokens; prefix tokens are ordinary tokens with zero decay to everything.
* decomposed: one pass per grid axis, last axis first (for an image: along each row, then along each
  column of the row result; for a volume then along depth), never forming an (L x L) tensor. Prefix
  tokens join every axis sequence as keys with zero decay, carrying their own values, and attend
  over all tokens in one full pass.

How each (query, key) block is attended is the *path*: ``reference`` (explicit matmul and softmax:
the released code's math), ``bmm`` (heads packed into one batch, two ``bmm`` and a softmax: short
sequences on the CPU), ``sdpa`` (PyTorch's fused attention, the bias as a 4-D additive mask) and, for
full attention only, ``blocked`` (query blocks of grid rows, each with its own slice of the bias,
as the ``rmt::blocked_attention`` op, so memory stays bounded and compiled graphs do not depend on
the number of blocks). Which path runs is decided in :mod:`rmt.attention.backends`.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..position import axis_bias, decay_bias, manhattan_bias

__all__ = ['attend', 'attention_reference', 'movedim', 'sequences', 'from_sequences', 'full_attention', 'decomposed_attention',
           'blocked_attention', 'masked_value', 'rows_per_block']


def masked_value(dtype: torch.dtype) -> float:
    """The bias of a padded key: far below any logit, yet finite, so a query whose keys are all padded
    gets a finite (meaningless) result rather than NaN."""
    return -3.0e4 if dtype == torch.float16 else -1.0e30  # (torch.finfo is not scriptable)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` spelled out; q (N, n, L, d), k and v (N, n, S, d), bias
    broadcastable to (N, n, L, S)."""
    attn = q @ (k * scale).transpose(-2, -1) + bias.to(q.dtype)
    return attn.softmax(dim=-1) @ v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    # biases are 4-D (rmt.position): the fused CPU kernel takes no 3-D mask, and a 4-D view made here of a 3-D
    # table would be a symbolic-size view that Inductor cannot order the strides of in dynamic-shape graphs
    bias = bias.to(q.dtype)
    if not torch.jit.is_scripting() and _exporting():
        # spelled out: sdpa's check of a broadcast mask would make torch.export take a batch traced as 1 for 1
        bias = bias.expand(q.shape[0], bias.shape[1], bias.shape[2], bias.shape[3])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim. PyTorch's CPU kernel vectorizes along that dim and computes rows
    shorter than one SIMD vector (16 floats with AVX-512) with a scalar ``exp`` per element; for
    those (the 7- and 14-token rows and columns) whole-tensor ops are several times faster."""
    if scores.shape[-1] >= 16:
        return scores.softmax(dim=-1)
    shifted = scores - scores.detach().amax(dim=-1, keepdim=True)
    if torch.is_grad_enabled() and scores.requires_grad:
        exp = shifted.exp()
        return exp / exp.sum(dim=-1, keepdim=True)
    exp = shifted.exp_()
    return exp.div_(exp.sum(dim=-1, keepdim=True))


def _bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference math with every (sequence, head) pair packed into one contiguous bmm batch."""
    N, n, L, d = q.shape
    S = k.shape[2]
    scores = torch.bmm(q.reshape(N * n, L, d), k.reshape(N * n, S, d).transpose(1, 2))
    # in place on the bmm output, which its backward does not need
    probs = _softmax(scores.view(N, n, L, S).mul_(scale).add_(bias.to(q.dtype)))
    return torch.bmm(probs.view(N * n, L, S), v.reshape(N * n, S, v.shape[-1])).view(N, n, L, v.shape[-1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
           impl: str) -> torch.Tensor:
    """One attention call on the ``reference``, ``bmm`` or ``sdpa`` path; shapes as :func:`attention_reference`."""
    if impl == 'reference':
        return attention_reference(q, k, v, bias, scale)
    if impl == 'bmm':
        return _bmm(q, k, v, bias, scale)
    return _sdpa(q, k, v, bias, scale)


# --- layouts -------------------------------------------------------------------------------------------

def movedim(x: torch.Tensor, source: int, destination: int) -> torch.Tensor:
    """``x.movedim`` with the dims made non-negative: the classic (tracing) ONNX exporter writes a wrong
    Transpose for negative ones."""
    return x.movedim(source % x.dim(), destination % x.dim())


def sequences(x: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, n, *grid, d) -> (B * other positions, n, s, d): every sequence of tokens along grid ``axis``.

    A view where the strides allow (an image's rows), else a copy (its columns, unless B == 1). In
    exported graphs always a contiguous copy first: an example batch of 1 would otherwise let the trace
    record a view whose leading size is the batch's other factor alone.
    """
    x = movedim(movedim(x, 2 + axis, -2), 1, -3)
    if not torch.jit.is_scripting() and _exporting():
        x = x.contiguous()
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1])


@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting()


def from_sequences(y: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """The inverse of :func:`sequences`: (S, n, s, d) back to ``like``'s (B, n, *grid, d) order, a view."""
    grid = list(like.shape[2:-1])
    other = grid[:axis] + grid[axis + 1:]
    y = y.reshape([-1] + other + [y.shape[1], y.shape[2], y.shape[3]])
    return movedim(movedim(y, -3, 1), -2, 2 + axis)


def _repeat_per_sequence(x: torch.Tensor, count: int) -> torch.Tensor:
    """Each batch entry of ``x`` repeated for the ``count`` sequences of its image, in :func:`sequences` order."""
    return x.repeat_interleave(count, dim=0) if count > 1 else x


def _key_padding(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(S, keys) bool, True where a key takes part -> the additive (S, 1, 1, keys) bias."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.full((), masked_value(dtype), dtype=dtype, device=mask.device))[:, None, None]


def _grid_mask_sequences(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, *grid) -> (S, s) in :func:`sequences` order."""
    mask = movedim(mask, 1 + axis, -1)
    return mask.reshape(-1, mask.shape[-1])


# --- full and decomposed attention ---------------------------------------------------------------------

def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, bias: torch.Tensor,
                   scale: float, impl: str, prefix: Optional[List[torch.Tensor]] = None,
                   mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over all tokens; returns (grid output (B, n, *grid, d), prefix output (B, n, P, d) or empty).

    ``decay`` (n,) or (B, n, L) log decay; ``bias`` its precomputed (n, L, L) table or empty (then built
    here from ``decay``). ``prefix``: [q, k, v] of the prefix tokens (B, n, P, d). ``mask``: (B, P + L)
    bool, True where a key takes part.
    """
    B, n, d = q.shape[0], q.shape[1], q.shape[-1]
    grid = list(q.shape[2:-1])
    if impl == 'blocked':
        out = blocked_attention(q, k, v, decay, None if mask is None else mask.reshape(q.shape[:1] + q.shape[2:-1]),
                                scale)
        return out, q.new_empty(0)
    if bias.numel() == 0:
        bias = decay_bias(decay, grid, dtype=q.dtype)
    qf, kf, vf = q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2)
    P = 0
    if prefix is not None:
        P = prefix[0].shape[2]
        qf = torch.cat([prefix[0], qf], dim=2)
        kf = torch.cat([prefix[1], kf], dim=2)
        vf = torch.cat([prefix[2], vf], dim=2)
        bias = F.pad(bias, (P, 0, P, 0))
    if mask is not None:
        bias = bias + _key_padding(mask, bias.dtype)
    out = attend(qf, kf, vf, bias, scale, impl)
    return out[:, :, P:].unflatten(2, grid), out[:, :, :P]


def decomposed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                         axis_biases: List[torch.Tensor], scale: float, impl: str,
                         prefix: Optional[List[torch.Tensor]] = None,
                         mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One attention pass per grid axis, last axis first, each pass's output the next one's values.

    Arguments and result as :func:`full_attention`; ``axis_biases`` the per-axis (n, s, s) tables in
    grid order, or an empty list (then built from ``decay``). The grid output is a view of the last
    pass's output, in whatever layout its kernel wrote.
    """
    B = q.shape[0]
    grid = list(q.shape[2:-1])
    count = 1
    for s in grid:
        count *= s
    P = 0 if prefix is None else prefix[0].shape[2]
    out = v
    for axis in range(len(grid) - 1, -1, -1):
        bias = axis_biases[axis] if len(axis_biases) > 0 else decay_bias(decay, grid, axis=axis, dtype=q.dtype)
        qs, ks, vs = sequences(q, axis), sequences(k, axis), sequences(out, axis)
        per_image = count // grid[axis]
        if prefix is not None:
            ks = torch.cat([_repeat_per_sequence(prefix[1], per_image), ks], dim=2)
            vs = torch.cat([_repeat_per_sequence(prefix[2], per_image), vs], dim=2)
            bias = F.pad(bias, (P, 0))
        if mask is not None:
            keys = _grid_mask_sequences(mask[:, P:].reshape([B] + grid), axis)
            if prefix is not None:
                keys = torch.cat([_repeat_per_sequence(mask[:, :P], per_image), keys], dim=1)
            bias = bias + _key_padding(keys, bias.dtype)
        out = from_sequences(attend(qs, ks, vs, bias, scale, impl), q, axis)
    if prefix is None:
        return out, q.new_empty(0)
    k_all = torch.cat([prefix[1], k.flatten(2, -2)], dim=2)
    v_all = torch.cat([prefix[2], v.flatten(2, -2)], dim=2)
    bias = q.new_zeros(1, 1, 1, 1)
    if mask is not None:
        bias = bias + _key_padding(mask, q.dtype)
    return out, attend(prefix[0], k_all, v_all, bias, scale, 'reference' if impl == 'reference' else 'sdpa')


# --- blocked full attention ------------------------------------------------------------------------------

def rows_per_block(block_bytes: int, n: int, grid: List[int], element_size: int) -> int:
    """First-axis rows of queries whose bias slice (n, rows * inner, L) fits ``block_bytes``."""
    L = 1
    for s in grid:
        L *= s
    inner = L // grid[0]
    return min(grid[0], max(1, block_bytes // max(1, n * inner * L * element_size)))


def _block_bias(decay: torch.Tensor, grid: List[int], rows: Tuple[int, int], dtype: torch.dtype,
                buffer: Optional[torch.Tensor]) -> torch.Tensor:
    if decay.dim() == 1:
        axes = [axis_bias(decay, s, decay.device, dtype) for s in grid]
        return manhattan_bias(axes, rows, buffer)
    return decay_bias(decay, grid, rows=rows, dtype=dtype)


def _block_distance(grid: List[int], rows: Tuple[int, int], device: torch.device) -> torch.Tensor:
    return decay_bias(torch.ones(1, device=device), grid, rows=rows)[0, 0]


def _blocked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                     mask: Optional[torch.Tensor], scale: float, block_bytes: int) -> torch.Tensor:
    """Full attention of (B, n, *grid, d) tensors in query blocks of first-axis rows; each block builds its
    slice of the bias, in one reused buffer (a fresh slice per block fragments the heap). ``mask`` (B, *grid)."""
    B, n, d = q.shape[0], q.shape[1], q.shape[-1]
    grid = list(q.shape[2:-1])
    L = 1
    for s in grid:
        L *= s
    inner = L // grid[0]
    rows = rows_per_block(block_bytes, n, grid, q.element_size())
    buffer = torch.empty(n * rows * inner * L, device=q.device, dtype=q.dtype)
    qf, kf, vf = q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2)
    keys = None if mask is None else _key_padding(mask.reshape(B, L), q.dtype)
    out = torch.empty(B, n, L, v.shape[-1], device=q.device, dtype=q.dtype)
    for r0 in range(0, grid[0], rows):
        r1 = min(grid[0], r0 + rows)
        bias = _block_bias(decay, grid, (r0, r1), q.dtype, buffer)
        if keys is not None:
            bias = bias + keys
        out[:, :, r0 * inner:r1 * inner] = _sdpa(qf[:, :, r0 * inner:r1 * inner], kf, vf, bias, scale)
    return out.unflatten(2, grid)


def _blocked_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                      mask: Optional[torch.Tensor], scale: float, block_bytes: int,
                      decay_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_blocked_forward`, written out block by block (each block's softmax recomputed):
    (dq, dk, dv, d_decay), d_decay empty unless ``decay_grad``. Math in float32 for half precision."""
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    B, n = q.shape[0], q.shape[1]
    grid = list(q.shape[2:-1])
    L = 1
    for s in grid:
        L *= s
    inner = L // grid[0]
    qf, kf, vf, gf = [t.flatten(2, -2).to(dtype) for t in (q, k, v, grad)]
    keys = None if mask is None else _key_padding(mask.reshape(B, L), dtype)
    dq, dk, dv = torch.empty_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    decay_dtype = torch.promote_types(decay.dtype, torch.float32)
    d_decay = torch.zeros(decay.shape, device=q.device, dtype=decay_dtype) if decay_grad else q.new_empty(0)
    rows = rows_per_block(block_bytes, n, grid, 2 * dq.element_size())
    for r0 in range(0, grid[0], rows):
        r1 = min(grid[0], r0 + rows)
        block = slice(r0 * inner, r1 * inner)
        bias = _block_bias(decay, grid, (r0, r1), dtype, None)
        if keys is not None:
            bias = bias + keys
        p = (qf[:, :, block] @ kf.transpose(-2, -1) * scale + bias).softmax(-1)
        dp = gf[:, :, block] @ vf.transpose(-2, -1)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[:, :, block] = ds @ kf * scale
        dk += ds.transpose(-2, -1) @ qf[:, :, block] * scale
        dv += p.transpose(-2, -1) @ gf[:, :, block]
        if decay_grad:
            weighted = ds * _block_distance(grid, (r0, r1), q.device)
            if decay.dim() == 1:
                d_decay += weighted.sum((0, 2, 3)).to(decay_dtype)
            else:
                d_decay[:, :, block] += weighted.sum(-1).to(decay_dtype)
    return tuple(t.to(q.dtype).unflatten(2, grid) for t in (dq, dk, dv)) + (d_decay,)


@torch.library.custom_op('rmt::blocked_attention', mutates_args=())
def _blocked_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, mask: Optional[torch.Tensor],
                scale: float, block_bytes: int) -> torch.Tensor:
    """:func:`_blocked_forward` as one operator: its loop is not traced into compiled graphs."""
    return _blocked_forward(q, k, v, decay, mask, scale, block_bytes)


@_blocked_op.register_fake
def _(q, k, v, decay, mask, scale, block_bytes):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op('rmt::blocked_attention_backward', mutates_args=())
def _blocked_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                         mask: Optional[torch.Tensor], scale: float, block_bytes: int,
                         decay_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _blocked_backward(grad, q, k, v, decay, mask, scale, block_bytes, decay_grad)


@_blocked_backward_op.register_fake
def _(grad, q, k, v, decay, mask, scale, block_bytes, decay_grad):
    d_decay = torch.empty(decay.shape, device=q.device, dtype=torch.promote_types(decay.dtype, torch.float32)) \
        if decay_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_decay


def _setup_blocked(ctx, inputs, output) -> None:
    q, k, v, decay, mask, scale, block_bytes = inputs
    ctx.save_for_backward(q, k, v, decay, mask)
    ctx.settings = (scale, block_bytes)


def _backward_blocked(ctx, grad):
    q, k, v, decay, mask = ctx.saved_tensors
    dq, dk, dv, d_decay = _blocked_backward_op(grad.contiguous(), q, k, v, decay, mask, *ctx.settings,
                                               ctx.needs_input_grad[3])
    return dq, dk, dv, d_decay.to(decay.dtype) if ctx.needs_input_grad[3] else None, None, None, None


_blocked_op.register_autograd(_backward_blocked, setup_context=_setup_blocked)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                      mask: Optional[torch.Tensor], scale: float, block_bytes: int = 32 << 20) -> torch.Tensor:
    """Full attention over a (B, n, *grid, d) grid in query blocks of first-axis rows, each building only its
    slice of the bias (``block_bytes`` per slice): memory bounded at any size, gradients for q, k, v and
    ``decay`` ((n,) or per query token (B, n, L)). ``mask``: (B, *grid) bool, True where a key takes part.
    Backward recomputes each block's softmax, nothing of the forward's is kept but the inputs."""
    if torch.jit.is_scripting():  # no custom op in TorchScript: the loop, through autograd
        return _blocked_forward(q, k, v, decay, mask, scale, block_bytes)
    return _blocked_op(q, k, v, decay, mask, float(scale), int(block_bytes))

"""MaSA layers: Manhattan self-attention over 1-, 2- and 3-D token grids, ready to drop into a model.

A layer is RMT's MaSA (paper section 3.2, the released ``VisionRetentionChunk`` / ``...All``): q, k, v
projections, the theta shift of q and k, decayed attention (full, or decomposed along each axis),
LCE (a depthwise conv on v, added to the attention output) and an output projection. It plans its
path and caches its position tables itself; the RMT models use :class:`MaSA2d` with one plan and one
set of tables per stage (:meth:`MaSA.attend`).
"""
import math
from typing import List, Optional

import torch
from torch import nn

from .backends import ATTN_IMPLS, AttentionPlan, plan_attention
from .functional import masa_attention, problem_of
from .paths import movedim
from ..position import PositionTables, RelPos

__all__ = ['MaSA', 'MaSA1d', 'MaSA2d', 'MaSA3d', 'plan_masa', 'channels_first']

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AXES = {1: 'L', 2: 'H, W', 3: 'D, H, W'}


def plan_masa(requested: str, x: torch.Tensor, grid: List[int], num_heads: int, decomposed: bool,
              num_prefix: int = 0, masked: bool = False, decay: Optional[torch.Tensor] = None) -> AttentionPlan:
    """The plan of a MaSA layer's call on channels-last ``x`` (B, ..., C) over ``grid`` (see
    :func:`rmt.attention.plan_attention`); ``decay``: a decay that replaces the layer's static one."""
    problem = problem_of(x, grid, num_heads, x.shape[-1] // num_heads, decomposed, num_prefix, masked, decay)
    return plan_attention(requested, problem, x.device)


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, *grid, C) -> the (B, C, *grid) a conv takes: a view of the same memory (channels-last convs); in
    exported graphs a contiguous tensor, since a layout is not part of them and torch.export, tracing a conv
    on a channels-last view of a batch of 1, would take the batch for 1."""
    x = movedim(x, -1, 1)
    if not torch.jit.is_scripting() and _exporting():
        x = x.contiguous()
    return x


@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting()


# FX graphs (torchvision's feature extraction) plan and attend at run time: one node each
torch.fx.wrap('plan_masa')
torch.fx.wrap('masa_attention')


class MaSA(nn.Module):
    """Manhattan self-attention over a grid of ``ndim`` axes (1: a sequence, 2: an image, 3: a volume or clip).

    Args:
        dim: channels; split into ``num_heads`` heads of even size.
        num_heads: attention heads.
        ndim: grid axes, 1 to 3 (:class:`MaSA1d`, :class:`MaSA2d`, :class:`MaSA3d` fix it).
        decomposed: attend along each axis in turn (last axis first), never forming an (L x L) matrix: the
            paper's choice for high-resolution stages; else once over all tokens.
        theta_shift: rotate q and k by their raster position (paper eq. 3).
        lce_kernel_size: LCE, the depthwise conv on v added to the output: this size along every axis
            (5, 5x5, 5x5x5 by default, as the paper); 0 for none.
        decay_exponent, heads_range: head h's log decay ``ln(1 - 2 ** (-decay_exponent - heads_range * h /
            num_heads))``, negative (the released ``initial_value`` 2 and ``heads_range``, 4 or 6).
        learnable_decay: the per-head log decay becomes a parameter (``relpos.decay``), trained with the
            rest; it is not constrained to stay negative.
        num_prefix_tokens: tokens without position before the grid (class or register tokens): they attend
            and are attended with zero decay, get no theta shift and no LCE. Input then is (B, P + L, C)
            tokens with ``grid`` given.
        channels_first: input and output (B, C, *grid) instead of channels-last (B, *grid, C).
        qkv_bias: bias of the q, k, v projections.
        attn_impl: path, one of :data:`rmt.attention.ATTN_IMPLS` ('auto' plans per call).

    ``forward(x, grid=None, mask=None, decay=None)``:
        x: (B, *grid, C) channels-last (B, C, *grid with ``channels_first``), or (B, P + L, C) tokens with
            ``grid`` (needed with prefix tokens).
        mask: (B, *grid) bool padding mask, True on each image's valid tokens, which must form a top-left box
            (a padded batch): rotary positions are then each image's own and padded v is zeroed before LCE,
            so a padded image gives what the unpadded one gives; padded positions output 0.
        decay: a data-dependent log decay instead of the layer's: (B, heads) per sample or (B, heads, L) per
            grid token (query), e.g. computed from x.
        Returns x's shape. Raises ``ValueError`` naming the expected shape for a misshapen input or mask.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            ndim: int = 2,
            decomposed: bool = False,
            theta_shift: bool = True,
            lce_kernel_size: int = 5,
            decay_exponent: float = 2.,
            heads_range: float = 4.,
            learnable_decay: bool = False,
            num_prefix_tokens: int = 0,
            channels_first: bool = False,
            qkv_bias: bool = True,
            attn_impl: str = 'auto',
    ):
        super().__init__()
        if ndim not in _CONVS:
            raise ValueError(f'MaSA takes grids of 1 to 3 axes, got ndim={ndim}')
        if lce_kernel_size < 0 or (lce_kernel_size and lce_kernel_size % 2 == 0):
            raise ValueError(f'lce_kernel_size must be odd (or 0: no LCE), got {lce_kernel_size}')
        if num_prefix_tokens < 0 or (num_prefix_tokens and channels_first):
            raise ValueError(f'num_prefix_tokens must be >= 0 and needs channels-last tokens, got {num_prefix_tokens}'
                             f'{" with channels_first" if channels_first else ""}')
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'unknown attention path {attn_impl!r}, expected one of {ATTN_IMPLS}')
        self.relpos = RelPos(dim, num_heads, decay_exponent, heads_range, learnable_decay)  # checks the heads
        self.dim = dim
        self.ndim = ndim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decomposed = decomposed
        self.theta_shift = theta_shift
        self.num_prefix_tokens = num_prefix_tokens
        self.channels_first = channels_first
        self.attn_impl = attn_impl
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.lce = _CONVS[ndim](dim, dim, lce_kernel_size, padding=lce_kernel_size // 2, groups=dim) \
            if lce_kernel_size else None
        self.proj = nn.Linear(dim, dim)

    @torch.jit.unused
    def _check(self, x: torch.Tensor, grid: Optional[List[int]], mask: Optional[torch.Tensor]) -> None:
        """One-line ``ValueError`` naming the expected shape for a misshapen input or mask (eager only)."""
        axes = _AXES[self.ndim]
        spatial = f'(B, {self.dim}, {axes})' if self.channels_first else f'(B, {axes}, {self.dim})'
        tokens = '' if self.channels_first else \
            f' or ({"B, P + " if self.num_prefix_tokens else "B, "}L, {self.dim}) tokens with grid=({axes})'
        expected = f'{type(self).__name__} expects {spatial} features{tokens}, got {list(x.shape)}'
        if grid is not None:
            count = math.prod(int(s) for s in grid)
            if self.channels_first or x.dim() != 3 or len(grid) != self.ndim or x.shape[-1] != self.dim or \
                    x.shape[1] != self.num_prefix_tokens + count:
                raise ValueError(f'{expected} with grid={tuple(grid)} ({self.num_prefix_tokens} prefix + {count} '
                                 f'grid tokens)')
        elif self.num_prefix_tokens or x.dim() != self.ndim + 2 or \
                x.shape[1 if self.channels_first else -1] != self.dim:
            raise ValueError(expected + (f' ({self.num_prefix_tokens} prefix tokens need grid=)'
                                         if self.num_prefix_tokens else ''))
        if mask is not None:
            grid = list(grid) if grid is not None else list(x.shape[2:] if self.channels_first else x.shape[1:-1])
            if mask.dtype != torch.bool or list(mask.shape) != [x.shape[0]] + grid:
                raise ValueError(f'{type(self).__name__}: mask must be a ({x.shape[0]}, {", ".join(map(str, grid))}) '
                                 f'bool padding mask (True on valid tokens), got {list(mask.shape)} {mask.dtype}')

    def _extents(self, mask: torch.Tensor, grid: List[int]) -> torch.Tensor:
        """Each image's valid size (B, ndim) from a top-left box padding mask."""
        extents: List[torch.Tensor] = []
        box = torch.ones_like(mask)
        for a in range(self.ndim):
            others: List[int] = []
            for b in range(self.ndim):
                if b != a:
                    others.append(1 + b)
            along = mask.amax(dim=others) if len(others) > 0 else mask
            extent = along.sum(-1)
            extents.append(extent)
            shape = [1] * (self.ndim + 1)
            shape[a + 1] = grid[a]
            inside = torch.arange(grid[a], device=mask.device).reshape(shape) < extent.reshape([-1] + [1] * self.ndim)
            box = box & inside
        if not torch.jit.is_scripting():
            _check_box(box, mask, type(self).__name__)
        return torch.stack(extents, -1)

    def forward(self, x: torch.Tensor, grid: Optional[List[int]] = None, mask: Optional[torch.Tensor] = None,
                decay: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check(x, grid, mask)
        tokens = grid is not None
        if grid is None:
            grid = list(x.shape[2:]) if self.channels_first else list(x.shape[1:-1])
        if self.channels_first:
            x = movedim(x, 1, -1)
        B, P = x.shape[0], self.num_prefix_tokens
        count = 1
        for s in grid:
            count *= s
        extents: Optional[torch.Tensor] = None
        key_mask: Optional[torch.Tensor] = None
        if mask is not None:
            extents = self._extents(mask, grid)
            key_mask = mask.reshape(B, count)
            if P:
                key_mask = torch.cat([key_mask.new_ones(B, P), key_mask], 1)
        if decay is not None:
            decay = self._check_decay(decay, B, count)
        plan = plan_masa(self.attn_impl, x, grid, self.num_heads, self.decomposed, P, mask is not None,
                         decay if decay is not None else self.relpos.decay)
        tables = self.relpos(grid, x.device, plan.table_dtype, plan.needs_full_bias, extents)
        out = self.attend(x, plan, tables, grid if tokens else None, key_mask, decay)
        if key_mask is not None:
            out = out.masked_fill(~key_mask.reshape(list(out.shape[:-1]) + [1]), 0)
        return movedim(out, -1, 1) if self.channels_first else out

    def _check_decay(self, decay: torch.Tensor, batch: int, count: int) -> torch.Tensor:
        n = self.num_heads
        if decay.dim() == 2 and list(decay.shape) == [batch, n]:
            return decay[:, :, None].expand(batch, n, count)
        if decay.dim() == 3 and list(decay.shape) == [batch, n, count]:
            return decay
        raise ValueError('{}: decay must be per sample ({}, {}) or per grid token ({}, {}, {}), got {}'.format(
            'MaSA', batch, n, batch, n, count, list(decay.shape)))

    def attend(self, x: torch.Tensor, plan: AttentionPlan, tables: PositionTables, grid: Optional[List[int]] = None,
               mask: Optional[torch.Tensor] = None, decay: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MaSA of channels-last ``x`` (B, *grid, C), or (B, P + L, C) tokens with ``grid``, with a plan and
        tables made for it (an RMT stage shares one of each between its blocks); ``mask`` (B, P + L) bool,
        True where a token takes part. Returns x's shape."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        prefix: Optional[List[torch.Tensor]] = None
        tokens = grid is not None
        if grid is not None:
            P = self.num_prefix_tokens
            if P:
                prefix = [q[:, :P], k[:, :P], v[:, :P]]
            q, k, v = [t[:, P:].unflatten(1, grid) for t in (q, k, v)]
        if mask is not None:
            v = v.masked_fill(~mask[:, self.num_prefix_tokens:].reshape(list(v.shape[:-1]) + [1]), 0)
        lce: Optional[torch.Tensor] = None
        if self.lce is not None:
            lce = movedim(self.lce(channels_first(v)), 1, -1)
        out, out_prefix = masa_attention(q, k, v, lce, tables, plan, self.num_heads, self.decomposed,
                                         self.theta_shift, decay, prefix, mask)
        if tokens:
            out = out.flatten(1, -2)
            if prefix is not None:
                out = torch.cat([out_prefix, out], 1)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, ndim={self.ndim}, decomposed={self.decomposed}, ' \
               f'theta_shift={self.theta_shift}, num_prefix_tokens={self.num_prefix_tokens}'


@torch.jit.unused
def _check_box(box: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return  # a data-dependent check: eager only
    if not torch.equal(box, mask):
        raise ValueError(f'{name}: mask must mark each image\'s valid tokens as a top-left box (True inside the '
                         f'unpadded image, False in the padding)')


class MaSA1d(MaSA):
    """:class:`MaSA` over sequences: (B, L, C) (or (B, P + L, C) with ``grid=(L,)``)."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool = False, **kwargs):
        super().__init__(dim, num_heads, 1, decomposed, **kwargs)


class MaSA2d(MaSA):
    """:class:`MaSA` over images: (B, H, W, C) (or (B, C, H, W) with ``channels_first``)."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool = False, **kwargs):
        super().__init__(dim, num_heads, 2, decomposed, **kwargs)


class MaSA3d(MaSA):
    """:class:`MaSA` over volumes and clips: (B, D, H, W, C) (or (B, C, D, H, W) with ``channels_first``)."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool = False, **kwargs):
        super().__init__(dim, num_heads, 3, decomposed, **kwargs)

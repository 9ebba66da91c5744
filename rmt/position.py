"""Where tokens are, for MaSA: rotary angles (the theta shift) and the Manhattan spatial decay.

A MaSA layer attends over a grid of tokens with one, two or three axes (a sequence, an image
(H, W), a volume or clip (D, H, W)). Two things depend on where a token sits:

* the *theta shift* (paper eq. 3, the released ``theta_shift``): q and k are rotated pairwise by
  angles ``p * a``, where ``p`` is the token's raster index (``i * W + j`` for an image; the
  released code uses this one index, not two) and ``a`` the rotary frequencies;
* the *decay*: attention logits get the bias ``lambda_h * distance``, where ``lambda_h = ln(gamma_h)``
  is head h's log decay (negative: weights shrink by ``gamma_h`` per token of distance) and the
  distance is ``|t - t'|`` along one axis, or the Manhattan (city-block) distance over the whole
  grid (paper section 3.2).

:func:`axis_bias` is the one definition of the per-axis term and :func:`manhattan_bias` of their
sum; :func:`decay_bias` builds the bias for any decay (per head, or per query token for
data-dependent forms) and any slice of queries, and the Triton kernels compute the same
distances from token indices. Each stage or layer owns one :class:`RelPos` (the released code's
``Relpos``) that caches its tables per grid size, device and dtype and hands them to the attention
as :class:`PositionTables`. Numerics follow the released code (float32 throughout), so the tables
agree with the ones it rebuilds on every forward.
"""
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = ['decay_rates', 'rotary_angles', 'raster_positions', 'rotary_tables', 'rotation_pairs',
           'rotation_to_sin_cos', 'axis_distance', 'axis_bias', 'manhattan_bias', 'decay_bias', 'theta_shift',
           'pair_order', 'pairs_split', 'theta_shift_reference', 'position_tables', 'PositionTables', 'RelPos']


class PositionTables(NamedTuple):
    """What the attention of one grid of tokens needs from their positions (n heads of d channels).

    ``grid`` below is the grid's shape (one to three sizes) and L its token count.
    """
    sin: torch.Tensor          # (*grid, 1, d), or (B, *grid, 1, d) with per-image positions: sin(p a) * pair sign
    cos: torch.Tensor          # the same shape: cos(p a)
    rotation: torch.Tensor     # sin/cos's shape with (d/2, 2) for d: (cos, sin) pairs, for float32/64; else empty
    decay: torch.Tensor        # (n,) per-head log decay lambda_h, float32
    axis_bias: List[torch.Tensor]  # per grid axis, in grid order: (1, n, s, s) lambda_h * |t - t'|
    bias: torch.Tensor         # (1, n, L, L) lambda_h * Manhattan distance, or empty when not asked for


def decay_rates(num_heads: int, decay_exponent: float, heads_range: float) -> torch.Tensor:
    """Per-head log decay ``lambda_h = ln(1 - 2 ** (-decay_exponent - heads_range * h / n))``, (n,), negative.

    The released ``Relpos.decay`` (its ``initial_value`` and ``heads_range``); head 0 decays fastest.
    """
    h = torch.arange(num_heads, dtype=torch.float32)
    return torch.log(1 - 2 ** (-decay_exponent - heads_range * h / num_heads))


def rotary_angles(head_dim: int) -> torch.Tensor:
    """Rotary frequencies ``1 / 10000 ** linspace(0, 1, d/2)``, each repeated twice in place, (d,)."""
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
    return angle.unsqueeze(-1).repeat(1, 2).flatten()


def raster_positions(grid: List[int], device: torch.device, extents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The raster index of every token of ``grid`` (last axis fastest), float32, shape ``grid``.

    With ``extents`` (B, len(grid)), the valid size of each image of a padded batch, the index is the
    one the token has in its own image (``i * w_b + j``), shape (B, *grid); padded tokens get 0.
    """
    if extents is None:
        size = 1
        for s in grid:
            size *= s
        return torch.arange(size, device=device, dtype=torch.float32).reshape(grid)
    extents = extents.to(device=device, dtype=torch.float32)
    position = torch.zeros([extents.shape[0]] + [1] * len(grid), device=device)
    valid = torch.ones([extents.shape[0]] + [1] * len(grid), device=device, dtype=torch.bool)
    for a, s in enumerate(grid):
        shape = [1] * (len(grid) + 1)
        shape[a + 1] = s
        index = torch.arange(s, device=device, dtype=torch.float32).reshape(shape)
        extent = extents[:, a].reshape([-1] + [1] * len(grid))
        position = position * extent + index
        valid = valid & (index < extent)
    return torch.where(valid, position, torch.zeros_like(position))


def rotary_tables(angle: torch.Tensor, grid: List[int], device: torch.device, dtype: torch.dtype,
                  extents: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sin * pair sign, cos) of shape (*grid, 1, d) at the raster positions (:func:`raster_positions`;
    (B, *grid, 1, d) with ``extents``).

    The pair rotation ``(x0, x1, ..) -> (-x1, x0, ..)`` equals a pair swap times signs (-1, +1, ..);
    the signs live in the sin table so :func:`theta_shift_reference` is two multiplies and a swap.
    """
    angle = angle.to(device=device, dtype=torch.float32)
    phase = raster_positions(grid, device, extents).unsqueeze(-1).unsqueeze(-1) * angle
    sign = torch.tensor([-1.0, 1.0], device=device).repeat(angle.shape[0] // 2)
    return (torch.sin(phase) * sign).to(dtype), torch.cos(phase).to(dtype)


def rotation_pairs(sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """(..., d/2, 2) (cos, sin) pairs of each frequency from :func:`rotary_tables`' (..., d) tables."""
    return torch.stack((cos[..., 0::2], sin[..., 1::2]), dim=-1)


def rotation_to_sin_cos(rotation: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (sin * pair sign, cos) tables of :func:`rotary_tables` from (..., d/2, 2) (cos, sin) pairs."""
    cos, sin = rotation.unbind(-1)
    return torch.stack((-sin, sin), -1).flatten(-2), torch.stack((cos, cos), -1).flatten(-2)


def axis_distance(size: int, device: torch.device) -> torch.Tensor:
    """``|t - t'|`` between the ``size`` tokens of one axis, (size, size) float32."""
    index = torch.arange(size, device=device, dtype=torch.float32)
    return (index[:, None] - index[None, :]).abs()


def axis_bias(decay: torch.Tensor, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``lambda_h * |t - t'|`` between the ``size`` tokens of one axis, (1, n, size, size): 4-D like every bias
    here, the shape attention masks take. Computed in float32 (float64 for a float64 ``decay``)."""
    decay = decay.to(device=device, dtype=torch.promote_types(decay.dtype, torch.float32))
    return (axis_distance(size, device) * decay.reshape(1, -1, 1, 1)).to(dtype)


def manhattan_bias(axis_biases: List[torch.Tensor], rows: Optional[Tuple[int, int]] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The decay over the whole grid, ``lambda_h * sum_a |t_a - t'_a|``, as the sum of the per-axis terms.

    ``axis_biases``: one (..., s_a, s_a) term per grid axis (:func:`axis_bias`: (1, n, s_a, s_a)). Returns
    (..., Lq, L) for the queries whose first grid index lies in ``rows = (r0, r1)`` (all by default; Lq =
    (r1 - r0) * the other sizes), written into ``out`` (a flat buffer of at least that many elements) when
    given.
    """
    ndim = len(axis_biases)
    lead = list(axis_biases[0].shape[:-2])
    terms: List[torch.Tensor] = []
    q_sizes: List[int] = []
    k_sizes: List[int] = []
    for a, term in enumerate(axis_biases):
        if a == 0 and rows is not None:
            term = term[..., rows[0]:rows[1], :]
        shape = lead + [1] * (2 * ndim)
        shape[len(lead) + a] = term.shape[-2]
        shape[len(lead) + ndim + a] = term.shape[-1]
        terms.append(term.reshape(shape))
        q_sizes.append(term.shape[-2])
        k_sizes.append(term.shape[-1])
    q_size, k_size = 1, 1
    for s in q_sizes:
        q_size *= s
    for s in k_sizes:
        k_size *= s
    bias = terms[0]
    if out is not None and ndim > 1:
        full = lead + q_sizes + k_sizes
        count = 1
        for s in full:
            count *= s
        bias = out[:count].view(full)
        if ndim == 2:
            torch.add(terms[0], terms[1], out=bias)
        else:
            bias.copy_(terms[0])
            for term in terms[1:]:
                bias.add_(term)
    else:
        for term in terms[1:]:
            bias = bias + term
    return bias.reshape(lead + [q_size, k_size])


def decay_bias(decay: torch.Tensor, grid: List[int], axis: Optional[int] = None,
               rows: Optional[Tuple[int, int]] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The decay bias for ``decay`` over ``grid``, differentiable in ``decay``.

    ``decay``: (n,) per-head log decay, or (B, n, L) per query token (L = the grid's token count; a
    data-dependent decay: the bias between query t and key t' is ``decay[b, h, t] * distance(t, t')``).
    ``axis``: along one grid axis (each sequence of tokens that differ only in that coordinate), else
    over the whole grid (Manhattan distance), for the queries in first-axis range ``rows`` (as
    :func:`manhattan_bias`). Shapes: per head (1, n, Lq, L) or (1, n, s, s) along an axis; per token
    (B, n, Lq, L), or along an axis (B * other positions, n, s, s) in the order of
    :func:`rmt.attention.paths.sequences` (batch, then the other axes in grid order).
    """
    device = decay.device
    decay = decay.to(torch.promote_types(decay.dtype, torch.float32))
    if axis is not None:
        distance = axis_distance(grid[axis], device)
        if decay.dim() == 1:
            return (decay.reshape(1, -1, 1, 1) * distance).to(dtype)
        per_token = decay.unflatten(-1, grid).movedim(2 + axis, -1)  # (B, n, *other, s)
        per_token = per_token.movedim(1, -2).flatten(0, -3)                # (B * other, n, s)
        return (per_token[..., None] * distance).to(dtype)
    distances = [axis_distance(s, device) for s in grid]
    distance = manhattan_bias(distances, rows)
    if decay.dim() == 1:
        return (decay.reshape(1, -1, 1, 1) * distance).to(dtype)
    per_token = decay
    if rows is not None:
        inner = distance.shape[0] // (rows[1] - rows[0])
        per_token = per_token[..., rows[0] * inner:rows[1] * inner]
    return (per_token[..., None] * distance).to(dtype)


def theta_shift(x: torch.Tensor, tables: PositionTables) -> torch.Tensor:
    """Rotary shift ``x * cos + rot(x) * sin`` of (B, *grid, n, d) features (paper eq. 3, the released
    ``theta_shift``): each channel pair (x0, x1) of a head becomes (x0 c - x1 s, x1 c + x0 s).

    For float32/64 in eager mode this is one complex multiply of the pairs by ``exp(i p a)`` (a single
    pass over memory), in the paper's channel order. Elsewhere (half precision, TorchScript, traced,
    compiled and exported graphs) it is written with slices and one ``cat``: no reshape that spells the
    batch, no ``flip`` (which XNNPACK does not take), no tensor above rank 5 (Core ML's limit), and each
    head's channels come out in :func:`pair_order` (all first members of the pairs, then all second
    ones). Attention cannot tell the two orders apart when q and k share one (q . k sums over the
    channels); :func:`pair_order` puts unrotated tokens in the same order (:func:`pairs_split`).
    """
    if not pairs_split(x, tables):
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.view_as_complex(tables.rotation)).flatten(-2)
    c, s = tables.cos[..., 0::2].to(x.dtype), tables.sin[..., 1::2].to(x.dtype)  # cos(p a), sin(p a)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], -1)


def pair_order(x: torch.Tensor) -> torch.Tensor:
    """Each head's channels of (..., d) ``x`` as :func:`theta_shift` leaves them where ``pairs_split``: the
    first members of the channel pairs, then the second ones."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], -1)


def pairs_split(x: torch.Tensor, tables: PositionTables) -> bool:
    """Whether :func:`theta_shift` returns ``x``'s channels in :func:`pair_order` (else in the paper's order)."""
    if torch.jit.is_scripting():
        return True
    return not _use_complex(x, tables.rotation)


def theta_shift_reference(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x * cos + rot(x) * sin`` spelled out (``sin`` carries the rotation sign); ``inverse`` rotates back,
    ``x * cos - rot(x) * sin``, which is also the shift's transpose (how gradients flow through it)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos - swapped * sin if inverse else x * cos + swapped * sin


@torch.jit.unused
def _use_complex(x: torch.Tensor, rotation: torch.Tensor) -> bool:
    # no complex numbers in traced (torch.jit.trace, classic ONNX) or exported graphs
    return not torch.jit.is_tracing() and not torch.compiler.is_compiling() and rotation.numel() > 0 \
        and x.dtype == rotation.dtype and x.stride(-1) == 1


def position_tables(decay: torch.Tensor, head_dim: int, grid: List[int], device: torch.device, dtype: torch.dtype,
                    with_full: bool, extents: Optional[torch.Tensor] = None) -> PositionTables:
    """The rotary and decay tables of heads of ``head_dim`` channels with log decay ``decay`` (n,) on ``grid``,
    in ``dtype`` (the rotation pairs only for float32/64), with the (n, L, L) bias when ``with_full``, and
    per-image rotary positions when ``extents`` (B, len(grid)) gives each image's valid size."""
    decay = decay.to(device=device, dtype=torch.float32)
    sin, cos = rotary_tables(rotary_angles(head_dim), grid, device, dtype, extents)
    if dtype == torch.float32 or dtype == torch.float64:
        rotation = rotation_pairs(sin, cos)
    else:
        rotation = torch.empty(0, device=device, dtype=dtype)
    axis = [axis_bias(decay, s, device, dtype) for s in grid]
    bias = manhattan_bias(axis) if with_full else torch.empty(0, device=device, dtype=dtype)
    return PositionTables(sin, cos, rotation, decay, axis, bias)


torch.fx.wrap('position_tables')  # FX graphs (torchvision's feature extraction) build the tables as one node


class RelPos(nn.Module):
    """Rotary and decay tables of one stage or layer, cached per (grid, device, dtype); the released ``Relpos``.

    Args:
        dim: channels, split into ``num_heads`` heads of even size.
        decay_exponent, heads_range: head h's log decay is
            ``ln(1 - 2 ** (-decay_exponent - heads_range * h / num_heads))`` (:func:`decay_rates`;
            the released ``initial_value`` and ``heads_range``).
        learnable_decay: the log decay becomes a parameter ``decay`` (n,), initialised so; tables that
            depend on it are rebuilt on every call, so gradients reach it at every step.

    The full (n, L, L) bias is built only when ``with_full`` asks for it (full-attention paths that
    read a materialised bias). Without ``learnable_decay`` it holds no tensors in ``state_dict``: the
    released checkpoints' ``Relpos.angle`` / ``Relpos.decay`` buffers are checked against it on load.
    Raises ``ValueError`` when ``dim`` does not split into heads of even size.
    """
    cache_size: int = 8
    __jit_ignored_attributes__ = ['_cache']

    def __init__(self, dim: int, num_heads: int, decay_exponent: float, heads_range: float,
                 learnable_decay: bool = False):
        super().__init__()
        if num_heads < 1 or dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f'{dim} channels do not split into {num_heads} heads of even size')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decay_exponent = float(decay_exponent)
        self.heads_range = float(heads_range)
        self.learnable_decay = learnable_decay
        rates = decay_rates(num_heads, decay_exponent, heads_range)
        self.decay = nn.Parameter(rates) if learnable_decay else None
        self._cache: 'OrderedDict' = OrderedDict()

    def rates(self) -> torch.Tensor:
        """The per-head log decay (n,): the parameter, or the configured rates."""
        decay = self.decay
        if decay is not None:
            return decay
        return decay_rates(self.num_heads, self.decay_exponent, self.heads_range)

    def build(self, grid: List[int], device: torch.device, dtype: torch.dtype, with_full: bool,
              extents: Optional[torch.Tensor] = None) -> PositionTables:
        """Compute the tables from scratch (what the cache stores)."""
        return position_tables(self.rates(), self.head_dim, grid, device, dtype, with_full, extents)

    def forward(self, grid: List[int], device: torch.device, dtype: torch.dtype, with_full: bool,
                extents: Optional[torch.Tensor] = None) -> PositionTables:
        if torch.jit.is_scripting():
            return self.build(grid, device, dtype, with_full, extents)
        return self._cached(grid, device, dtype, with_full, extents)

    @torch.jit.unused
    def _cached(self, grid: List[int], device: torch.device, dtype: torch.dtype, with_full: bool,
                extents: Optional[torch.Tensor]) -> PositionTables:
        if any(isinstance(s, torch.fx.Proxy) for s in grid):  # torch.fx / torchvision: one node, built per call
            return position_tables(self.rates(), self.head_dim, grid, device, dtype, with_full, extents)
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or extents is not None:
            return self.build(grid, device, dtype, with_full, extents)  # from the input's sizes / this batch
        # tables made under inference_mode cannot be saved for backward later, so they key apart
        key = (tuple(grid), str(device), dtype, with_full, torch.is_inference_mode_enabled())
        tables = self._cache.get(key)
        if tables is None:
            tables = position_tables(self.rates().detach(), self.head_dim, grid, device, dtype, with_full)
            self._cache[key] = tables
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if self.decay is not None:  # the rotary tables are cached; the decay terms follow the parameter
            decay = self.decay.to(device=device, dtype=torch.float32)
            axis = [axis_bias(decay, s, device, dtype) for s in grid]
            bias = manhattan_bias(axis) if with_full else tables.bias
            tables = tables._replace(decay=decay, axis_bias=axis, bias=bias)
        return tables

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, head_dim={self.head_dim}, decay_exponent={self.decay_exponent}, ' \
               f'heads_range={self.heads_range}, learnable_decay={self.learnable_decay}'

"""Where tokens are, for MaSA: rotary angles (the theta shift) and the Manhattan spatial decay.

Nothing here is learned. Every table is a function of a stage's config and its feature size
(H, W), so each stage owns one :class:`RelPos2d` (the released code's ``Relpos``) that builds the
tables once per (H, W, device, dtype) and hands them to its blocks as :class:`PositionTables`.

The decay enters attention as an additive *bias* on the logits: ``lambda_h * distance``, where the
distance between tokens (i, j) and (i', j') is ``|i - i'|`` along a column, ``|j - j'|`` along a
row, and their sum, the Manhattan distance, over the whole image (paper section 3.2).
:func:`axis_bias` is the one definition of the per-axis term and :func:`manhattan_bias` of their
sum; the Triton kernels compute the same distances from token indices, with the same rates.

Numerics follow the released code exactly (float32 throughout, raster index ``i * W + j`` as the
rotary position), so the tables agree with the ones it rebuilds on every forward.
"""
from collections import OrderedDict
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = ['decay_rates', 'rotary_angles', 'rotary_tables', 'rotation_to_sin_cos', 'axis_bias', 'manhattan_bias',
           'position_tables', 'theta_shift',
           'theta_shift_reference', 'PositionTables', 'RelPos2d']


class PositionTables(NamedTuple):
    """Everything a stage's blocks need from the position of their tokens (H x W feature map, n heads of d)."""
    sin: torch.Tensor       # (H, W, 1, d) sin(p * a) with the pair rotation's sign folded in
    cos: torch.Tensor       # (H, W, 1, d) cos(p * a)
    rotation: torch.Tensor  # (H, W, 1, d/2, 2) (cos, sin)(p * a) pairs for float32/64 tables, else empty
    decay: torch.Tensor     # (n,) per-head log decay lambda_h, float32
    bias_h: torch.Tensor    # (n, H, H) lambda_h * |i - i'|, the decay along a column
    bias_w: torch.Tensor    # (n, W, W) lambda_h * |j - j'|, the decay along a row
    bias_2d: torch.Tensor   # (n, HW, HW) lambda_h * Manhattan distance, or empty when not asked for


def decay_rates(num_heads: int, decay_exponent: float, heads_range: float) -> torch.Tensor:
    """Per-head log decay ``lambda_h = ln(1 - 2 ** (-decay_exponent - heads_range * h / n))`` (negative), (n,)."""
    h = torch.arange(num_heads, dtype=torch.float32)
    return torch.log(1 - 2 ** (-decay_exponent - heads_range * h / num_heads))


def rotary_angles(head_dim: int) -> torch.Tensor:
    """Rotary frequencies ``1 / 10000 ** linspace(0, 1, d/2)``, each repeated twice in place, (d,)."""
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
    return angle.unsqueeze(-1).repeat(1, 2).flatten()


def rotary_tables(
        angle: torch.Tensor, H: int, W: int, device: torch.device, dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sin * pair sign, cos) of shape (H, W, 1, d) at the flattened raster positions ``i * W + j``.

    The pair rotation ``(x0, x1, ..) -> (-x1, x0, ..)`` equals a pair swap times signs (-1, +1, ..);
    the signs live in the sin table so :func:`theta_shift` is two multiplies and a swap.
    """
    angle = angle.to(device=device, dtype=torch.float32)
    index = torch.arange(H * W, device=device, dtype=torch.float32)
    phase = index[:, None] * angle[None, :]
    sign = torch.tensor([-1.0, 1.0], device=device).repeat(angle.shape[0] // 2)
    sin = (torch.sin(phase) * sign).reshape(H, W, 1, -1)
    cos = torch.cos(phase).reshape(H, W, 1, -1)
    return sin.to(dtype), cos.to(dtype)


def rotation_to_sin_cos(rotation: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (sin * pair sign, cos) tables of :func:`rotary_tables` from (..., d/2, 2) (cos, sin) pairs."""
    cos, sin = rotation.unbind(-1)
    return torch.stack((-sin, sin), -1).flatten(-2), torch.stack((cos, cos), -1).flatten(-2)


def axis_bias(decay: torch.Tensor, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``lambda_h * |t - t'|`` between the ``size`` tokens of one axis, (n, size, size)."""
    index = torch.arange(size, device=device, dtype=torch.float32)
    distance = (index[:, None] - index[None, :]).abs()
    return (distance * decay.to(device=device, dtype=torch.float32)[:, None, None]).to(dtype)


def manhattan_bias(bias_h: torch.Tensor, bias_w: torch.Tensor, rows: Optional[Tuple[int, int]] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``lambda_h * (|i - i'| + |j - j'|)``, the 2-D decay, as the sum of the two axis terms.

    Shape (n, R * W, H * W) for the queries in image rows ``rows = (r0, r1)`` (all H rows by default),
    written into ``out`` (a flat buffer of at least that many elements) when given.
    """
    n, H, W = bias_h.shape[0], bias_h.shape[1], bias_w.shape[1]
    r0, r1 = (0, H) if rows is None else rows
    terms = (bias_h[:, r0:r1, None, :, None], bias_w[:, None, :, None, :])
    if out is None:
        bias = torch.add(*terms)
    else:
        bias = out[:n * (r1 - r0) * W * H * W].view(n, r1 - r0, W, H, W)
        torch.add(*terms, out=bias)
    return bias.view(n, (r1 - r0) * W, H * W)


def theta_shift(x: torch.Tensor, tables: PositionTables) -> torch.Tensor:
    """Rotary shift ``x * cos + rot(x) * sin`` of (B, H, W, n, d) features (paper eq. 3, the released ``theta_shift``).

    For float32/64 this is one complex multiply of the feature pairs by ``exp(i p a)`` (a single
    pass over memory); otherwise, and where complex numbers cannot go (TorchScript, tracing,
    export), the reference formula with the pair swap.
    """
    if not torch.jit.is_scripting() and _use_complex(x, tables.rotation):
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.view_as_complex(tables.rotation)).flatten(-2)
    return theta_shift_reference(x, tables.sin.to(x.dtype), tables.cos.to(x.dtype))


def theta_shift_reference(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x * cos + rot(x) * sin`` spelled out (``sin`` carries the rotation sign); ``inverse`` rotates back,
    ``x * cos - rot(x) * sin``, which is also the shift's transpose (how gradients flow through it)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos - swapped * sin if inverse else x * cos + swapped * sin


@torch.jit.unused
def _use_complex(x: torch.Tensor, rotation: torch.Tensor) -> bool:
    # no complex numbers in traced (torch.jit.trace, classic ONNX) or exported graphs
    return not torch.jit.is_tracing() and not torch.compiler.is_exporting() and rotation.numel() > 0 \
        and x.dtype == rotation.dtype and x.stride(-1) == 1


def position_tables(num_heads: int, head_dim: int, decay_exponent: float, heads_range: float, H: int, W: int,
                    device: torch.device, dtype: torch.dtype, with_2d: bool) -> PositionTables:
    """The rotary and decay tables of a stage of ``num_heads`` heads of ``head_dim`` channels on an H x W map,
    in ``dtype`` (the rotation pairs only for float32/64), with the (n, HW, HW) bias when ``with_2d``."""
    decay = decay_rates(num_heads, decay_exponent, heads_range)
    sin, cos = rotary_tables(rotary_angles(head_dim), H, W, device, dtype)
    if dtype == torch.float32 or dtype == torch.float64:
        rotation = torch.stack((cos[..., 0::2], sin[..., 1::2]), dim=-1)
    else:
        rotation = torch.empty(0, device=device, dtype=dtype)
    bias_h, bias_w = axis_bias(decay, H, device, dtype), axis_bias(decay, W, device, dtype)
    bias_2d = manhattan_bias(bias_h, bias_w) if with_2d else torch.empty(0, device=device, dtype=dtype)
    return PositionTables(sin, cos, rotation, decay.to(device), bias_h, bias_w, bias_2d)


torch.fx.wrap('position_tables')  # FX graphs (torchvision's feature extraction) build the tables as one node


class RelPos2d(nn.Module):
    """Rotary and decay tables of one stage, cached per (H, W, device, dtype); the released ``Relpos``.

    The full (n, HW, HW) bias is built only when ``with_2d`` asks for it (full-attention stages on
    the paths that read a materialised bias); the decomposed stages and the blocked and Triton
    paths need only the per-axis terms. Holds no tensors in ``state_dict``: the released
    checkpoints' ``Relpos.angle`` / ``Relpos.decay`` buffers are checked against it on load.
    """
    cache_size: int = 8
    __jit_ignored_attributes__ = ['_cache']

    def __init__(self, dim: int, num_heads: int, decay_exponent: float, heads_range: float):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f'dim {dim} must split into {num_heads} heads of even size')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decay_exponent = float(decay_exponent)
        self.heads_range = float(heads_range)
        self._cache: 'OrderedDict' = OrderedDict()

    def build(self, H: int, W: int, device: torch.device, dtype: torch.dtype, with_2d: bool) -> PositionTables:
        """Compute the tables from scratch (what the cache stores)."""
        return position_tables(self.num_heads, self.head_dim, self.decay_exponent, self.heads_range, H, W, device,
                               dtype, with_2d)

    def forward(self, H: int, W: int, device: torch.device, dtype: torch.dtype, with_2d: bool) -> PositionTables:
        if torch.jit.is_scripting():
            return self.build(H, W, device, dtype, with_2d)
        return self._cached(H, W, device, dtype, with_2d)

    @torch.jit.unused
    def _cached(self, H: int, W: int, device: torch.device, dtype: torch.dtype, with_2d: bool) -> PositionTables:
        if isinstance(H, torch.fx.Proxy):  # torch.fx / torchvision feature extraction: one node, built per call
            return position_tables(self.num_heads, self.head_dim, self.decay_exponent, self.heads_range, H, W, device,
                                   dtype, with_2d)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # tables traced from the input's sizes
            return self.build(H, W, device, dtype, with_2d)
        # tables made under inference_mode cannot be saved for backward later, so they key apart
        key = (H, W, str(device), dtype, with_2d, torch.is_inference_mode_enabled())
        tables = self._cache.get(key)
        if tables is None:
            tables = self.build(H, W, device, dtype, with_2d)
            self._cache[key] = tables
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return tables

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, head_dim={self.head_dim}, ' \
               f'decay_exponent={self.decay_exponent}, heads_range={self.heads_range}'


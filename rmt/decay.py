"""Position tables of RMT: rotary angles (theta) and the Manhattan spatial decay.

Nothing here is learned. Every table is a function of a stage's config and its feature size
(H, W), so each stage owns one :class:`SpatialDecay` that builds the tables once per
(H, W, device, dtype) and hands them to its blocks.

Numerics follow the released code exactly (float32 throughout, raster index as the rotary
position), so the tables agree bit for bit with the ones it rebuilds on every forward.
"""
from collections import OrderedDict
from typing import List, NamedTuple, Tuple

import torch
from torch import nn

from timm.layers import register_notrace_module

__all__ = ['decay_rates', 'rotary_angles', 'rotary_tables', 'decay_masks_1d', 'manhattan_mask', 'theta_shift',
           'theta_shift_reference',
           'SpatialDecay', 'DecayTables']



class DecayTables(NamedTuple):
    """Everything a stage's blocks need from the position of their tokens."""
    sin: torch.Tensor       # (H, W, 1, d) sin(p * a) with the pair rotation's sign folded in
    cos: torch.Tensor       # (H, W, 1, d) cos(p * a)
    rotation: torch.Tensor  # (H, W, 1, d/2, 2) (cos, sin)(p * a) pairs for float32/64 tables, else empty
    decay: torch.Tensor     # (n,) per-head log decay, float32
    mask_h: torch.Tensor    # (n, H, H) decay * |i - i'|
    mask_w: torch.Tensor    # (n, W, W) decay * |j - j'|
    mask_2d: torch.Tensor   # (n, HW, HW) Manhattan decay, or empty when not needed


def decay_rates(num_heads: int, decay_exponent: float, heads_range: float) -> torch.Tensor:
    """Per-head log decay ``lambda_h = ln(1 - 2 ** (-decay_exponent - heads_range * h / n))`` (negative)."""
    h = torch.arange(num_heads, dtype=torch.float32)
    return torch.log(1 - 2 ** (-decay_exponent - heads_range * h / num_heads))


def rotary_angles(head_dim: int) -> torch.Tensor:
    """Rotary frequencies ``1 / 10000 ** linspace(0, 1, d/2)``, each repeated twice in place."""
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


def decay_masks_1d(decay: torch.Tensor, H: int, W: int, device: torch.device, dtype: torch.dtype):
    """``lambda_h * |i - i'|`` for rows (n, H, H) and ``lambda_h * |j - j'|`` for columns (n, W, W)."""
    decay = decay.to(device=device, dtype=torch.float32)
    masks: List[torch.Tensor] = []
    for size in (H, W):
        index = torch.arange(size, device=device, dtype=torch.float32)
        distance = (index[:, None] - index[None, :]).abs()
        masks.append((distance * decay[:, None, None]).to(dtype))
    return masks[0], masks[1]


def manhattan_mask(mask_h: torch.Tensor, mask_w: torch.Tensor) -> torch.Tensor:
    """The 2-D decay ``lambda_h * (|i - i'| + |j - j'|)`` of shape (n, HW, HW), from the two 1-D masks."""
    n, H, W = mask_h.shape[0], mask_h.shape[1], mask_w.shape[1]
    mask = mask_h[:, :, None, :, None] + mask_w[:, None, :, None, :]
    return mask.reshape(n, H * W, H * W)


def theta_shift(x: torch.Tensor, tables: DecayTables) -> torch.Tensor:
    """Rotary shift ``x * cos + rot(x) * sin`` of (B, H, W, n, d) features.

    For float32/64 this is one complex multiply of the feature pairs by ``exp(i p a)`` (a single
    pass over memory); otherwise, and where complex numbers cannot go (TorchScript, export), the
    reference formula with the pair swap.
    """
    if not torch.jit.is_scripting() and _use_complex(x, tables.rotation):
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.view_as_complex(tables.rotation)).flatten(-2)
    return theta_shift_reference(x, tables.sin.to(x.dtype), tables.cos.to(x.dtype))


def theta_shift_reference(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """``x * cos + rot(x) * sin`` spelled out; ``sin`` carries the rotation sign."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos + swapped * sin


@torch.jit.unused
def _use_complex(x: torch.Tensor, rotation: torch.Tensor) -> bool:
    # no complex numbers in traced (torch.jit.trace, classic ONNX) or exported graphs
    return not torch.jit.is_tracing() and not torch.compiler.is_exporting() and rotation.numel() > 0 \
        and x.dtype == rotation.dtype and x.stride(-1) == 1


@register_notrace_module
class SpatialDecay(nn.Module):
    """Rotary and Manhattan-decay tables of one stage, cached per (H, W, device, dtype).

    The full (n, HW, HW) mask is built only when ``with_2d`` asks for it (full-attention stages on
    the materialised-mask paths); the decomposed and blocked paths need only the 1-D masks.
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

    def build(self, H: int, W: int, device: torch.device, dtype: torch.dtype, with_2d: bool) -> DecayTables:
        """Compute the tables from scratch (what the cache stores)."""
        decay = decay_rates(self.num_heads, self.decay_exponent, self.heads_range)
        sin, cos = rotary_tables(rotary_angles(self.head_dim), H, W, device, dtype)
        if dtype == torch.float32 or dtype == torch.float64:
            rotation = torch.stack((cos[..., 0::2], sin[..., 1::2]), dim=-1)
        else:
            rotation = torch.empty(0, device=device, dtype=dtype)
        mask_h, mask_w = decay_masks_1d(decay, H, W, device, dtype)
        if with_2d:
            mask_2d = manhattan_mask(mask_h, mask_w)
        else:
            mask_2d = torch.empty(0, device=device, dtype=dtype)
        return DecayTables(sin, cos, rotation, decay.to(device), mask_h, mask_w, mask_2d)

    def forward(self, H: int, W: int, device: torch.device, dtype: torch.dtype, with_2d: bool) -> DecayTables:
        if torch.jit.is_scripting():
            return self.build(H, W, device, dtype, with_2d)
        return self._cached(H, W, device, dtype, with_2d)

    @torch.jit.unused
    def _cached(self, H: int, W: int, device: torch.device, dtype: torch.dtype, with_2d: bool) -> DecayTables:
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

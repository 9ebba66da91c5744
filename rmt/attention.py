"""MaSA, Manhattan self-attention, and the kernels that compute it.

Attention with a Manhattan decay is ``softmax(q k^T * scale + D) v`` where
``D[h, (i, j), (i', j')] = lambda_h * (|i - i'| + |j - j'|)``. RMT computes it in one of two forms:

* full: over all H*W tokens of the stage at once;
* decomposed: along each row (decay ``lambda_h |j - j'|``), then along each column
  (``lambda_h |i - i'|``) of the row result, never forming an (HW x HW) tensor.

Every form has one *reference* implementation (explicit matmul and softmax, the released code's
math) that each fast path is tested against. The fast paths, chosen by :func:`select_attn_impl`
from the device, dtype and sequence length:

* ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` with the decay as an additive 4-D mask
  (the fused CPU kernel takes only 2-D or 4-D masks; a 3-D one falls back to the math kernel);
* ``bmm`` (short sequences on CPU): heads packed into one contiguous batch, two ``bmm`` calls and a
  softmax; for the 7- to 28-token rows and columns of decomposed stages the fused CPU kernel's fixed
  cost per (batch, head) outweighs its savings;
* ``blocked`` (full form, large inputs): query blocks of image rows, each with its slice of the
  decay built on the fly from the two 1-D masks, so no (n, HW, HW) tensor is ever held;
* ``flex`` (full form, explicit choice): FlexAttention with a ``score_mod`` that computes the decay
  from token indices, so neither the mask nor the score matrix is materialised;
* ``triton`` (both forms; 'auto' on CUDA): the fused kernels of :mod:`rmt.kernels`, which also apply
  the theta shift and add LCE, so MaSA hands them the raw projections.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_function, register_notrace_module
from timm.models._manipulate import checkpoint

from . import kernels
from .decay import DecayTables, theta_shift

__all__ = ['ATTN_IMPLS', 'MaSA', 'select_attn_impl', 'attention_reference', 'full_attention',
           'decomposed_attention', 'needs_2d_mask', 'table_dtype', 'autocast_dtype', 'set_attn_budget']

ATTN_IMPLS = ('auto', 'reference', 'sdpa', 'bmm', 'blocked', 'flex', 'triton')

# Above this many bytes for one (n, HW, HW) decay mask, full-attention stages stop materialising it.
_MASK_BUDGET_BYTES = 64 * 2 ** 20
# The blocked path sizes each query block's slice of the mask to this.
_BLOCK_BYTES = 32 * 2 ** 20
# Without Triton, full attention over at least this many tokens on CUDA uses FlexAttention.
_FLEX_MIN_TOKENS = 1024
# On CPU, float32/64 attention over at most this many tokens per sequence uses the ``bmm`` path.
_BMM_MAX_TOKENS = 32


def set_attn_budget(mask_bytes: Optional[int] = None, block_bytes: Optional[int] = None) -> None:
    """Change the memory thresholds of the automatic dispatch (bytes); ``None`` keeps a value."""
    global _MASK_BUDGET_BYTES, _BLOCK_BYTES
    if mask_bytes is not None:
        _MASK_BUDGET_BYTES = int(mask_bytes)
    if block_bytes is not None:
        _BLOCK_BYTES = int(block_bytes)


@torch.jit.ignore
def _mask_budget() -> int:
    return _MASK_BUDGET_BYTES


@torch.jit.ignore
def _block_budget() -> int:
    return _BLOCK_BYTES


@functools.lru_cache(maxsize=None)
def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    return torch.compile(_flex_attention(), dynamic=False)


def _mask_fits(num_heads: int, tokens: int, x: torch.Tensor) -> bool:
    return num_heads * tokens * tokens * x.element_size() <= _mask_budget()


@torch.jit.ignore
def _bmm_max_tokens() -> int:
    return _BMM_MAX_TOKENS


def _short_on_cpu(tokens: int, x: torch.Tensor) -> bool:
    return x.device.type == 'cpu' and tokens <= _bmm_max_tokens() and \
        (x.dtype == torch.float32 or x.dtype == torch.float64)


def _by_size(decomposed: bool, num_heads: int, height: int, width: int, x: torch.Tensor, short_ok: bool) -> str:
    """'bmm' for short CPU sequences (if ``short_ok``), else 'sdpa' while the 2-D mask fits, else 'blocked'."""
    tokens = height * width
    if short_ok and _short_on_cpu(max(height, width) if decomposed else tokens, x):
        return 'bmm'
    return 'sdpa' if decomposed or _mask_fits(num_heads, tokens, x) else 'blocked'


@torch.jit.unused
def _triton_fits(requested: str, num_heads: int, x: torch.Tensor) -> bool:
    """Whether the Triton kernels take this stage: always on CUDA when they support the shape and dtype,
    on the CPU only when forced (under Triton's interpreter); never in export or tracing, which keep
    the graph to standard operators."""
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    if requested == 'auto' and x.device.type != 'cuda':
        return False
    return kernels.supports(x, x.shape[-1] // num_heads)


def _flex_fits(num_heads: int, x: torch.Tensor) -> bool:
    """FlexAttention's compiled kernels need heads of at least 16 channels."""
    return x.shape[-1] // num_heads >= 16


@torch.jit.unused
def _auto_impl(decomposed: bool, num_heads: int, height: int, width: int, x: torch.Tensor) -> str:
    if torch.compiler.is_exporting():
        return 'sdpa'  # no size-dependent branch in an exported graph
    if torch.jit.is_tracing():  # fvcore, classic ONNX: 'sdpa' while the mask fits (no Python loop to bake in)
        return _by_size(decomposed, num_heads, height, width, x, short_ok=False)
    if not decomposed and x.device.type == 'cuda' and height * width >= _FLEX_MIN_TOKENS \
            and _flex_attention() is not None and _flex_fits(num_heads, x):
        return 'flex'
    # under autocast q, k and v are half precision even when the stage input is not
    return _by_size(decomposed, num_heads, height, width, x, short_ok=not torch.is_autocast_enabled('cpu'))


@register_notrace_function
def select_attn_impl(requested: str, decomposed: bool, num_heads: int, x: torch.Tensor) -> str:
    """The attention path for a stage input ``x`` of shape (B, H, W, C).

    ``requested`` is one of :data:`ATTN_IMPLS`; 'auto' picks by device, dtype and sequence length
    (a decomposed stage's sequences are its rows and columns). Decomposed stages never build an
    (HW x HW) tensor, so for them ``blocked`` and ``flex`` mean ``sdpa``. Where ``triton`` or ``flex``
    cannot run (no Triton, an unsupported head size or dtype, export), another exact path takes over.
    """
    if requested == 'reference' or requested == 'bmm':
        return requested
    if not torch.jit.is_scripting() and (requested == 'auto' or requested == 'triton') \
            and _triton_fits(requested, num_heads, x):
        return 'triton'
    if requested == 'triton':
        requested = 'auto'
    if requested == 'flex' and not _flex_fits(num_heads, x):
        requested = 'blocked'
    if requested != 'auto':
        return 'sdpa' if decomposed else requested
    if torch.jit.is_scripting():
        return _by_size(decomposed, num_heads, x.shape[1], x.shape[2], x, True)
    return _auto_impl(decomposed, num_heads, x.shape[1], x.shape[2], x)


@register_notrace_function
def table_dtype(impl: str, x: torch.Tensor) -> torch.dtype:
    """The dtype of the position tables for ``impl`` on a stage input ``x``: float32 for the Triton kernels
    (they compute in float32 and read the tables as they are); under autocast the dtype q and k will
    have, so the other paths cast nothing per layer; else ``x``'s."""
    if impl == 'triton':
        return torch.float32
    if not torch.jit.is_scripting() and x.is_floating_point():
        dtype = autocast_dtype(x)
        if dtype is not None:
            return dtype
    return x.dtype


@torch.jit.unused
def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``x``'s device, or None where autocast is off."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


@register_notrace_function
def needs_2d_mask(impl: str, decomposed: bool) -> bool:
    """Whether ``impl`` reads the materialised (n, HW, HW) decay mask."""
    return not decomposed and (impl == 'sdpa' or impl == 'bmm' or impl == 'reference')


def attention_reference(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` spelled out; q, k, v (N, n, L, d), bias (n, L, S)."""
    attn = q @ (k * scale).transpose(-2, -1) + bias.to(q.dtype)
    return attn.softmax(dim=-1) @ v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    # a 4-D mask keeps the fused CPU kernel; a 3-D one would fall back to the math path
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0), scale=scale)


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
    """The reference math with every (batch, head) pair packed into one contiguous bmm batch."""
    N, n, L, d = q.shape
    S = k.shape[2]
    scores = torch.bmm(q.reshape(N * n, L, d), k.reshape(N * n, S, d).transpose(1, 2))
    # in place on the bmm output, which its backward does not need
    probs = _softmax(scores.view(N, n, L, S).mul_(scale).add_(bias.to(q.dtype)))
    return torch.bmm(probs.view(N * n, L, S), v.reshape(N * n, S, v.shape[-1])).view(N, n, L, v.shape[-1])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
            impl: str) -> torch.Tensor:
    if impl == 'reference':
        return attention_reference(q, k, v, bias, scale)
    if impl == 'bmm':
        return _bmm(q, k, v, bias, scale)
    return _sdpa(q, k, v, bias, scale)


def _row_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor,
               r0: int, r1: int, scale: float, buffer: torch.Tensor) -> torch.Tensor:
    """Attention of the queries in image rows r0..r1 over all tokens; their decay slice is built in ``buffer``."""
    n, H, W = mask_h.shape[0], mask_h.shape[1], mask_w.shape[1]
    bias = buffer[:n * (r1 - r0) * W * H * W].view(n, r1 - r0, W, H, W)
    torch.add(mask_h[:, r0:r1, None, :, None], mask_w[:, None, :, None, :], out=bias)
    return _sdpa(q, k, v, bias.view(n, (r1 - r0) * W, H * W), scale)


def _blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor,
             scale: float) -> torch.Tensor:
    """Full attention in blocks of image rows; each block builds only its (n, rows*W, HW) decay slice.

    Every block builds its slice in one reused buffer: a fresh slice per block, between the small
    outputs, fragments the heap and grows the process by about a slice per block. With autograd each
    block is checkpointed, so nothing keeps a slice: the backward pass rebuilds it, one block at a time.
    """
    n, H, W = mask_h.shape[0], mask_h.shape[1], mask_w.shape[1]
    N, L, d = q.shape[0], H * W, q.shape[-1]
    rows = min(H, max(1, _block_budget() // max(1, n * W * L * mask_h.element_size())))
    buffer = torch.empty(n * rows * W * L, device=q.device, dtype=mask_h.dtype)
    if torch.is_grad_enabled():
        outs = []
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            q_rows = q[:, :, r0 * W:r1 * W]
            if torch.jit.is_scripting():  # no checkpoint: every block keeps its own slice
                outs.append(_row_block(q_rows, k, v, mask_h, mask_w, r0, r1, scale, torch.empty_like(buffer)))
            else:  # the buffer is bound, not an input: checkpoint must not track its in-place rewrites
                row_block = functools.partial(_row_block, buffer=buffer)
                outs.append(checkpoint(row_block, q_rows, k, v, mask_h, mask_w, r0, r1, scale))
        return torch.cat(outs, dim=2)
    out = torch.empty(N, L, n, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        out[:, :, r0 * W:r1 * W] = _row_block(q[:, :, r0 * W:r1 * W], k, v, mask_h, mask_w, r0, r1, scale, buffer)
    return out


@torch.jit.unused
def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, W: int,
          scale: float) -> torch.Tensor:
    """Full attention with FlexAttention; the decay is computed per score from token indices."""
    decay = decay.to(torch.float32)

    def score_mod(score, b, h, q_idx, kv_idx):
        distance = (q_idx // W - kv_idx // W).abs() + (q_idx % W - kv_idx % W).abs()
        return score + decay[h] * distance

    flex = _compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else _flex_attention()
    return flex(q, k, v, score_mod=score_mod, scale=scale)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: DecayTables, scale: float,
                   impl: str) -> torch.Tensor:
    """Attention over all H*W tokens; q, k, v and the result are (B, H, W, n, d)."""
    B, H, W, n, d = q.shape
    decay, mask_h, mask_w, mask_2d = tables.decay, tables.mask_h, tables.mask_w, tables.mask_2d
    q = q.reshape(B, H * W, n, d).transpose(1, 2)
    k = k.reshape(B, H * W, n, d).transpose(1, 2)
    v = v.reshape(B, H * W, n, d).transpose(1, 2)
    if impl == 'blocked':
        out = _blocked(q, k, v, mask_h, mask_w, scale)
    elif impl == 'flex':
        out = _flex(q, k, v, decay, W, scale)
    elif impl in ('sdpa', 'bmm', 'reference'):
        if mask_2d.numel() == 0:
            raise RuntimeError('the full-attention paths need the 2-D decay mask in the tables')
        out = _attend(q, k, v, mask_2d, scale, impl)
    else:
        raise ValueError('unknown attention implementation ' + impl)
    return out.transpose(1, 2).unflatten(1, (H, W))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, n, d) -> (B*H, n, W, d), a view."""
    return x.permute(0, 1, 3, 2, 4).flatten(0, 1)


def _columns(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, n, d) -> (B*W, n, H, d); (B, W) do not merge in this layout, so a copy unless B == 1."""
    return x.permute(0, 2, 3, 1, 4).flatten(0, 1)


def decomposed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: DecayTables, scale: float,
                         impl: str) -> torch.Tensor:
    """Attention along each row, then along each column of the row result; (B, H, W, n, d) in and out.

    The result is a (B, H, W, n, d) view of the column pass output, in whatever layout its kernel wrote.
    """
    B, H, W, n, d = q.shape
    rows = _attend(_rows(q), _rows(k), _rows(v), tables.mask_w, scale, impl)
    v = rows.unflatten(0, (B, H)).permute(0, 1, 3, 2, 4)
    out = _attend(_columns(q), _columns(k), _columns(v), tables.mask_h, scale, impl)
    return out.unflatten(0, (B, W)).permute(0, 3, 1, 2, 4)


@register_notrace_module
class MaSA(nn.Module):
    """Manhattan self-attention: rotary-shifted q and k, decayed attention, plus LCE on v.

    LCE (local context enhancement) is a depthwise 5x5 conv on v, added to the attention output.
    Works on channels-last (B, H, W, C) features.
    """

    def __init__(self, dim: int, num_heads: int, decomposed: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.decomposed = decomposed
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.lce = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, impl: str, tables: DecayTables) -> torch.Tensor:
        B, H, W, C = x.shape
        # three projections rather than one fused: contiguous outputs, and no slower
        q, k, v = self.q(x), self.k(x), self.v(x)
        lce = self.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if impl == 'triton':
            return self.proj(self._fused(q, k, v, lce, tables))
        shape = (B, H, W, self.num_heads, self.head_dim)
        q, k, v = theta_shift(q.view(shape), tables), theta_shift(k.view(shape), tables), v.view(shape)
        if self.decomposed:
            out = decomposed_attention(q, k, v, tables, self.scale, impl)
        else:
            out = full_attention(q, k, v, tables, self.scale, impl)
        # in place: the sum keeps the conv output's (B, H, W, C) layout and reads ``out`` in whatever
        # layout the attention kernel left it, with no copy
        return self.proj(lce.unflatten(-1, (self.num_heads, self.head_dim)).add_(out).flatten(-2))

    @torch.jit.unused
    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: torch.Tensor,
               tables: DecayTables) -> torch.Tensor:
        """Theta shift, decayed attention and the LCE add in the Triton kernels."""
        return kernels.masa_attention(q, k, v, lce, tables.rotation, tables.decay, self.scale, self.num_heads,
                                      self.decomposed)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, decomposed={self.decomposed}'

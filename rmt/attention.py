"""MaSA, Manhattan self-attention (paper section 3.2), and the paths that compute it.

Attention with a Manhattan decay is ``softmax(q k^T * scale + bias) v`` where
``bias[h, (i, j), (i', j')] = lambda_h * (|i - i'| + |j - j'|)`` (:mod:`rmt.position`). RMT computes
it in one of two forms:

* full: over all H*W tokens of the stage at once;
* decomposed: along each row (bias ``lambda_h |j - j'|``), then along each column
  (``lambda_h |i - i'|``) of the row result, never forming an (HW x HW) tensor.

One path is the *reference* (explicit matmul and softmax, the released code's math) that every
other path is tested against. :func:`plan_attention` picks a path once per stage and forward, from
the device, dtype and sequence lengths (measured side by side with ``scripts/bench_kernels.py``
and ``scripts/benchmark.py``; 2 CPU cores, float32, RMT-S at 224 px, batch 8:
``bench_kernels.py --model rmt_s -b 8 --dtype float32 --device cpu --threads 2 --paths sdpa,bmm``):

* ``triton`` (CUDA, 'auto' wherever the kernels are known to compile): :mod:`rmt.kernels` applies
  the theta shift, the decay bias and the LCE add inside the kernels, so MaSA hands them the raw
  projections. Never materialises a bias or a score matrix.
* ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` with the bias as an additive 4-D mask
  (the fused CPU kernel takes only 2-D or 4-D masks). On the CPU it wins for sequences of more
  than 32 tokens (stage 1's 56-token rows and columns: forward within 15% of ``bmm`` either way,
  forward and backward 1.15-1.65x faster; two runs); it is the CUDA path where the kernels cannot
  run, and the only one in exported graphs.
* ``bmm`` (CPU, float32/64, sequences of at most 32 tokens): heads packed into one batch, two
  ``bmm`` calls and a softmax; for the 7- to 28-token rows and columns of decomposed stages the fused
  kernel's fixed cost per (batch, head) outweighs its savings (forward against ``sdpa``, two
  runs: stage 3's 14-token rows and columns 1.75-2.1x, stage 2's 28-token ones 1.5-1.7x).
* ``blocked`` (full attention whose (n, HW, HW) bias would exceed 64 MiB, e.g. detection sizes):
  query blocks of image rows, each with its own slice of the bias, so memory stays bounded.

The choice of path is read in one place, :func:`masa_attention`. Thresholds sit behind
:func:`set_dispatch_thresholds`; ``RMT_ATTN_IMPL`` or ``model.set_attn_impl`` forces a path.

The Triton op is guarded: the first use of each kernel configuration in a process catches a
compile or launch failure, warns once naming the reason and the fallback, computes that call on
the ``sdpa`` / ``blocked`` path (inside the op, so also under ``torch.compile``), and plans that
configuration off the kernels from then on.
"""
import functools
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.models import checkpoint as grad_checkpoint

from . import kernels
from .position import (
    PositionTables, axis_bias, manhattan_bias, rotation_to_sin_cos, theta_shift, theta_shift_reference)

__all__ = ['ATTN_IMPLS', 'AttentionPlan', 'DispatchThresholds', 'MaSA', 'plan_attention', 'masa_attention',
           'attention_reference', 'full_attention', 'decomposed_attention', 'set_dispatch_thresholds',
           'dispatch_thresholds', 'autocast_dtype', 'kernel_failures', 'clear_kernel_failures']

ATTN_IMPLS = ('auto', 'reference', 'sdpa', 'bmm', 'blocked', 'triton')


class AttentionPlan(NamedTuple):
    """How a stage computes MaSA: the path, the dtype of its position tables, and whether the path reads
    the materialised (n, HW, HW) bias of a full-attention stage."""
    impl: str
    table_dtype: torch.dtype
    needs_2d_bias: bool


def _default_thresholds() -> Tuple[int, int, int]:
    # (bias_bytes, block_bytes, bmm_max_tokens); TorchScript models keep these
    return 64 << 20, 32 << 20, 32


class DispatchThresholds(NamedTuple):
    """The sizes at which 'auto' changes path.

    ``bias_bytes``: a full-attention stage whose (n, HW, HW) bias would take more bytes takes the
    ``blocked`` path; ``block_bytes``: the size of each query block's bias slice there;
    ``bmm_max_tokens``: float32/64 sequences of at most this many tokens take ``bmm`` on the CPU.
    """
    bias_bytes: int
    block_bytes: int
    bmm_max_tokens: int


_thresholds = DispatchThresholds(*_default_thresholds())


def set_dispatch_thresholds(bias_bytes: Optional[int] = None, block_bytes: Optional[int] = None,
                            bmm_max_tokens: Optional[int] = None) -> DispatchThresholds:
    """Change the thresholds of the automatic dispatch (``None`` keeps a value); returns the previous ones,
    so ``set_dispatch_thresholds(*previous)`` restores them. Process-wide; scripted (TorchScript) models
    keep the defaults. Raises ``ValueError`` for negative values."""
    global _thresholds
    previous = _thresholds
    values = previous._replace(**{k: int(v) for k, v in (('bias_bytes', bias_bytes), ('block_bytes', block_bytes),
                                                         ('bmm_max_tokens', bmm_max_tokens)) if v is not None})
    if min(values) < 0:
        raise ValueError(f'dispatch thresholds must be >= 0, got {values}')
    _thresholds = values
    return previous


@torch.jit.unused
def dispatch_thresholds() -> DispatchThresholds:
    """The thresholds in effect (see :class:`DispatchThresholds`)."""
    return _thresholds


def _block_bytes() -> int:
    if torch.jit.is_scripting():
        return _default_thresholds()[1]
    return dispatch_thresholds().block_bytes


@torch.jit.unused
def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``x``'s device, or None where autocast is off."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


# --- planning --------------------------------------------------------------------------------------------

def _by_size(decomposed: bool, num_heads: int, height: int, width: int, x: torch.Tensor, dtype: torch.dtype,
             thresholds: Tuple[int, int, int], short_ok: bool) -> str:
    """'bmm' for short float CPU sequences (if ``short_ok``), else 'sdpa' while the 2-D bias fits, else 'blocked'."""
    tokens = height * width
    longest = max(height, width) if decomposed else tokens
    if short_ok and x.device.type == 'cpu' and longest <= thresholds[2] and \
            (dtype == torch.float32 or dtype == torch.float64):
        return 'bmm'
    if decomposed or num_heads * tokens * tokens * torch.empty(0, dtype=dtype).element_size() <= thresholds[0]:
        return 'sdpa'
    return 'blocked'


def plan_attention(requested: str, decomposed: bool, num_heads: int, x: torch.Tensor) -> AttentionPlan:
    """The attention plan of a stage for its input ``x`` (B, H, W, C).

    ``requested`` is one of :data:`ATTN_IMPLS`. 'auto' takes ``triton`` on CUDA wherever
    :func:`rmt.kernels.unsupported_reason` allows it and no kernel of this configuration has failed in
    this process (float32 only under torch's 'high'/'medium' matmul precision and with Triton 3.8 or
    newer: the IEEE float32 kernels, and older releases' tf32 ones, spill), else picks by size (:func:`set_dispatch_thresholds`). A requested path runs where it
    exists: ``triton`` also on the CPU under ``TRITON_INTERPRET=1``, elsewhere it becomes 'auto';
    ``blocked`` means ``sdpa`` for decomposed stages, which hold no (HW x HW) tensor anyway. Exported
    graphs take ``sdpa`` and traced ones (fvcore, classic ONNX) pick by size without ``bmm``.
    """
    if torch.jit.is_scripting():
        impl = requested
        if requested == 'auto' or requested == 'triton' or (requested == 'blocked' and decomposed):
            impl = _by_size(decomposed, num_heads, x.shape[1], x.shape[2], x, x.dtype, _default_thresholds(), True)
        return AttentionPlan(impl, x.dtype, not decomposed and impl != 'blocked')
    return _plan_eager(requested, decomposed, num_heads, x)


@torch.jit.unused
def _plan_eager(requested: str, decomposed: bool, num_heads: int, x: torch.Tensor) -> AttentionPlan:
    dtype = autocast_dtype(x) if x.is_floating_point() else None
    dtype = dtype or x.dtype  # under autocast q, k and v are half precision even when the stage input is not
    if requested in ('reference', 'bmm', 'sdpa') or (requested == 'blocked' and not decomposed):
        impl = requested
    elif torch.compiler.is_exporting():
        impl = 'sdpa'  # no size-dependent branch in an exported graph
    elif torch.jit.is_tracing():  # fvcore, classic ONNX: no Python loop to bake in
        impl = _by_size(decomposed, num_heads, x.shape[1], x.shape[2], x, dtype, dispatch_thresholds(), False)
    elif requested in ('auto', 'triton') and _triton_takes(requested, decomposed, num_heads, x, dtype):
        impl = 'triton'
    else:
        impl = _by_size(decomposed, num_heads, x.shape[1], x.shape[2], x, dtype, dispatch_thresholds(),
                        not torch.is_autocast_enabled('cpu'))
    table_dtype = torch.float32 if impl == 'triton' else dtype
    return AttentionPlan(impl, table_dtype, not decomposed and impl in ('reference', 'sdpa', 'bmm'))


def _triton_takes(requested: str, decomposed: bool, num_heads: int, x: torch.Tensor, dtype: torch.dtype) -> bool:
    if requested == 'auto' and x.device.type != 'cuda':
        return False
    if _kernels_refuse(str(x.device), dtype, x.shape[-1] // num_heads):
        return False
    if requested == 'auto' and dtype == torch.float32 and (_ieee(dtype) or _old_triton_for_float32()):
        return False  # the IEEE float32 kernels, and tf32 ones before Triton 3.8, spill registers: sdpa is faster
    if torch.compiler.is_compiling():
        return True  # a failure inside the op falls back there
    config = kernels.default_config(x.shape[-1] // num_heads, dtype, _arch(str(x.device)))
    return _config_key(x.device, dtype, x.shape[1], x.shape[2], x.shape[3], num_heads, decomposed, config) \
        not in _kernel_failures


@torch.compiler.assume_constant_result  # the machine, not the data: a constant of compiled graphs
def _kernels_refuse(device: str, dtype: torch.dtype, head_dim: int) -> bool:
    return kernels.unsupported_reason(torch.device(device), dtype, head_dim) is not None


@torch.compiler.assume_constant_result
def _old_triton_for_float32() -> bool:
    return kernels.triton_version() < kernels.FLOAT32_MIN_TRITON


@torch.compiler.assume_constant_result
def _arch(device: str) -> int:
    return kernels.target_arch(torch.device(device))


@torch.compiler.assume_constant_result
def _ieee(dtype: torch.dtype) -> bool:
    """float32 dots in IEEE precision under torch's 'highest' matmul precision, else tf32."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == 'highest'


# --- the torch paths ---------------------------------------------------------------------------------------

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


def _rows_per_block(n: int, H: int, W: int, element_size: int) -> int:
    """Image rows of queries whose bias slice (n, rows * W, H * W) fits the blocked path's budget."""
    return min(H, max(1, _block_bytes() // max(1, n * W * H * W * element_size)))


def _row_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor,
               r0: int, r1: int, scale: float, buffer: torch.Tensor) -> torch.Tensor:
    """Attention of the queries in image rows r0..r1 over all tokens; their bias slice is built in ``buffer``."""
    return _sdpa(q, k, v, manhattan_bias(bias_h, bias_w, (r0, r1), buffer), scale)


def _blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor,
             scale: float) -> torch.Tensor:
    """Full attention in blocks of image rows; each block builds only its (n, rows*W, HW) bias slice.

    Every block builds its slice in one reused buffer: a fresh slice per block, between the small
    outputs, fragments the heap and grows the process by about a slice per block. With autograd each
    block is checkpointed, so nothing keeps a slice: the backward pass rebuilds it, one block at a time.
    """
    n, H, W = bias_h.shape[0], bias_h.shape[1], bias_w.shape[1]
    N, L, d = q.shape[0], H * W, q.shape[-1]
    rows = _rows_per_block(n, H, W, bias_h.element_size())
    buffer = torch.empty(n * rows * W * L, device=q.device, dtype=bias_h.dtype)
    if torch.is_grad_enabled():
        outs = []
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            q_rows = q[:, :, r0 * W:r1 * W]
            if torch.jit.is_scripting():  # no checkpoint: every block keeps its own slice
                outs.append(_row_block(q_rows, k, v, bias_h, bias_w, r0, r1, scale, torch.empty_like(buffer)))
            else:  # the buffer is bound, not an input: checkpoint must not track its in-place rewrites
                row_block = functools.partial(_row_block, buffer=buffer)
                outs.append(grad_checkpoint(row_block, q_rows, k, v, bias_h, bias_w, r0, r1, scale))
        return torch.cat(outs, dim=2)
    out = torch.empty(N, L, n, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        out[:, :, r0 * W:r1 * W] = _row_block(q[:, :, r0 * W:r1 * W], k, v, bias_h, bias_w, r0, r1, scale, buffer)
    return out


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, n, d) -> (B, n, HW, d), a view."""
    return x.flatten(1, 2).transpose(1, 2)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: PositionTables, scale: float,
                   impl: str) -> torch.Tensor:
    """Attention over all H*W tokens; q, k, v and the result are (B, H, W, n, d)."""
    B, H, W, n, d = q.shape
    if impl == 'blocked':
        out = _blocked(_heads_first(q), _heads_first(k), _heads_first(v), tables.bias_h, tables.bias_w, scale)
    else:
        if tables.bias_2d.numel() == 0:
            raise RuntimeError('the full-attention paths need the 2-D bias in the tables')
        out = _attend(_heads_first(q), _heads_first(k), _heads_first(v), tables.bias_2d, scale, impl)
    return out.transpose(1, 2).unflatten(1, (H, W))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, n, d) -> (B*H, n, W, d), a view."""
    return x.permute(0, 1, 3, 2, 4).flatten(0, 1)


def _columns(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, n, d) -> (B*W, n, H, d); (B, W) do not merge in this layout, so a copy unless B == 1."""
    return x.permute(0, 2, 3, 1, 4).flatten(0, 1)


def decomposed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: PositionTables, scale: float,
                         impl: str) -> torch.Tensor:
    """Attention along each row, then along each column of the row result; (B, H, W, n, d) in and out.

    The result is a (B, H, W, n, d) view of the column pass output, in whatever layout its kernel wrote.
    """
    B, H, W, n, d = q.shape
    rows = _attend(_rows(q), _rows(k), _rows(v), tables.bias_w, scale, impl)
    v = rows.unflatten(0, (B, H)).permute(0, 1, 3, 2, 4)
    out = _attend(_columns(q), _columns(k), _columns(v), tables.bias_h, scale, impl)
    return out.unflatten(0, (B, W)).permute(0, 3, 1, 2, 4)


# --- the pipeline -----------------------------------------------------------------------------------------

def masa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: torch.Tensor, tables: PositionTables,
                   plan: AttentionPlan, num_heads: int, decomposed: bool,
                   kernel_config: Optional[List[int]] = None) -> torch.Tensor:
    """MaSA from its raw projections to what ``proj`` reads: ``lce + attention(theta(q), theta(k), v)``.

    q, k, v, lce: (B, H, W, C) channels-last, q and k before the theta shift; ``tables`` from the
    stage's :class:`~rmt.position.RelPos2d` in ``plan.table_dtype``. Returns (B, H, W, C). ``lce``
    is updated in place on the torch paths (pass a tensor this call may own, not a leaf).
    ``kernel_config``: a :class:`rmt.kernels.KernelConfig` for the Triton path (default: its
    :func:`~rmt.kernels.default_config`).
    """
    if plan.impl == 'triton':
        return _masa_triton(q, k, v, lce, tables, num_heads, decomposed, kernel_config)
    B, H, W, C = q.shape
    shape = (B, H, W, num_heads, C // num_heads)
    scale = (C // num_heads) ** -0.5
    q, k, v = theta_shift(q.view(shape), tables), theta_shift(k.view(shape), tables), v.view(shape)
    if decomposed:
        out = decomposed_attention(q, k, v, tables, scale, plan.impl)
    else:
        out = full_attention(q, k, v, tables, scale, plan.impl)
    # in place: the sum keeps the conv output's (B, H, W, C) layout and reads ``out`` in whatever
    # layout the attention kernel left it, with no copy
    return lce.view(shape).add_(out).flatten(-2)


torch.fx.wrap('masa_attention')  # one node in FX graphs: the path is chosen when the graph runs


# --- the Triton op: guard, fallbacks, autograd -----------------------------------------------------------

# configurations whose kernels failed in this process -> the reason
_kernel_failures: Dict[Tuple, str] = {}
# (configuration, direction) whose kernels ran once
_kernel_verified = set()


def _config_key(device: torch.device, dtype: torch.dtype, H: int, W: int, C: int, num_heads: int,
                decomposed: bool, config: List[int]) -> Tuple:
    return str(device), dtype, int(H), int(W), int(C), int(num_heads), bool(decomposed), tuple(config)


def clear_kernel_failures() -> None:
    """Forget the kernel failures of this process: every configuration is tried (and guarded) again."""
    _kernel_failures.clear()
    _kernel_verified.clear()


def kernel_failures() -> Dict[Tuple, str]:
    """The Triton configurations (device, dtype, H, W, C, heads, decomposed, kernel settings) that failed in
    this process, with the reason; MaSA layers of those shapes use the ``sdpa`` / ``blocked`` path."""
    return dict(_kernel_failures)


def _fallback_impl(decomposed: bool, num_heads: int, q: torch.Tensor) -> str:
    return _by_size(decomposed, num_heads, q.shape[1], q.shape[2], q, q.dtype, dispatch_thresholds(), False)


def _guarded(key: Tuple, direction: str, q: torch.Tensor, launches: List) -> bool:
    """Run ``launches`` under ``q``'s device; on the first use of ``(key, direction)`` a failure is recorded
    and reported instead of raised. Returns whether the kernels ran."""
    if key in _kernel_failures:
        return False
    with kernels.device_guard(q.device):
        if (key, direction) in _kernel_verified:
            for launch in launches:
                launch()
            return True
        try:
            for launch in launches:
                launch()
        except Exception as e:  # noqa: BLE001 (compile errors, out of resources, driver errors: all fall back)
            reason = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'[:300]
            _kernel_failures[key] = reason
            device, dtype, H, W, C, heads, decomposed, _ = key
            warnings.warn(
                f'rmt: the Triton MaSA {direction} kernels failed for a {"decomposed" if decomposed else "full"} '
                f'stage of {H}x{W} tokens, {C} channels in {heads} heads, {dtype} on {device} ({reason}); '
                f'using the {_fallback_impl(decomposed, heads, q)} path for it from now on', RuntimeWarning)
            return False
    _kernel_verified.add((key, direction))
    return True


def _tables(rotation: torch.Tensor, decay: torch.Tensor, dtype: torch.dtype, with_2d: bool) -> PositionTables:
    """Position tables in ``dtype`` from the op's float32 rotation pairs and decay rates."""
    H, W = rotation.shape[0], rotation.shape[1]
    sin, cos = rotation_to_sin_cos(rotation)
    bias_h, bias_w = axis_bias(decay, H, rotation.device, dtype), axis_bias(decay, W, rotation.device, dtype)
    bias_2d = manhattan_bias(bias_h, bias_w) if with_2d else bias_h.new_empty(0)
    return PositionTables(sin.to(dtype), cos.to(dtype), rotation.new_empty(0), decay, bias_h, bias_w, bias_2d)


def _fallback_forward(q, k, v, lce, rotation, decay, num_heads, decomposed):
    impl = _fallback_impl(decomposed, num_heads, q)
    tables = _tables(rotation, decay, q.dtype, not decomposed and impl != 'blocked')
    return masa_attention(q, k, v, lce.clone(), tables, AttentionPlan(impl, q.dtype, False), num_heads, decomposed)


def _attention_vjp(q, k, v, bias, scale, grad):
    """Gradients of ``softmax(q k^T * scale + bias) v`` for (N, n, L, d) inputs, written out (no autograd:
    this runs inside an op). Returns (dq, dk, dv)."""
    p = (q @ k.transpose(-2, -1) * scale + bias.to(q.dtype)).softmax(-1)
    dp = grad @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ grad


def _fallback_backward(grad, q, k, v, rotation, decay, num_heads, decomposed):
    """The gradients of the op computed with torch operators (float32 math for half precision inputs)."""
    B, H, W, C = q.shape
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    shape = (B, H, W, num_heads, C // num_heads)
    scale = (C // num_heads) ** -0.5
    sin, cos = [t.to(dtype) for t in rotation_to_sin_cos(rotation)]
    qr = theta_shift_reference(q.to(dtype).view(shape), sin, cos)
    kr = theta_shift_reference(k.to(dtype).view(shape), sin, cos)
    v, grad = v.to(dtype).view(shape), grad.to(dtype).view(shape)
    if decomposed:
        bias_h, bias_w = axis_bias(decay, H, q.device, dtype), axis_bias(decay, W, q.device, dtype)
        rows = _attend(_rows(qr), _rows(kr), _rows(v), bias_w, scale, 'reference').unflatten(0, (B, H))
        rows = rows.permute(0, 1, 3, 2, 4)
        dqc, dkc, d_rows = _attention_vjp(_columns(qr), _columns(kr), _columns(rows), bias_h, scale, _columns(grad))
        back = lambda t: t.unflatten(0, (B, W)).permute(0, 3, 1, 2, 4)  # noqa: E731
        d_rows = back(d_rows)
        dqr, dkr, dv = _attention_vjp(_rows(qr), _rows(kr), _rows(v), bias_w, scale, _rows(d_rows))
        fwd = lambda t: t.unflatten(0, (B, H)).permute(0, 1, 3, 2, 4)  # noqa: E731
        dq, dk, dv = back(dqc) + fwd(dqr), back(dkc) + fwd(dkr), fwd(dv)
    else:
        dq, dk, dv = _full_vjp(qr, kr, v, decay, scale, grad)
    dq, dk = theta_shift_reference(dq, sin, cos, inverse=True), theta_shift_reference(dk, sin, cos, inverse=True)
    return tuple(t.reshape(B, H, W, C).to(q.dtype) for t in (dq, dk, dv))


def _full_vjp(q, k, v, decay, scale, grad):
    """:func:`_attention_vjp` of full attention in blocks of image rows, (B, H, W, n, d) tensors."""
    B, H, W, n, d = q.shape
    bias_h, bias_w = axis_bias(decay, H, q.device, q.dtype), axis_bias(decay, W, q.device, q.dtype)
    q, k, v, grad = _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(grad)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rows = _rows_per_block(n, H, W, 2 * q.element_size())
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        block = slice(r0 * W, r1 * W)
        dq[:, :, block], dk_part, dv_part = _attention_vjp(
            q[:, :, block], k, v, manhattan_bias(bias_h, bias_w, (r0, r1)), scale, grad[:, :, block])
        dk += dk_part
        dv += dv_part
    return tuple(t.transpose(1, 2).unflatten(1, (H, W)) for t in (dq, dk, dv))


@torch.library.custom_op('rmt::masa', mutates_args=())
def _masa_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: torch.Tensor, rotation: torch.Tensor,
        decay: torch.Tensor, num_heads: int, decomposed: bool, keep_stats: bool, ieee: bool, config: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lce + MaSA attention, log-sum-exp of the first pass, of the second)``; see :func:`_masa_triton`."""
    q, k, v, lce = q.contiguous(), k.contiguous(), v.contiguous(), lce.contiguous()
    cfg = kernels.KernelConfig(*config)
    scale = (q.shape[-1] // num_heads) ** -0.5
    out, stats, launches = kernels.masa_forward(
        _depth(q), _depth(k), _depth(v), _depth(lce), rotation.contiguous().unsqueeze(0), decay.contiguous(), scale,
        num_heads, kernels.pass_modes(2, decomposed), keep_stats, ieee, cfg)
    out = out.squeeze(1)
    stats = stats + [q.new_zeros(0, dtype=torch.float32)] * (2 - len(stats))
    if q.numel() == 0:
        return out, stats[0], stats[1]
    key = _config_key(q.device, q.dtype, *q.shape[1:], num_heads, decomposed, config)
    if not _guarded(key, 'forward', q, launches):
        out = _fallback_forward(q, k, v, lce, rotation, decay, num_heads, decomposed)
    return out, stats[0], stats[1]


@_masa_op.register_fake
def _(q, k, v, lce, rotation, decay, num_heads, decomposed, keep_stats, ieee, config):
    shapes = kernels.stats_shapes(_depth(q), num_heads, kernels.pass_modes(2, decomposed), keep_stats,
                                  kernels.KernelConfig(*config)) + [(0,)]
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(shapes[0], dtype=torch.float32), q.new_empty(shapes[1], dtype=torch.float32)


@torch.library.custom_op('rmt::masa_backward', mutates_args=())
def _masa_backward_op(
        grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lce: torch.Tensor,
        stats0: torch.Tensor, stats1: torch.Tensor, rotation: torch.Tensor, decay: torch.Tensor,
        num_heads: int, decomposed: bool, ieee: bool, config: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k (before the theta shift) and v of ``rmt::masa`` from the gradient of its output."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad = grad.contiguous()
    cfg = kernels.KernelConfig(*config)
    scale = (q.shape[-1] // num_heads) ** -0.5
    key = _config_key(q.device, q.dtype, *q.shape[1:], num_heads, decomposed, config)
    if key not in _kernel_failures:
        passes = kernels.pass_modes(2, decomposed)
        dq, dk, dv, launches = kernels.masa_backward(
            _depth(grad), _depth(q), _depth(k), _depth(v), _depth(out), _depth(lce), [stats0, stats1][:len(passes)],
            rotation.unsqueeze(0), decay, scale, num_heads, passes, ieee, cfg)
        if _guarded(key, 'backward', q, launches):
            return dq.squeeze(1), dk.squeeze(1), dv.squeeze(1)
    return _fallback_backward(grad, q, k, v, rotation, decay, num_heads, decomposed)


@_masa_backward_op.register_fake
def _(grad, q, k, v, out, lce, stats0, stats1, rotation, decay, num_heads, decomposed, ieee, config):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _last_pass_looped(q: torch.Tensor, decomposed: bool, config: List[int]) -> bool:
    H, W = q.shape[1], q.shape[2]
    return kernels.looped(kernels.pass_modes(2, decomposed)[-1], (1, H, W), kernels.KernelConfig(*config))


def _depth(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, W, C) map as the kernels' (B, 1, H, W, C) grid of depth 1 (a view); an empty placeholder as it is."""
    return x.unsqueeze(1) if x.dim() == 4 else x


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, lce, rotation, decay, num_heads, decomposed, _keep, ieee, config = inputs
    out, stats0, stats1 = output
    if not _last_pass_looped(q, decomposed, config):  # only a looped last pass reads its output back
        out, lce = out.new_empty(0), lce.new_empty(0)
    ctx.save_for_backward(q, k, v, out, lce, stats0, stats1, rotation, decay)
    ctx.config = (num_heads, decomposed, ieee, config)


def _backward(ctx, grad, _grad_stats0, _grad_stats1):
    dq = dk = dv = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = _masa_backward_op(grad, *ctx.saved_tensors, *ctx.config)
    return dq, dk, dv, grad, None, None, None, None, None, None, None


_masa_op.register_autograd(_backward, setup_context=_setup_context)


@torch.jit.unused
def _masa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: torch.Tensor, tables: PositionTables,
                 num_heads: int, decomposed: bool, config: Optional[List[int]]) -> torch.Tensor:
    """The ``rmt::masa`` op on the raw projections: float32 tables, the kernel settings of
    :func:`rmt.kernels.default_config` for the device unless given, statistics kept only when a backward
    will come."""
    keep_stats = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    config = config or kernels.default_config(q.shape[-1] // num_heads, q.dtype, _arch(str(q.device)))
    out, _, _ = _masa_op(q, k, v, lce.to(q.dtype), tables.rotation, tables.decay, int(num_heads), bool(decomposed),
                         keep_stats, _ieee(q.dtype), list(config))
    return out


class MaSA(nn.Module):
    """Manhattan self-attention: rotary-shifted q and k, decayed attention, plus LCE on v.

    LCE (local context enhancement) is a depthwise 5x5 conv on v, added to the attention output.
    Works on channels-last (B, H, W, C) features; the stage's :class:`AttentionPlan` and position
    tables come in with them.
    """

    def __init__(self, dim: int, num_heads: int, decomposed: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decomposed = decomposed
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.lce = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, tables: PositionTables) -> torch.Tensor:
        # three projections rather than one fused: contiguous outputs, and no slower
        q, k, v = self.q(x), self.k(x), self.v(x)
        lce = self.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(masa_attention(q, k, v, lce, tables, plan, self.num_heads, self.decomposed))

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, decomposed={self.decomposed}'

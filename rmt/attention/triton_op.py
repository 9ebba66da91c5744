"""The ``rmt::masa`` op: MaSA on the Triton kernels, guarded, with torch fallbacks and autograd.

The op takes MaSA's raw channels-last projections (B, *grid, C) (heads interleaved in C), the
rotary table (or none: no theta shift) and the per-head log decay, and returns
``residual + attention(theta(q), theta(k), v)``. Its launches come from :mod:`.kernels`.

Guard: the first use of each kernel configuration in a process (:func:`config_key`) catches a
compile or launch failure, warns once naming the reason and the fallback, computes that call with
torch operators (inside the op, so also under ``torch.compile``), and plans that configuration off
the kernels from then on (:func:`configuration_failed`). A failing backward kernel gives exact
gradients from torch operators. Kernels that run are checked against those torch operators on first
use (:mod:`.verify`); wrong results are handled as a failure.
"""
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from . import kernels, verify
from .paths import attention_reference, blocked_attention, decomposed_attention, from_sequences, movedim, sequences
from ..position import axis_bias, rotation_to_sin_cos, theta_shift_reference

__all__ = ['masa_triton', 'kernel_failures', 'clear_kernel_failures', 'configuration_failed', 'config_key']

# configurations whose kernels failed in this process -> the reason
_kernel_failures: Dict[Tuple, str] = {}
# (configuration, direction) whose kernels ran once (later failures raise)
_kernel_ran = set()


def config_key(device: torch.device, dtype: torch.dtype, grid: List[int], channels: int, num_heads: int,
               decomposed: bool, config: List[int]) -> Tuple:
    """The key of a kernel configuration: what fixes the compiled kernels (the batch does not)."""
    return str(device), dtype, tuple(int(s) for s in grid), int(channels), int(num_heads), bool(decomposed), \
        tuple(config)


def clear_kernel_failures() -> None:
    """Forget the kernel failures and checks of this process: every configuration is tried, guarded and
    verified again."""
    _kernel_failures.clear()
    _kernel_ran.clear()
    verify._clear()


def kernel_failures() -> Dict[Tuple, str]:
    """The Triton configurations (device, dtype, grid, channels, heads, decomposed, kernel settings) that failed
    or gave wrong results in this process, with the reason; MaSA calls of those shapes use torch paths.
    :func:`~rmt.attention.verify.kernel_report` lists the verified ones too."""
    return dict(_kernel_failures)


def _arch(device: torch.device) -> int:
    return kernels.target_arch(device)


def configuration_failed(problem, device: torch.device) -> bool:
    """Whether the kernels of this call's configuration (a :class:`~rmt.attention.backends.Problem`) failed
    earlier in this process."""
    if not _kernel_failures:
        return False
    config = kernels.default_config(problem.head_dim, problem.dtype, _arch(device))
    key = config_key(device, problem.dtype, problem.grid, problem.num_heads * problem.head_dim, problem.num_heads,
                     problem.decomposed, list(config))
    return key in _kernel_failures


def _fail(key: Tuple, direction: str, reason: str, what: str = 'failed') -> None:
    """Record that ``key``'s kernels ``what`` (failed, gave wrong results) for ``reason`` and warn once; the
    configuration runs on torch operators from then on."""
    _kernel_failures[key] = reason if what == 'failed' else f'{what}: {reason}'
    device, dtype, grid, C, heads, decomposed, _ = key
    warnings.warn(
        f'rmt: the Triton MaSA {direction} kernels {what} for {"decomposed" if decomposed else "full"} '
        f'attention over a {"x".join(map(str, grid))} grid, {C} channels in {heads} heads, {dtype} on '
        f'{device} ({reason}); using torch operators (sdpa / blocked) for it from now on', RuntimeWarning)


def _guarded(key: Tuple, direction: str, q: torch.Tensor, launches: List) -> bool:
    """Run ``launches`` under ``q``'s device; on the first use of ``(key, direction)`` a failure is recorded
    and reported instead of raised. Returns whether the kernels ran."""
    if key in _kernel_failures:
        return False
    with kernels.device_guard(q.device):
        if (key, direction) in _kernel_ran:
            for launch in launches:
                launch()
            return True
        try:
            for launch in launches:
                launch()
        except Exception as e:  # noqa: BLE001 (compile errors, out of resources, driver errors: all fall back)
            reason = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'[:300]
            _fail(key, direction, reason)
            verify._record(key, direction, 'failed', None, reason)
            return False
    _kernel_ran.add((key, direction))
    return True


# --- torch fallbacks (inside the op: no autograd) ----------------------------------------------------------

def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, *grid, C) -> the heads-first view (B, n, *grid, d)."""
    return movedim(x.unflatten(-1, (num_heads, -1)), -2, 1)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, n, *grid, d) -> (B, *grid, C)."""
    return movedim(x, 1, -2).flatten(-2)


def _shifted(x: torch.Tensor, rotation: torch.Tensor, num_heads: int, dtype: torch.dtype,
             inverse: bool = False) -> torch.Tensor:
    x = x.to(dtype).unflatten(-1, (num_heads, -1))
    if rotation.numel() == 0:
        return x
    sin, cos = [t.to(dtype) for t in rotation_to_sin_cos(rotation)]
    return theta_shift_reference(x, sin, cos, inverse)


def _fallback_forward(q, k, v, residual, rotation, decay, num_heads: int, decomposed: bool) -> torch.Tensor:
    scale = (q.shape[-1] // num_heads) ** -0.5
    qr, kr = [movedim(_shifted(t, rotation, num_heads, q.dtype), -2, 1) for t in (q, k)]
    vh = _heads(v, num_heads)
    if decomposed or q.dim() == 3:
        out, _ = decomposed_attention(qr, kr, vh, decay, [], scale, 'sdpa')
    else:
        out = blocked_attention(qr, kr, vh, decay, None, scale)
    out = _channels_last(out)
    return out + residual if residual.numel() > 0 else out.contiguous()


def _attention_vjp(q, k, v, bias, scale, grad):
    """Gradients of ``softmax(q k^T * scale + bias) v`` for (N, n, L, d) inputs, written out: (dq, dk, dv)."""
    p = (q @ k.transpose(-2, -1) * scale + bias.to(q.dtype)).softmax(-1)
    dp = grad @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ grad


def _fallback_backward(grad, q, k, v, rotation, decay, num_heads: int, decomposed: bool, cast: bool = True):
    """The op's gradients with torch operators (float32 math for half precision inputs, returned in q's dtype,
    or in float32 without ``cast``)."""
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = (q.shape[-1] // num_heads) ** -0.5
    qr, kr = [movedim(_shifted(t, rotation, num_heads, dtype), -2, 1) for t in (q, k)]
    vh, gh = _heads(v.to(dtype), num_heads), _heads(grad.to(dtype), num_heads)
    grid = list(q.shape[1:-1])
    if decomposed or len(grid) == 1:
        axes = list(range(len(grid) - 1, -1, -1))
        values = [vh]
        for axis in axes[:-1]:  # the inputs of every pass after the first
            bias = axis_bias(decay, grid[axis], q.device, dtype)
            out = attention_reference(sequences(qr, axis), sequences(kr, axis), sequences(values[-1], axis), bias,
                                      scale)
            values.append(from_sequences(out, qr, axis))
        dq, dk, g = torch.zeros_like(qr), torch.zeros_like(kr), gh
        for i in range(len(axes) - 1, -1, -1):
            axis = axes[i]
            bias = axis_bias(decay, grid[axis], q.device, dtype)
            dqs, dks, dvs = _attention_vjp(sequences(qr, axis), sequences(kr, axis), sequences(values[i], axis), bias,
                                           scale, sequences(g, axis))
            dq, dk = dq + from_sequences(dqs, qr, axis), dk + from_sequences(dks, qr, axis)
            g = from_sequences(dvs, qr, axis)
        dv = g
    else:
        from .paths import _blocked_backward
        dq, dk, dv, _ = _blocked_backward(gh, qr, kr, vh, decay, None, scale, 32 << 20, False)
    dq, dk = [_shifted(_channels_last(t), rotation, num_heads, dtype, inverse=True).flatten(-2) for t in (dq, dk)]
    return tuple(t.to(q.dtype if cast else dtype).contiguous() for t in (dq, dk, _channels_last(dv)))


def _precise(*tensors: torch.Tensor) -> List[torch.Tensor]:
    """Half precision tensors in float32, for the exact path that checks the kernels."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


# --- the op ---------------------------------------------------------------------------------------------

def _as_5d(x: torch.Tensor) -> torch.Tensor:
    """(B, *grid, C) with 1 to 3 grid axes -> (B, D, H, W, C), a view."""
    while x.dim() < 5:
        x = x.unsqueeze(1)
    return x


def _rotation_5d(rotation: torch.Tensor, ndim: int) -> Optional[torch.Tensor]:
    if rotation.numel() == 0:
        return None
    for _ in range(3 - ndim):
        rotation = rotation.unsqueeze(0)
    return rotation.contiguous()


def _passes(ndim: int, decomposed: bool) -> Tuple[str, ...]:
    return kernels.pass_modes(ndim, decomposed)


def _stats_outputs(stats: List[torch.Tensor], q: torch.Tensor) -> List[torch.Tensor]:
    return stats + [q.new_zeros(0, dtype=torch.float32) for _ in range(3 - len(stats))]


@torch.library.custom_op('rmt::masa', mutates_args=())
def _masa_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor, rotation: torch.Tensor,
        decay: torch.Tensor, num_heads: int, decomposed: bool, keep_stats: bool, ieee: bool, config: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(residual + MaSA attention, the log-sum-exp of each pass)``; see :func:`masa_triton`."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    ndim = q.dim() - 2
    cfg = kernels.KernelConfig(*config)
    scale = (q.shape[-1] // num_heads) ** -0.5
    res = _as_5d(residual.contiguous()) if residual.numel() > 0 else None
    out, stats, launches = kernels.masa_forward(
        _as_5d(q), _as_5d(k), _as_5d(v), res, _rotation_5d(rotation, ndim), decay.contiguous(), scale, num_heads,
        _passes(ndim, decomposed), keep_stats, ieee, cfg)
    out = out.view(q.shape)
    stats = _stats_outputs(stats, q)
    if q.numel() == 0:
        return out, stats[0], stats[1], stats[2]
    key = config_key(q.device, q.dtype, list(q.shape[1:-1]), q.shape[-1], num_heads, decomposed, config)
    if not _guarded(key, 'forward', q, launches):
        out = _fallback_forward(q, k, v, residual, rotation, decay, num_heads, decomposed)
    else:
        out, = verify.check(key, 'forward', (out,), lambda: (_fallback_forward(
            *_precise(q, k, v, residual), rotation, decay, num_heads, decomposed),), ieee, num_heads, _fail)
    return out, stats[0], stats[1], stats[2]


@_masa_op.register_fake
def _(q, k, v, residual, rotation, decay, num_heads, decomposed, keep_stats, ieee, config):
    ndim = q.dim() - 2
    shapes = kernels.stats_shapes(_as_5d(q), num_heads, _passes(ndim, decomposed), keep_stats,
                                  kernels.KernelConfig(*config))
    shapes = list(shapes) + [(0,)] * (3 - len(shapes))
    return (torch.empty_like(q, memory_format=torch.contiguous_format),) + \
        tuple(q.new_empty(s, dtype=torch.float32) for s in shapes)


@torch.library.custom_op('rmt::masa_backward', mutates_args=())
def _masa_backward_op(
        grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        residual: torch.Tensor, stats0: torch.Tensor, stats1: torch.Tensor, stats2: torch.Tensor,
        rotation: torch.Tensor, decay: torch.Tensor, num_heads: int, decomposed: bool, ieee: bool, config: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k (before the theta shift) and v of ``rmt::masa`` from the gradient of its output."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad = grad.contiguous()
    ndim = q.dim() - 2
    cfg = kernels.KernelConfig(*config)
    scale = (q.shape[-1] // num_heads) ** -0.5
    key = config_key(q.device, q.dtype, list(q.shape[1:-1]), q.shape[-1], num_heads, decomposed, config)
    if key not in _kernel_failures:
        passes = _passes(ndim, decomposed)
        stats = [stats0, stats1, stats2][:len(passes)]
        res = _as_5d(residual) if residual.numel() > 0 else None
        o = _as_5d(out) if out.numel() > 0 else out
        dq, dk, dv, launches = kernels.masa_backward(
            _as_5d(grad), _as_5d(q), _as_5d(k), _as_5d(v), o, res, stats, _rotation_5d(rotation, ndim), decay,
            scale, num_heads, passes, ieee, cfg)
        if _guarded(key, 'backward', q, launches):
            return verify.check(key, 'backward', (dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)),
                                lambda: _fallback_backward(grad, q, k, v, rotation, decay, num_heads, decomposed,
                                                           cast=False), ieee, num_heads, _fail)
    return _fallback_backward(grad, q, k, v, rotation, decay, num_heads, decomposed)


@_masa_backward_op.register_fake
def _(grad, q, k, v, out, residual, stats0, stats1, stats2, rotation, decay, num_heads, decomposed, ieee, config):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _last_pass_looped(q: torch.Tensor, decomposed: bool, config: List[int]) -> bool:
    grid = _as_5d(q).shape[1:4]
    return kernels.looped(_passes(q.dim() - 2, decomposed)[-1], tuple(grid), kernels.KernelConfig(*config))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, residual, rotation, decay, num_heads, decomposed, _keep, ieee, config = inputs
    out, stats0, stats1, stats2 = output
    if not _last_pass_looped(q, decomposed, config):  # only a looped last pass reads its output back
        out, residual = out.new_empty(0), residual.new_empty(0)
    ctx.save_for_backward(q, k, v, out, residual, stats0, stats1, stats2, rotation, decay)
    ctx.config = (num_heads, decomposed, ieee, config)
    ctx.residual_shape = residual.shape


def _backward(ctx, grad, _grad_stats0, _grad_stats1, _grad_stats2):
    dq = dk = dv = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = _masa_backward_op(grad, *ctx.saved_tensors, *ctx.config)
    d_residual = grad if ctx.needs_input_grad[3] else None
    return dq, dk, dv, d_residual, None, None, None, None, None, None, None


_masa_op.register_autograd(_backward, setup_context=_setup_context)


@torch.jit.unused
def masa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: Optional[torch.Tensor],
                rotation: Optional[torch.Tensor], decay: torch.Tensor, num_heads: int, decomposed: bool,
                config: Optional[List[int]] = None, ieee: bool = False) -> torch.Tensor:
    """``residual + attention(theta(q), theta(k), v)`` on the kernels, for channels-last (B, *grid, C) q, k, v.

    ``rotation``: the float32 (*grid, 1, d/2, 2) (cos, sin) table, or None for no theta shift;
    ``decay``: (n,) log decay; ``residual``: added to the output (the LCE), or None. ``config``: a
    :class:`~rmt.attention.kernels.KernelConfig` (default: :func:`~rmt.attention.kernels.default_config`
    for the device). Statistics are kept only when a backward will come. Returns (B, *grid, C).
    """
    keep_stats = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    config = config or kernels.default_config(q.shape[-1] // num_heads, q.dtype, _arch(q.device))
    residual = q.new_empty(0) if residual is None else residual.to(q.dtype)
    rotation = q.new_empty(0, dtype=torch.float32) if rotation is None else rotation
    out = _masa_op(q, k, v, residual, rotation, decay.float(), int(num_heads), bool(decomposed), keep_stats, ieee,
                   list(config))[0]
    return out

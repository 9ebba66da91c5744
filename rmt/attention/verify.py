"""The Triton kernels check their own numbers: every kernel configuration against the exact torch path on
first use (the self-test of every configuration of the RMT models, ``python -m rmt --self-test``, is
:mod:`rmt.tools.self_test`).

**On first use** (the op ``rmt::masa`` calls :func:`check`): the first time a kernel configuration
(:func:`~rmt.attention.triton_op.config_key`: device, dtype, grid, channels, heads, form, kernel
settings) runs in a direction in a process, the op computes the same call with the exact torch
operators too (forward: the output; backward: dq, dk and dv, each on its own) and compares. The
check lives inside the op, so it runs in eager and compiled models alike, under autocast (the
reference computes with autocast off) and with gradient checkpointing (the recomputed forward is
the configuration's second use: not checked again). Each DDP process checks its own device (the
key holds it). A mismatch is handled as a kernel failure: one ``RuntimeWarning`` naming the
configuration, the largest error and where it is; the call returns the exact path's result; the
configuration runs on torch operators from then on and ``auto`` plans it off the kernels. A
verified configuration runs the kernels alone.

**Cost**: one exact forward (or backward) per configuration and direction in a process, e.g. for
``rmt_s`` four forward and four backward checks at the first training step; measured by
``scripts/bench_kernels.py --verify-cost``.

**Controls**: ``RMT_VERIFY_KERNELS=first`` (the default), ``always`` (every call: for debugging a
suspicious run) or ``off`` (no check: benchmarks), or :func:`set_kernel_verification`.
:func:`kernel_report` lists what was checked, with the errors, for a bug report.

**Tolerances** (:data:`TOLERANCES`): the error of a tensor is ``max |kernel - exact| / max |exact|``,
relative to its scale, with half precision inputs against a float32 computation. float16 and the
float32 kernels (TF32 dots, 10-bit mantissa) are allowed 1e-2; bfloat16 (8-bit mantissa: 8 times
float16's rounding) 4e-2; float32 with IEEE dots (``torch.set_float32_matmul_precision('highest')``)
1e-4. Measured errors (``tests/test_verify.py``) stay at a fifth of these or below, while a wrong
mask, index or missing row gives errors of order 1.
"""
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = ['MODES', 'ENV', 'TOLERANCES', 'KernelCheck', 'kernel_verification', 'set_kernel_verification',
           'kernel_report', 'tolerance', 'compare']

MODES = ('first', 'always', 'off')
ENV = 'RMT_VERIFY_KERNELS'
TOLERANCES: Dict[torch.dtype, float] = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-2}
IEEE_TOLERANCE = 1e-4

_mode: Optional[str] = None  # None: from the environment variable at the next call


def _parse(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f'{source}={mode!r}: expected one of {", ".join(MODES)}')
    return mode


def kernel_verification() -> str:
    """When the op checks the kernels: ``'first'`` (first use of each configuration and direction),
    ``'always'`` or ``'off'``; from :func:`set_kernel_verification`, else ``$RMT_VERIFY_KERNELS`` (default
    ``first``). Raises ``ValueError`` for another value of the variable."""
    global _mode
    if _mode is None:
        _mode = _parse(os.environ.get(ENV, 'first') or 'first', ENV)
    return _mode


def set_kernel_verification(mode: Optional[str]) -> Optional[str]:
    """Set when the op checks the kernels (see :func:`kernel_verification`); ``None`` goes back to the
    environment variable. Returns the previous setting, so ``set_kernel_verification(previous)`` restores it.
    Process-wide. Raises ``ValueError`` for a value not in :data:`MODES`."""
    global _mode
    previous = _mode
    _mode = None if mode is None else _parse(mode, 'set_kernel_verification: mode')
    kernel_verification()  # a bad environment variable fails here, not inside a model
    return previous


def tolerance(dtype: torch.dtype, ieee: bool = False) -> float:
    """The largest error (relative to the exact result's scale) the kernels may make in ``dtype``."""
    if dtype == torch.float32 and ieee:
        return IEEE_TOLERANCE
    return TOLERANCES.get(dtype, IEEE_TOLERANCE)


def _largest_error(got: torch.Tensor, want: torch.Tensor) -> Tuple[float, int]:
    """(max |got - want| / max |want|, flat index of the largest difference); where ``want`` is not finite
    (an input that was) nothing is judged, a non-finite ``got`` elsewhere is an infinite error."""
    got, want = got.detach().float(), want.detach().float()
    finite = torch.isfinite(want)
    diff = torch.where(finite, (got - want).abs().nan_to_num(nan=float('inf')), 0.)
    scale = torch.where(finite, want.abs(), 0.).max().clamp_min(torch.finfo(torch.float32).tiny)
    index = int(diff.flatten().argmax()) if diff.numel() else 0
    return (diff.flatten()[index] / scale).item() if diff.numel() else 0., index


def _where(shape: Sequence[int], index: int, num_heads: int) -> str:
    """'batch b, token (i, j), channel c (head h)' of a flat index into a (B, *grid, C) tensor."""
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index //= size
    b, *token, c = reversed(coords)
    return f'batch {b}, token {tuple(token) if len(token) > 1 else token[0]}, channel {c} ' \
           f'(head {c // (shape[-1] // num_heads)})'


class Mismatch(NamedTuple):
    name: str         # the tensor: output, dq, dk or dv
    error: float      # max |kernel - exact| / max |exact|
    tolerance: float
    where: str

    def __str__(self) -> str:
        return f'largest error {self.error:.2e} of the result\'s scale (tolerance {self.tolerance:.0e}) ' \
               f'in {self.name} at {self.where}'


def compare(pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]], tol: float,
            num_heads: int) -> Tuple[float, Optional[Mismatch]]:
    """Compare named (kernel, exact) pairs of (B, *grid, C) tensors: (the largest error, the worst
    :class:`Mismatch` over ``tol`` or None)."""
    worst, mismatch = 0., None
    for name, (got, want) in pairs.items():
        error, index = _largest_error(got, want)
        if error > tol and (mismatch is None or error > mismatch.error):
            mismatch = Mismatch(name, error, tol, _where(got.shape, index, num_heads))
        worst = max(worst, error)
    return worst, mismatch


# --- what was checked in this process ----------------------------------------------------------------------

class KernelCheck(NamedTuple):
    """One kernel configuration and direction as it went in this process (see :func:`kernel_report`)."""
    config: Tuple   # config_key: device, dtype, grid, channels, heads, decomposed, kernel settings
    direction: str  # forward or backward
    status: str     # verified, unchecked (verification off), failed (raised) or mismatch
    error: Optional[float]  # the largest error seen (relative to the result's scale), None if not compared
    detail: str     # the failure's reason or the mismatch

    def __str__(self) -> str:
        device, dtype, grid, C, heads, decomposed, config = self.config
        error = '' if self.error is None else f' error {self.error:.1e}'
        return (f'{self.status:<9} {self.direction:<8} {"decomposed" if decomposed else "full":<10} '
                f'{"x".join(map(str, grid)):>9} C={C} heads={heads} {str(dtype).replace("torch.", "")} {device} '
                f'settings {list(config)}{error}{": " + self.detail if self.detail else ""}')


_checks: Dict[Tuple[Tuple, str], KernelCheck] = {}


def kernel_report() -> List[KernelCheck]:
    """Every kernel configuration and direction that ran in this process: verified, unchecked, failed or
    mismatch, with the largest error and the reason; ``print(*kernel_report(), sep='\\n')`` for a bug report."""
    return list(_checks.values())


def _record(key: Tuple, direction: str, status: str, error: Optional[float] = None, detail: str = '') -> None:
    old = _checks.get((key, direction))
    if old is not None and old.error is not None and status == old.status == 'verified':
        error = max(error, old.error)
    _checks[(key, direction)] = KernelCheck(key, direction, status, error, detail)


def _clear() -> None:
    _checks.clear()


def _due(key: Tuple, direction: str) -> bool:
    """Whether this call of ``(key, direction)`` is checked against the exact path."""
    mode = kernel_verification()
    if mode == 'off':
        return False
    return mode == 'always' or _checks.get((key, direction), KernelCheck(key, direction, '', None, '')).status \
        != 'verified'


def check(key: Tuple, direction: str, got: Sequence[torch.Tensor], exact, ieee: bool, num_heads: int, fail):
    """The op's check of one kernel call: ``exact()`` (a tuple like ``got``: the torch path, autocast off)
    against ``got``, when due (:func:`kernel_verification`). Returns ``got``, or on a mismatch the exact
    result in ``got``'s dtypes after ``fail(key, direction, reason, what)`` (the op's failure handler:
    it records the configuration as failed and warns once)."""
    if not _due(key, direction):
        if (key, direction) not in _checks:
            _record(key, direction, 'unchecked')
        return got
    device = got[0].device
    with torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else _nothing():
        want = exact()
    names = ('output',) if direction == 'forward' else ('dq', 'dk', 'dv')
    error, mismatch = compare(dict(zip(names, zip(got, want))), tolerance(key[1], ieee), num_heads)
    if mismatch is None:
        _record(key, direction, 'verified', error)
        return got
    fail(key, direction, str(mismatch), 'gave wrong results')
    _record(key, direction, 'mismatch', error, str(mismatch))
    return tuple(w.to(g.dtype).contiguous() for g, w in zip(got, want))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

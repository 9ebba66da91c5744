"""Which path computes a MaSA call: an ordered table of backends, the first that can run is taken.

Each backend answers two questions about a call (:class:`Problem`), each with a reason or ``None``:

* ``input_reason``: an input it cannot honour (prefix tokens, a padding mask, a per-token decay, a
  decay that needs a gradient). Forcing such a backend raises ``ValueError`` with the reason: an
  input is never ignored.
* ``runtime_reason``: where or when it cannot run (no CUDA or Triton, TorchScript, an exported
  graph; for ``auto`` also where it would be slower: sequence lengths, bias size). Forcing such a
  backend warns once with the reason and runs ``auto``, so a model forced to a path stays portable.

The table, in the order ``auto`` tries it:

================ ===========================================================================
``triton``       CUDA kernels (:mod:`rmt.attention.kernels`): theta shift, decay and LCE add in
                 registers, no bias or score matrix in memory. Static per-head decay only.
``bmm``          CPU, float32/64, sequences of at most ``bmm_max_tokens``: heads packed in one
                 ``bmm`` batch (the fused kernel's fixed cost per head outweighs its savings there).
``sdpa``         PyTorch's fused attention with the decay as a 4-D additive mask, while the mask
                 fits ``bias_bytes`` (decomposed passes always fit).
``blocked``      full attention in query blocks, each with its slice of the bias (any size).
``reference``    explicit matmul and softmax: the released code's math, every path's yardstick.
================ ===========================================================================

:func:`plan_attention` is the one decision; eager, compiled, traced and scripted models go through
it. Inside ``torch.compile`` the size rules (``bmm``'s length limit) do not apply, so a compiled
graph holds no guard on the sequence lengths; the only size-dependent choice left is ``sdpa`` vs
``blocked`` for full attention (two graphs at most over a range of sizes). Exported graphs take
``sdpa`` (no size-dependent branch), traced ones pick by size without ``bmm``. The sizes live in
:class:`DispatchThresholds` (:func:`set_dispatch_thresholds`).
"""
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch

from . import kernels

__all__ = ['ATTN_IMPLS', 'BACKENDS', 'Problem', 'AttentionPlan', 'DispatchThresholds', 'plan_attention',
           'set_dispatch_thresholds', 'dispatch_thresholds', 'input_reason', 'runtime_reason', 'autocast_dtype']



def _backends() -> List[str]:
    # a function, not the global: TorchScript reads no global tuples
    return ['triton', 'bmm', 'sdpa', 'blocked', 'reference']


BACKENDS = tuple(_backends())
ATTN_IMPLS = ('auto',) + BACKENDS


class Problem(NamedTuple):
    """What a backend needs to know of one MaSA call."""
    dtype: torch.dtype     # the dtype attention computes in (autocast's, where it is on)
    grid: List[int]        # the token grid, 1 to 3 sizes
    num_heads: int
    head_dim: int
    decomposed: bool
    num_prefix: int        # prefix tokens (no position, zero decay)
    masked: bool           # a key padding mask
    per_token_decay: bool  # decay given per query token (B, n, L)
    decay_grad: bool       # the decay needs a gradient
    batch: int


class AttentionPlan(NamedTuple):
    """How a call computes MaSA: the backend, the dtype of its position tables, and whether it reads the
    materialised (n, L, L) bias of full attention."""
    impl: str
    table_dtype: torch.dtype
    needs_full_bias: bool


def _default_thresholds() -> Tuple[int, int, int]:
    # (bias_bytes, block_bytes, bmm_max_tokens); TorchScript models keep these
    return 64 << 20, 32 << 20, 32


class DispatchThresholds(NamedTuple):
    """The sizes at which 'auto' changes path.

    ``bias_bytes``: full attention whose bias would take more bytes goes ``blocked``; ``block_bytes``:
    the size of each query block's bias slice there; ``bmm_max_tokens``: float32/64 sequences of at most
    this many tokens take ``bmm`` on the CPU.
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


def dispatch_thresholds() -> DispatchThresholds:
    """The thresholds in effect (see :class:`DispatchThresholds`); the defaults in TorchScript."""
    if torch.jit.is_scripting():
        bias_bytes, block_bytes, bmm_max_tokens = _default_thresholds()
        return DispatchThresholds(bias_bytes, block_bytes, bmm_max_tokens)
    return _current_thresholds()


@torch.jit.unused
def _current_thresholds() -> DispatchThresholds:
    return _thresholds


@torch.jit.unused
def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``x``'s device, or None where autocast is off."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


# --- the backends' reasons ---------------------------------------------------------------------------------

def _tokens(grid: List[int]) -> int:
    count = 1
    for s in grid:
        count *= s
    return count


def input_reason(backend: str, p: Problem) -> Optional[str]:
    """Why ``backend`` cannot honour this call's inputs, or None."""
    if backend == 'triton':
        if p.num_prefix > 0:
            return 'take prefix tokens'
        if p.masked:
            return 'take a padding mask'
        if p.per_token_decay:
            return 'take a per-token decay'
        if p.decay_grad:
            return 'give the decay a gradient'
    if backend == 'blocked' and p.num_prefix > 0:
        return 'take prefix tokens'
    return None


def runtime_reason(backend: str, p: Problem, device: torch.device, auto: bool) -> Optional[str]:
    """Why ``backend`` cannot run this call here (``auto``: or should not, being slower), or None."""
    if backend == 'triton':
        return _triton_reason(p, device, auto)
    if backend == 'bmm':
        if not auto:
            return None
        if not torch.jit.is_scripting() and (_exporting() or _tracing()):
            return 'exported and traced graphs take sdpa'
        if not torch.jit.is_scripting() and _compiling():
            return 'compiled graphs take sdpa (no guard on sequence lengths)'
        if device.type != 'cpu' or not (p.dtype == torch.float32 or p.dtype == torch.float64):
            return 'bmm wins on the CPU in float32/64 only'
        if not torch.jit.is_scripting() and _cpu_autocast():
            return 'bmm wins on the CPU in float32/64 only'
        longest = max(p.grid) if p.decomposed else _tokens(p.grid)
        if longest + p.num_prefix > dispatch_thresholds().bmm_max_tokens:
            return 'sequences of {} tokens are longer than bmm_max_tokens'.format(longest + p.num_prefix)
        return None
    if backend == 'sdpa':
        if not auto or p.decomposed or (not torch.jit.is_scripting() and _exporting()):
            return None
        if not torch.jit.is_scripting() and _compiling() and p.num_prefix == 0:
            return 'compiled graphs take the blocked op for full attention (no guard on the token count)'
        size = torch.empty(0, dtype=p.dtype).element_size()
        batch = p.batch if p.per_token_decay or p.masked else 1
        tokens = _tokens(p.grid) + p.num_prefix
        if batch * p.num_heads * tokens * tokens * size > dispatch_thresholds().bias_bytes and p.num_prefix == 0:
            return 'its bias would exceed bias_bytes'
        return None
    if backend == 'blocked':
        if p.decomposed:
            return 'it computes full attention only'
        return None
    return None


def _triton_reason(p: Problem, device: torch.device, auto: bool) -> Optional[str]:
    if torch.jit.is_scripting():
        return 'TorchScript runs no custom ops'
    if _exporting() or _tracing():
        return 'exported and traced graphs keep standard operators'
    if auto and device.type != 'cuda':
        return 'the kernels run on CUDA'
    reason = _kernels_refuse(str(device), p.dtype, p.head_dim)
    if reason is not None:
        return reason
    if auto and p.dtype == torch.float32 and (_ieee(p.dtype) or _old_triton_for_float32()):
        return 'float32 kernels spill registers (IEEE precision, or Triton before 3.8): sdpa is faster'
    return None


@torch.jit.unused
def _cpu_autocast() -> bool:
    return torch.is_autocast_enabled('cpu')


@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting()


@torch.jit.unused
def _tracing() -> bool:
    return torch.jit.is_tracing()


@torch.jit.unused
def _compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.jit.unused
@torch.compiler.assume_constant_result  # the machine, not the data: a constant of compiled graphs
def _kernels_refuse(device: str, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    return kernels.unsupported_reason(torch.device(device), dtype, head_dim)


@torch.jit.unused
@torch.compiler.assume_constant_result
def _old_triton_for_float32() -> bool:
    return kernels.triton_version() < kernels.FLOAT32_MIN_TRITON


@torch.jit.unused
@torch.compiler.assume_constant_result
def _ieee(dtype: torch.dtype) -> bool:
    """float32 dots in IEEE precision under torch's 'highest' matmul precision, else tf32."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == 'highest'


# --- the plan ---------------------------------------------------------------------------------------------

_warned = set()


def plan_attention(requested: str, p: Problem, device: torch.device) -> AttentionPlan:
    """The plan of one MaSA call: ``requested`` (one of :data:`ATTN_IMPLS`) if it can run, else the first
    backend of :data:`BACKENDS` that can (see the module docstring for what 'can' means).

    Raises ``ValueError`` for an unknown path, and for a forced path that cannot honour an input (one
    line naming the input); a forced path that cannot run here warns once and plans ``auto``.
    """
    if requested != 'auto':
        if requested not in _backends():
            raise ValueError('unknown attention path {!r}, expected auto or one of {}'.format(requested, _backends()))
        reason = input_reason(requested, p)
        if reason is not None:
            raise ValueError('the {} attention path cannot {}; use another path or auto'.format(requested, reason))
        reason = runtime_reason(requested, p, device, False)
        if reason is None and _configuration_ok(requested, p, device):
            return _plan(requested, p)
        if reason is not None:  # (a configuration whose kernels failed was reported by the op's guard)
            _warn_once(requested, reason)
    for backend in _backends():
        if input_reason(backend, p) is None and runtime_reason(backend, p, device, True) is None \
                and _configuration_ok(backend, p, device):
            return _plan(backend, p)
    return _plan('reference', p)


def _plan(impl: str, p: Problem) -> AttentionPlan:
    table_dtype = torch.float32 if impl == 'triton' else p.dtype
    needs_full = not p.decomposed and len(p.grid) > 1 and impl != 'blocked' and impl != 'triton' \
        and not p.per_token_decay
    if len(p.grid) == 1:
        needs_full = False  # one axis: its axis table is the whole bias
    return AttentionPlan(impl, table_dtype, needs_full)


def _warn_once(requested: str, reason: str) -> None:
    if torch.jit.is_scripting():
        return
    _warn_eager(requested, reason)


@torch.jit.unused
def _warn_eager(requested: str, reason: str) -> None:
    if torch.compiler.is_compiling() or (requested, reason) in _warned:
        return
    _warned.add((requested, reason))
    warnings.warn(f'rmt: the {requested} attention path cannot run here ({reason}); using auto', RuntimeWarning,
                  stacklevel=4)


def _configuration_ok(backend: str, p: Problem, device: torch.device) -> bool:
    """For ``triton``: no kernel of this configuration failed earlier in this process."""
    if backend != 'triton' or torch.jit.is_scripting():
        return True
    return _kernels_ok(p, device)


@torch.jit.unused
def _kernels_ok(p: Problem, device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True  # a failure inside the op falls back there
    from .triton_op import configuration_failed
    return not configuration_failed(p, device)

"""Triton kernels for MaSA: decayed attention with the theta shift and the decay bias computed in registers.

A MaSA layer's attention is one or two *passes* over sequences of tokens of a (B, H, W, C) map,
read and written channels-last as the Linear layers produce them:

* ``rows``: every image row is a sequence (decay ``lambda_h |j - j'|``), the first pass of
  decomposed MaSA;
* ``cols``: every image column (``lambda_h |i - i'|``), the second pass, reading the row pass's
  output as its values through strided addresses, with no permute copies;
* ``full``: all H * W tokens of an image, with the Manhattan distance.

In every pass the theta shift of q and k is applied as they are loaded, from the stage's table of
(cos, sin) pairs, and the decay bias is computed from token coordinates, so no table of the bias
is read. The last pass adds the LCE output as it
stores, so ``proj`` reads the sum.

Sequences of at most ``tile`` tokens are packed, several to a program, into one tile whose
off-diagonal blocks are masked (:func:`_fwd_tile_kernel`); its backward recomputes the tile's
softmax in registers. Longer sequences loop over key blocks with an online softmax and keep the
log-sum-exp (:func:`_fwd_loop_kernel`); their backward is a dq kernel (one sweep over the keys)
and a dk/dv kernel (one sweep over the queries), with ``delta = rowsum(dO * O)`` computed once
from the saved output. No (L x L) tensor exists anywhere.

Every size that fixes a program's layout (H, W, C, heads, head dim, tile) is a ``constexpr``, so
index arithmetic compiles to constants; a stage shape is one compile per kernel, the batch is not.

This module is Triton only: which layer runs here, and what happens when a kernel cannot run, is
decided in :mod:`rmt.attention`. :func:`masa_forward` and :func:`masa_backward` return the
launches of one MaSA call as :class:`Launch` records, so the same list is what the op runs and
what ``scripts/check_kernels.py`` compiles for a GPU target on a machine without one.

Where it runs (:func:`unsupported_reason`): CUDA devices of compute capability 8.0 or newer
(bf16 ``mma`` and the shared memory the tiles need), Triton 3.2 or newer (checked by compiling
for sm_80 and sm_90 with Triton 3.2, 3.3, 3.6 and 3.8), and on the CPU only in Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks the kernels' numerics.
"""
import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

try:  # CPU-only torch builds ship no Triton
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 (a broken install must not break `import rmt`)
    triton = None

__all__ = ['KernelConfig', 'Launch', 'MIN_TRITON', 'FLOAT32_MIN_TRITON',
           'MIN_CAPABILITY', 'MAX_HEAD_DIM', 'default_config', 'target_arch',
           'available', 'interpreting', 'triton_version', 'unsupported_reason', 'device_guard', 'pass_modes',
           'looped', 'forward_pass', 'backward_pass', 'stats_shapes', 'masa_forward', 'masa_backward']

MIN_TRITON = (3, 2)
FLOAT32_MIN_TRITON = (3, 8)  # 3.2-3.6 spill in some tf32 kernels (check_kernels), so 'auto' keeps float32 off
MIN_CAPABILITY = (8, 0)
MAX_HEAD_DIM = 64
_LOG2E = math.log2(math.e)
_MODES = {'rows': 0, 'cols': 1, 'full': 2}


class KernelConfig(NamedTuple):
    """Tile and block sizes, warps and pipeline stages of the kernels (what ``bench_kernels.py --sweep`` varies).

    ``tile``: sequences of at most this many tokens run as one packed tile per program;
    ``block_m`` / ``block_n``: query and key blocks of the looped kernels; ``num_warps``: warps per
    program of the forward kernels, ``bwd_warps`` of the backward ones; ``num_stages``: software
    pipeline depth of the looped kernels' loads (shared memory grows with it).
    """
    tile: int = 64
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    bwd_warps: int = 4
    num_stages: int = 3


def default_config(head_dim: int, dtype: torch.dtype, arch: int = 90,
                   release: Optional[Tuple[int, int]] = None) -> KernelConfig:
    """The settings the op uses for heads of ``head_dim`` in ``dtype`` on compute capability ``arch``
    (major * 10 + minor; the interpreter counts as 90) with Triton ``release`` ((major, minor), the
    installed one by default): the largest tiles with which no kernel spills registers, crashes the
    compiler, or exceeds the 99 KB of shared memory of sm_86 / sm_89, with Triton 3.2, 3.3, 3.6 and
    3.8 in bfloat16 and float16, and 3.8 in tf32 float32 (measured by ``scripts/check_kernels.py``;
    the README has the table; before 3.8 some tf32 kernels spill, see :data:`FLOAT32_MIN_TRITON`).

    Heads padded to 64 channels, and float32 heads (with 64-token tiles Triton 3.8 fails to compile
    the tf32 backward on sm_90), take 32-token tiles and blocks without software pipelining. At 64
    channels the key blocks shrink to 16 tokens for float32 (the dk/dv kernel spills on sm_80) and
    with Triton 3.3 (which spills a few bytes at head size 48); other releases spill with them in the
    dk/dv kernel on sm_90. Before Hopper the dot operands live in registers, so the looped kernels take
    32-token blocks there for every head size.
    """
    padded = max(16, 1 << (head_dim - 1).bit_length())
    if padded >= 64 or dtype == torch.float32:
        release = triton_version() if release is None else release
        small_keys = padded >= 64 and (dtype == torch.float32 or release[:2] == (3, 3))
        return KernelConfig(tile=32, block_m=32, block_n=16 if small_keys else 32, num_stages=1)
    if arch < 90:
        return KernelConfig(block_m=32, block_n=32)
    return KernelConfig()


def target_arch(device: torch.device) -> int:
    """The compute capability of ``device`` as major * 10 + minor; 90 off CUDA (the interpreter)."""
    if device.type != 'cuda':
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def available() -> bool:
    """Whether Triton could be imported."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def triton_version() -> Tuple[int, int]:
    """(major, minor) of the installed Triton, (0, 0) without one."""
    if triton is None:
        return 0, 0
    major, minor = triton.__version__.split('.')[:2]
    return int(major), int(''.join(c for c in minor if c.isdigit()) or 0)


def unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why the kernels cannot run MaSA with heads of ``head_dim`` in ``dtype`` on ``device``, or None if they can."""
    if triton is None:
        return 'Triton is not installed'
    if triton_version() < MIN_TRITON:
        return f'Triton {triton.__version__} is older than {".".join(map(str, MIN_TRITON))}'
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        return f'head dim {head_dim} is odd or above {MAX_HEAD_DIM}'
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f'no kernels for {dtype}'
    if device.type == 'cpu':
        return None if interpreting() else 'the kernels need CUDA, or TRITON_INTERPRET=1 on the CPU'
    if device.type != 'cuda':
        return f'no kernels for {device.type} devices'
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f'compute capability {capability[0]}.{capability[1]} is below ' \
               f'{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}'
    return None


def device_guard(device: torch.device):
    """A context in which launches run on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return _NoGuard()


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # torch's 'highest' float32 matmul precision (Triton's default would be tf32)
            return tl.dot(a, b, input_precision='ieee')
        return tl.dot(a, b)

    @triton.jit
    def _tokens(seq, t, valid, H: tl.constexpr, W: tl.constexpr, MODE: tl.constexpr, INT64: tl.constexpr):
        """(raster position i * W + j, row in the (B * H * W, C) matrix) of token ``t`` of sequence ``seq``."""
        if INT64:
            seq = seq.to(tl.int64)
        if MODE == 0:  # rows: sequence b * H + i
            pos = (seq % H) * W + t
            row = seq * W + t
        elif MODE == 1:  # columns: sequence b * W + j
            b = seq // W
            pos = t * W + (seq - b * W)
            row = b * (H * W) + pos
        else:  # the whole image: sequence b
            pos = t
            row = seq * (H * W) + t
        return tl.where(valid, pos, 0).to(tl.int32), tl.where(valid, row, 0)

    @triton.jit
    def _coords(t, slope, W: tl.constexpr, MODE: tl.constexpr):
        """Token coordinates times the head's decay slope; the bias between two tokens is minus the
        L1 distance of their scaled coordinates (``slope`` < 0, so ``slope * |a - b| = -|slope a - slope b|``)."""
        if MODE == 2:
            i = t // W
            return (slope * i).to(tl.float32), (slope * (t - i * W)).to(tl.float32)
        return (slope * t).to(tl.float32), (slope * t).to(tl.float32)

    @triton.jit
    def _bias(ci_q, cj_q, ci_k, cj_k, MODE: tl.constexpr):
        """(queries, keys) decay bias in the exp2 domain from :func:`_coords`."""
        if MODE == 2:
            return -tl.abs(ci_q[:, None] - ci_k[None, :]) - tl.abs(cj_q[:, None] - cj_k[None, :])
        return -tl.abs(ci_q[:, None] - ci_k[None, :])

    @triton.jit
    def _offsets(row, valid, head, C: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        e = tl.arange(0, D_PAD)
        return row[:, None] * C + head * D + e[None, :], valid[:, None] & (e[None, :] < D)

    @triton.jit
    def _pairs(x, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
        """The even and odd channels of a (BLOCK, D_PAD) tensor, each (BLOCK, D_PAD / 2); a pair sits in one
        thread, so this moves no data between threads."""
        return tl.split(tl.reshape(x, (BLOCK, D_PAD // 2, 2)))

    @triton.jit
    def _rotation(ROT, pos, mask, BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        """(cos, sin) of every rotary frequency at raster positions ``pos``, each (BLOCK, D_PAD / 2), from the
        stage's (H * W, D / 2, 2) float32 table of pairs."""
        tab = pos[:, None] * D + tl.arange(0, D_PAD)[None, :]
        return _pairs(tl.load(ROT + tab, mask=mask, other=0.), BLOCK, D_PAD)

    @triton.jit
    def _load_rotated(X, offs, mask, ROT, pos, BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        """Theta shift of the rows at ``offs`` as they are loaded: each pair (x0, x1) becomes
        (x0 cos - x1 sin, x1 cos + x0 sin). float32."""
        x0, x1 = _pairs(tl.load(X + offs, mask=mask, other=0.).to(tl.float32), BLOCK, D_PAD)
        c, s = _rotation(ROT, pos, mask, BLOCK, D, D_PAD)
        return tl.reshape(tl.join(x0 * c - x1 * s, x1 * c + x0 * s), (BLOCK, D_PAD))

    @triton.jit
    def _rotate_back(x, ROT, pos, mask, BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        """The theta shift's transpose, (x0 cos + x1 sin, x1 cos - x0 sin) per pair, on float32 gradients."""
        x0, x1 = _pairs(x, BLOCK, D_PAD)
        c, s = _rotation(ROT, pos, mask, BLOCK, D, D_PAD)
        return tl.reshape(tl.join(x0 * c + x1 * s, x1 * c - x0 * s), (BLOCK, D_PAD))

    @triton.jit
    def _program(DECAY, NUM_HEADS: tl.constexpr, BLOCKS: tl.constexpr):
        """(head, block, sequence or tile group, the head's decay slope in the exp2 domain) of this program.
        Heads vary fastest, so programs that run together read the same tokens' channels."""
        pid = tl.program_id(0)
        head = pid % NUM_HEADS
        slope = tl.load(DECAY + head).to(tl.float32) * 1.4426950408889634
        return head, (pid // NUM_HEADS) % BLOCKS, pid // (NUM_HEADS * BLOCKS), slope

    @triton.jit
    def _span(start, seq, head, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
              D_PAD: tl.constexpr, L: tl.constexpr, MODE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
        """Tokens ``start .. start + BLOCK`` of a long sequence (valid below L): (index, valid, raster
        position, row, offsets and mask of the head's channels)."""
        t = start + tl.arange(0, BLOCK)
        valid = t < L
        pos, row = _tokens(seq, t, valid, H, W, MODE, INT64)
        offs, mask = _offsets(row, valid, head, C, D, D_PAD)
        return t, valid, pos, row, offs, mask

    @triton.jit
    def _keys(K, V, ROT, start, seq, head, slope, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
              D: tl.constexpr, D_PAD: tl.constexpr, L: tl.constexpr, MODE: tl.constexpr, INT64: tl.constexpr,
              BLOCK_N: tl.constexpr):
        """The rotated keys (float32), the values, validity, rows and scaled coordinates of the key block at
        ``start`` (with the roles swapped, a query block and its output gradient)."""
        t, valid, pos, row, offs, mask = _span(start, seq, head, H, W, C, D, D_PAD, L, MODE, INT64, BLOCK_N)
        k = _load_rotated(K, offs, mask, ROT, pos, BLOCK_N, D, D_PAD)
        ci, cj = _coords(t, slope, W, MODE)
        return k, tl.load(V + offs, mask=mask, other=0.), valid, row, ci, cj

    @triton.jit
    def _logits(a, b, ci_a, cj_a, ci_b, cj_b, valid_b, MODE: tl.constexpr, IEEE: tl.constexpr,
                MASK: tl.constexpr):
        """``a b^T`` plus the decay bias between their tokens (exp2 domain), -inf where ``b``'s token is not
        valid (when ``MASK``: a ragged last block)."""
        s = _dot(a, tl.trans(b), IEEE) + _bias(ci_a, cj_a, ci_b, cj_b, MODE)
        if MASK:
            s = tl.where(valid_b[None, :], s, float('-inf'))
        return s

    @triton.jit
    def _tile(Q, K, V, ROT, DECAY, SEQS, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
              NUM_HEADS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, L: tl.constexpr, PACK: tl.constexpr,
              BLOCK: tl.constexpr, MODE: tl.constexpr, INT64: tl.constexpr):
        """The tile of PACK short sequences of one head: (offsets, mask, raster positions, rotated float32 q,
        rotated k, v, the tile's logits before the softmax scale of q, masked across sequences)."""
        head, _, group, slope = _program(DECAY, NUM_HEADS, 1)
        u = tl.arange(0, BLOCK)
        g = u // L
        seq = group * PACK + g
        valid = (g < PACK) & (seq < SEQS)
        t = u - g * L
        pos, row = _tokens(seq, t, valid, H, W, MODE, INT64)
        offs, mask = _offsets(row, valid, head, C, D, D_PAD)
        q = _load_rotated(Q, offs, mask, ROT, pos, BLOCK, D, D_PAD)
        k = _load_rotated(K, offs, mask, ROT, pos, BLOCK, D, D_PAD).to(V.dtype.element_ty)
        ci, cj = _coords(t, slope, W, MODE)
        return offs, mask, pos, q, k, tl.load(V + offs, mask=mask, other=0.), tl.where(valid, g, PACK), ci, cj

    @triton.jit
    def _fwd_tile_kernel(
            Q, K, V, RES, O, ROT, DECAY, SEQS, qk_scale,
            H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr, D: tl.constexpr,
            D_PAD: tl.constexpr, L: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
            HAS_RES: tl.constexpr, IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        """Attention of PACK short sequences of one head, all in one tile: their keys are their queries."""
        offs, mask, _, q, k, v, seg, ci, cj = _tile(Q, K, V, ROT, DECAY, SEQS, H, W, C, NUM_HEADS, D, D_PAD, L, PACK,
                                                    BLOCK, MODE, INT64)
        s = _logits((q * qk_scale).to(v.dtype), k, ci, cj, ci, cj, seg, MODE, IEEE, False)
        if PACK > 1 or L < BLOCK:
            s = tl.where(seg[:, None] == seg[None, :], s, float('-inf'))
        p = tl.exp2(s - tl.max(s, 1)[:, None])
        out = _dot(p.to(v.dtype), v, IEEE) / tl.sum(p, 1)[:, None]
        if HAS_RES:
            out += tl.load(RES + offs, mask=mask, other=0.).to(tl.float32)
        tl.store(O + offs, out.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwd_loop_kernel(
            Q, K, V, RES, O, LSE, ROT, DECAY, SEQS, qk_scale,
            H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr, D: tl.constexpr,
            D_PAD: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MODE: tl.constexpr, HAS_RES: tl.constexpr, STORE_LSE: tl.constexpr, IEEE: tl.constexpr,
            INT64: tl.constexpr,
    ):
        """Attention of one block of queries of a long sequence: an online softmax over its key blocks."""
        head, m_block, seq, slope = _program(DECAY, NUM_HEADS, (L + BLOCK_M - 1) // BLOCK_M)
        t_q, valid_q, pos_q, row_q, offs_q, mask_q = _span(m_block * BLOCK_M, seq, head, H, W, C, D, D_PAD, L,
                                                           MODE, INT64, BLOCK_M)
        q = (_load_rotated(Q, offs_q, mask_q, ROT, pos_q, BLOCK_M, D, D_PAD) * qk_scale).to(V.dtype.element_ty)
        ci_q, cj_q = _coords(t_q, slope, W, MODE)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for start in range(0, L, BLOCK_N):
            k, v, valid_k, row_k, ci_k, cj_k = _keys(K, V, ROT, start, seq, head, slope, H, W, C, D, D_PAD, L, MODE,
                                                     INT64, BLOCK_N)
            s = _logits(q, k.to(v.dtype), ci_q, cj_q, ci_k, cj_k, valid_k, MODE, IEEE, L % BLOCK_N != 0)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        out = acc / l_i[:, None]
        if HAS_RES:
            out += tl.load(RES + offs_q, mask=mask_q, other=0.).to(tl.float32)
        tl.store(O + offs_q, out.to(O.dtype.element_ty), mask=mask_q)
        if STORE_LSE:
            tl.store(LSE + row_q * NUM_HEADS + head, m_i + tl.log2(l_i), mask=valid_q)

    @triton.jit
    def _bwd_tile_kernel(
            Q, K, V, DO, DQ, DK, DV, ROT, DECAY, SEQS, qk_scale, scale,
            H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr, D: tl.constexpr,
            D_PAD: tl.constexpr, L: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
            ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        """Gradients of PACK short sequences of one head in one tile; the softmax is recomputed in registers
        and ``delta = rowsum(P * dP)`` needs no output."""
        offs, mask, pos, q, k, v, seg, ci, cj = _tile(Q, K, V, ROT, DECAY, SEQS, H, W, C, NUM_HEADS, D, D_PAD, L, PACK,
                                                      BLOCK, MODE, INT64)
        dtype = v.dtype
        do = tl.load(DO + offs, mask=mask, other=0.).to(dtype)
        s = _logits((q * qk_scale).to(dtype), k, ci, cj, ci, cj, seg, MODE, IEEE, False)
        if PACK > 1 or L < BLOCK:
            s = tl.where(seg[:, None] == seg[None, :], s, float('-inf'))
        p = tl.exp2(s - tl.max(s, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        dv = _dot(tl.trans(p.to(dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = (p * (dp - tl.sum(p * dp, 1)[:, None])).to(dtype)
        dq = _rotate_back(_dot(ds, k, IEEE) * scale, ROT, pos, mask, BLOCK, D, D_PAD)
        dk = _rotate_back(_dot(tl.trans(ds), q.to(dtype), IEEE) * scale, ROT, pos, mask, BLOCK, D, D_PAD)
        if ACCUMULATE:
            dq += tl.load(DQ + offs, mask=mask, other=0.).to(tl.float32)
            dk += tl.load(DK + offs, mask=mask, other=0.).to(tl.float32)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=mask)
        tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_dq_kernel(
            Q, K, V, O, RES, DO, DQ, LSE, DELTA, ROT, DECAY, SEQS, qk_scale, scale,
            H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr, D: tl.constexpr,
            D_PAD: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MODE: tl.constexpr, HAS_RES: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
            INT64: tl.constexpr,
    ):
        """dq of one query block of a long sequence, in one sweep over the keys. First stores
        ``delta = rowsum(dO * O)`` for the dk/dv kernel, O being the pass's output minus what it added."""
        head, m_block, seq, slope = _program(DECAY, NUM_HEADS, (L + BLOCK_M - 1) // BLOCK_M)
        t_q, valid_q, pos_q, row_q, offs_q, mask_q = _span(m_block * BLOCK_M, seq, head, H, W, C, D, D_PAD, L,
                                                           MODE, INT64, BLOCK_M)
        dtype = V.dtype.element_ty
        q = (_load_rotated(Q, offs_q, mask_q, ROT, pos_q, BLOCK_M, D, D_PAD) * qk_scale).to(dtype)
        ci_q, cj_q = _coords(t_q, slope, W, MODE)
        do = tl.load(DO + offs_q, mask=mask_q, other=0.)
        o = tl.load(O + offs_q, mask=mask_q, other=0.).to(tl.float32)
        if HAS_RES:
            o -= tl.load(RES + offs_q, mask=mask_q, other=0.).to(tl.float32)
        delta = tl.sum(do.to(tl.float32) * o, 1)
        tl.store(DELTA + row_q * NUM_HEADS + head, delta, mask=valid_q)
        do = do.to(dtype)
        lse = tl.load(LSE + row_q * NUM_HEADS + head, mask=valid_q, other=0.)

        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for start in range(0, L, BLOCK_N):
            k, v, valid_k, row_k, ci_k, cj_k = _keys(K, V, ROT, start, seq, head, slope, H, W, C, D, D_PAD, L, MODE,
                                                     INT64, BLOCK_N)
            k = k.to(dtype)
            p = tl.exp2(_logits(q, k, ci_q, cj_q, ci_k, cj_k, valid_k, MODE, IEEE, L % BLOCK_N != 0) - lse[:, None])
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _dot(ds.to(dtype), k, IEEE)
        dq = _rotate_back(dq * scale, ROT, pos_q, mask_q, BLOCK_M, D, D_PAD)
        if ACCUMULATE:
            dq += tl.load(DQ + offs_q, mask=mask_q, other=0.).to(tl.float32)
        tl.store(DQ + offs_q, dq.to(DQ.dtype.element_ty), mask=mask_q)

    @triton.jit
    def _bwd_dkdv_kernel(
            Q, K, V, DO, DK, DV, LSE, DELTA, ROT, DECAY, SEQS, qk_scale, scale,
            H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr, D: tl.constexpr,
            D_PAD: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MODE: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        """dk and dv of one key block of a long sequence, in one sweep over the query blocks (the roles of
        :func:`_bwd_dq_kernel` swapped: the logits are transposed, keys by queries)."""
        head, n_block, seq, slope = _program(DECAY, NUM_HEADS, (L + BLOCK_N - 1) // BLOCK_N)
        t_k, valid_k, pos_k, row_k, offs_k, mask_k = _span(n_block * BLOCK_N, seq, head, H, W, C, D, D_PAD, L, MODE,
                                                           INT64, BLOCK_N)
        dtype = V.dtype.element_ty
        k = _load_rotated(K, offs_k, mask_k, ROT, pos_k, BLOCK_N, D, D_PAD).to(dtype)
        v = tl.load(V + offs_k, mask=mask_k, other=0.)
        ci_k, cj_k = _coords(t_k, slope, W, MODE)

        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        for start in range(0, L, BLOCK_M):
            q, do, valid_q, row_q, ci_q, cj_q = _keys(Q, DO, ROT, start, seq, head, slope, H, W, C, D, D_PAD, L, MODE,
                                                      INT64, BLOCK_M)
            lse = tl.load(LSE + row_q * NUM_HEADS + head, mask=valid_q, other=0.)
            delta = tl.load(DELTA + row_q * NUM_HEADS + head, mask=valid_q, other=0.)
            # the logits as the forward rounded them: q scaled, then cast
            p_t = tl.exp2(_logits(k, (q * qk_scale).to(dtype), ci_k, cj_k, ci_q, cj_q, valid_q, MODE, IEEE,
                                  L % BLOCK_M != 0) - lse[None, :])
            do = do.to(dtype)
            dv += _dot(p_t.to(dtype), do, IEEE)
            ds_t = p_t * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
            dk += _dot(ds_t.to(dtype), q.to(dtype), IEEE)
        dk = _rotate_back(dk * scale, ROT, pos_k, mask_k, BLOCK_N, D, D_PAD)
        if ACCUMULATE:
            dk += tl.load(DK + offs_k, mask=mask_k, other=0.).to(tl.float32)
        tl.store(DK + offs_k, dk.to(DK.dtype.element_ty), mask=mask_k)
        tl.store(DV + offs_k, dv.to(DV.dtype.element_ty), mask=mask_k)


# --- launches ----------------------------------------------------------------------------------------

class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constexprs)``."""
    kernel: Any
    grid: Tuple[int]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs)


def pass_modes(decomposed: bool) -> Tuple[str, ...]:
    """The passes of one MaSA call, in order."""
    return ('rows', 'cols') if decomposed else ('full',)


def _length(mode: str, H: int, W: int) -> int:
    return W if mode == 'rows' else H if mode == 'cols' else H * W


def _sequences(mode: str, B: int, H: int, W: int) -> int:
    return B * H if mode == 'rows' else B * W if mode == 'cols' else B


def looped(mode: str, H: int, W: int, config: KernelConfig) -> bool:
    """Whether a pass's sequences are longer than a tile (the looped kernels, which keep statistics)."""
    return _length(mode, H, W) > config.tile


def _shape(q: torch.Tensor, num_heads: int, mode: str, ieee: bool) -> Dict[str, Any]:
    B, H, W, C = q.shape
    D = C // num_heads
    return dict(H=H, W=W, C=C, NUM_HEADS=num_heads, D=D, D_PAD=max(16, triton.next_power_of_2(D)),
                L=_length(mode, H, W), MODE=_MODES[mode], IEEE=ieee, INT64=q.numel() >= 2 ** 31)


def _packing(length: int, seqs: int, config: KernelConfig) -> Tuple[int, int]:
    """(sequences per tile, tile size) for sequences of at most ``config.tile`` tokens."""
    pack = max(1, min(config.tile // length, seqs))
    return pack, max(16, triton.next_power_of_2(pack * length))


def forward_pass(q, k, v, res, out, lse, rotation, decay, scale: float, num_heads: int, mode: str, ieee: bool,
                 config: KernelConfig) -> Launch:
    """The launch that writes ``out = attention(q, k, v) (+ res)`` along ``mode``, and ``lse`` when given."""
    B, H, W, _ = q.shape
    shape = _shape(q, num_heads, mode, ieee)
    seqs = _sequences(mode, B, H, W)
    args = (q, k, v, out if res is None else res, out)
    if not looped(mode, H, W, config):
        pack, block = _packing(shape['L'], seqs, config)
        return Launch(_fwd_tile_kernel, (num_heads * triton.cdiv(seqs, pack),),
                      args + (rotation, decay, seqs, scale * _LOG2E),
                      dict(shape, PACK=pack, BLOCK=block, HAS_RES=res is not None, num_warps=config.num_warps))
    m_blocks = triton.cdiv(shape['L'], config.block_m)
    return Launch(_fwd_loop_kernel, (num_heads * m_blocks * seqs,),
                  args + (out if lse is None else lse, rotation, decay, seqs, scale * _LOG2E),
                  dict(shape, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_RES=res is not None,
                       STORE_LSE=lse is not None, num_warps=config.num_warps, num_stages=config.num_stages))


def backward_pass(q, k, v, o, res, do, dq, dk, dv, lse, delta, rotation, decay, scale: float, num_heads: int,
                  mode: str, accumulate: bool, ieee: bool, config: KernelConfig) -> List[Launch]:
    """The launches that write the gradients of q, k (added to ``dq``, ``dk`` if ``accumulate``) and v of a
    pass from ``do``; looped passes read the pass's output ``o`` (minus ``res``), ``lse`` and fill ``delta``."""
    B, H, W, _ = q.shape
    shape = _shape(q, num_heads, mode, ieee)
    seqs = _sequences(mode, B, H, W)
    scales = (scale * _LOG2E, scale)
    if not looped(mode, H, W, config):
        pack, block = _packing(shape['L'], seqs, config)
        return [Launch(_bwd_tile_kernel, (num_heads * triton.cdiv(seqs, pack),),
                       (q, k, v, do, dq, dk, dv, rotation, decay, seqs) + scales,
                       dict(shape, PACK=pack, BLOCK=block, ACCUMULATE=accumulate, num_warps=config.bwd_warps))]
    blocks = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, ACCUMULATE=accumulate, num_warps=config.bwd_warps,
                  num_stages=config.num_stages)
    m_blocks, n_blocks = triton.cdiv(shape['L'], config.block_m), triton.cdiv(shape['L'], config.block_n)
    return [
        Launch(_bwd_dq_kernel, (num_heads * m_blocks * seqs,),
               (q, k, v, o, o if res is None else res, do, dq, lse, delta, rotation, decay, seqs) + scales,
               dict(shape, HAS_RES=res is not None, **blocks)),
        Launch(_bwd_dkdv_kernel, (num_heads * n_blocks * seqs,),
               (q, k, v, do, dk, dv, lse, delta, rotation, decay, seqs) + scales, dict(shape, **blocks)),
    ]


def stats_shapes(q: torch.Tensor, num_heads: int, decomposed: bool, keep_stats: bool,
                 config: KernelConfig) -> List[Tuple[int, ...]]:
    """Shapes of the log-sum-exp planes a forward keeps, one per pass: (B * H * W, heads) for looped passes
    when ``keep_stats``, else (0,)."""
    B, H, W, _ = q.shape
    return [(B * H * W, num_heads) if keep_stats and looped(mode, H, W, config) else (0,)
            for mode in pass_modes(decomposed)]


def masa_forward(q, k, v, lce, rotation, decay, scale: float, num_heads: int, decomposed: bool, keep_stats: bool,
                 ieee: bool, config: KernelConfig):
    """Outputs and launches of MaSA's attention plus LCE on contiguous (B, H, W, C) q, k, v, lce, with the
    stage's float32 (H, W, 1, D / 2, 2) rotation table of (cos, sin) pairs and its (heads,) decay rates.

    Returns ``(out, stats, launches)``: ``out`` (B, H, W, C) and the log-sum-exp planes of
    :func:`stats_shapes` are allocated, not yet written; running the launches in order writes them.
    """
    out = torch.empty_like(q)
    stats = [torch.zeros(shape, device=q.device, dtype=torch.float32)
             for shape in stats_shapes(q, num_heads, decomposed, keep_stats, config)]
    common = (rotation, decay, scale, num_heads)
    if not decomposed:
        return out, stats, [forward_pass(q, k, v, lce, out, _plane(stats[0]), *common, 'full', ieee, config)]
    rows = torch.empty_like(q)
    return out, stats, [forward_pass(q, k, v, None, rows, _plane(stats[0]), *common, 'rows', ieee, config),
                        forward_pass(q, k, rows, lce, out, _plane(stats[1]), *common, 'cols', ieee, config)]


def masa_backward(grad, q, k, v, out, lce, stats, rotation, decay, scale: float, num_heads: int, decomposed: bool,
                  ieee: bool, config: KernelConfig):
    """Gradients and launches of MaSA's attention for the output gradient ``grad`` (B, H, W, C).

    ``out`` and ``lce`` are the forward's output and LCE input (read by looped last passes for
    ``delta``), ``stats`` its log-sum-exp planes. Returns ``(dq, dk, dv, launches)``; q and k
    gradients are with respect to the inputs before the theta shift.
    """
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (rotation, decay, scale, num_heads)
    deltas = [torch.empty_like(s) for s in stats]
    if not decomposed:
        return dq, dk, dv, backward_pass(q, k, v, out, lce, grad, dq, dk, dv, stats[0], deltas[0], *common, 'full',
                                         False, ieee, config)
    rows, d_rows = torch.empty_like(q), torch.empty_like(q)
    launches = [forward_pass(q, k, v, None, rows, None, *common, 'rows', ieee, config)]
    launches += backward_pass(q, k, rows, out, lce, grad, dq, dk, d_rows, stats[1], deltas[1], *common, 'cols',
                              False, ieee, config)
    launches += backward_pass(q, k, v, rows, None, d_rows, dq, dk, dv, stats[0], deltas[0], *common, 'rows',
                              True, ieee, config)
    return dq, dk, dv, launches


def _plane(stats: torch.Tensor) -> Optional[torch.Tensor]:
    return stats if stats.numel() > 0 else None

"""Triton kernels for MaSA: decayed attention with the theta shift and the decay bias computed in registers.

MaSA's attention runs as one to three *passes* over a grid of (D, H, W) tokens per batch item, read
and written channels-last, (B, D, H, W, C) with the heads interleaved in C (head h at channels
h * d ..), as the Linear layers produce them (1-D sequences are (B, 1, 1, W, C), images
(B, 1, H, W, C)). A pass attends within *sequences* of tokens:

* ``w``: every row along W (decay ``lambda_h |j - j'|``), the first pass of decomposed MaSA;
* ``h``: every column along H (``lambda_h |i - i'|``), reading the previous pass's output as its
  values through strided addresses, with no permute copies;
* ``d``: every line along D (``lambda_h |d - d'|``), strided by H * W tokens, the third pass of 3-D
  decomposed MaSA;
* ``full``: all D * H * W tokens of a batch item, with the Manhattan distance over the three
  coordinates (``lambda_h (|d - d'| + |i - i'| + |j - j'|)``).

Decomposed MaSA chains the axis passes (:func:`pass_modes`): each pass's output is the next one's
values. In every pass the theta shift of q and k is applied as they are loaded, from a float32 table
of (cos, sin) pairs (or skipped, ``rotation=None``), and the decay bias is computed from token
coordinates, so no table of the bias is read. The last pass adds a residual (the LCE output) as it
stores, so ``proj`` reads the sum.

Sequences of at most ``tile`` tokens are packed, several to a program, into one tile whose
off-diagonal blocks are masked (:func:`_fwd_tile_kernel`); its backward recomputes the tile's
softmax in registers. Longer sequences loop over key blocks with an online softmax and keep the
log-sum-exp (:func:`_fwd_loop_kernel`); their backward is a dq kernel (one sweep over the keys)
and a dk/dv kernel (one sweep over the queries), with ``delta = rowsum(dO * O)`` computed once
from the saved output. No (L x L) tensor exists anywhere.

Every size that fixes a program's layout (D, H, W, C, heads, head dim, tile) is a ``constexpr``, so
index arithmetic compiles to constants; a grid shape is one compile per kernel, the batch is not.

This module is Triton only: which layer runs here, and what happens when a kernel cannot run, is
decided in :mod:`rmt.attention`. :func:`masa_forward` and :func:`masa_backward` return the
launches of one MaSA call as :class:`Launch` records, so the same list is what the op runs and
what ``scripts/check_kernels.py`` compiles for a GPU target on a machine without one.

Where it runs (:func:`unsupported_reason`): CUDA devices of compute capability 8.0 or newer
(bf16 ``mma`` and the shared memory the tiles need), Triton 3.2 or newer (checked by compiling
for sm_80 and sm_90 with Triton 3.2, 3.3, 3.6 and 3.8), and on the CPU only in Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks the kernels' numerics.
Triton 3.2 compiles no tuples or records inside kernels, so helpers return at most three values.
"""
import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

try:  # CPU-only torch builds ship no Triton
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 (a broken install must not break `import rmt`)
    triton = None

__all__ = ['KernelConfig', 'Launch', 'MIN_TRITON', 'FLOAT32_MIN_TRITON',
           'MIN_CAPABILITY', 'MAX_HEAD_DIM', 'SETTINGS', 'default_config', 'target_arch',
           'available', 'interpreting', 'triton_version', 'unsupported_reason', 'device_guard', 'pass_modes',
           'looped', 'forward_pass', 'backward_pass', 'stats_shapes', 'masa_forward', 'masa_backward']

MIN_TRITON = (3, 2)
FLOAT32_MIN_TRITON = (3, 8)  # 3.2-3.6 spill in some tf32 kernels (check_kernels), so 'auto' keeps float32 off
MIN_CAPABILITY = (8, 0)
MAX_HEAD_DIM = 64
_LOG2E = math.log2(math.e)
_MODES = {'w': 0, 'h': 1, 'd': 2, 'full': 3}


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


ANY = None  # the row for every Triton release without a row of its own
# (padded head dim, dtype ('half': bfloat16 and float16), arch (90: sm_90 and newer, 80: sm_80 to sm_89),
# Triton release) -> settings: the largest tiles with which no kernel spills registers, crashes the compiler
# or needs more than sm_86's 99 KB of shared memory; measured in scripts/RESULTS.md ("Kernel settings")
SETTINGS: Dict[Tuple[int, str, int, Optional[Tuple[int, int]]], KernelConfig] = {
    # key: KernelConfig(tile, block_m, block_n, num_warps, bwd_warps, num_stages)
    (16, 'half', 90, ANY):     KernelConfig(64, 64, 64, 4, 4, 3),
    (32, 'half', 90, ANY):     KernelConfig(64, 64, 64, 4, 4, 3),
    (64, 'half', 90, ANY):     KernelConfig(32, 32, 32, 4, 4, 1),
    (64, 'half', 90, (3, 3)):  KernelConfig(32, 32, 16, 4, 4, 1),
    (16, 'half', 80, ANY):     KernelConfig(64, 32, 32, 4, 4, 3),
    (16, 'half', 80, (3, 3)):  KernelConfig(64, 32, 32, 4, 8, 3),
    (32, 'half', 80, ANY):     KernelConfig(64, 32, 32, 4, 4, 3),
    (32, 'half', 80, (3, 3)):  KernelConfig(64, 32, 32, 4, 8, 3),
    (64, 'half', 80, ANY):     KernelConfig(32, 32, 32, 4, 4, 1),
    (64, 'half', 80, (3, 2)):  KernelConfig(32, 32, 32, 4, 8, 1),
    (64, 'half', 80, (3, 3)):  KernelConfig(32, 32, 16, 4, 4, 1),
    (16, 'float32', 90, ANY):  KernelConfig(32, 32, 32, 4, 4, 1),
    (32, 'float32', 90, ANY):  KernelConfig(32, 32, 32, 4, 4, 1),
    (64, 'float32', 90, ANY):  KernelConfig(32, 32, 16, 4, 4, 1),
    (16, 'float32', 80, ANY):  KernelConfig(32, 32, 32, 4, 4, 1),
    (32, 'float32', 80, ANY):  KernelConfig(32, 32, 32, 4, 4, 1),
    (64, 'float32', 80, ANY):  KernelConfig(32, 32, 16, 4, 4, 1),
}


def default_config(head_dim: int, dtype: torch.dtype, arch: int = 90,
                   release: Optional[Tuple[int, int]] = None) -> KernelConfig:
    """The settings the op uses for heads of ``head_dim`` in ``dtype`` on compute capability ``arch``
    (major * 10 + minor; the interpreter counts as 90) with Triton ``release`` ((major, minor), the
    installed one by default): the row of :data:`SETTINGS` for the padded head dim, the release's own
    row where it has one, else the ``ANY`` row. Why each row: ``scripts/RESULTS.md``, "Kernel settings".
    """
    padded = max(16, 1 << (head_dim - 1).bit_length())
    release = triton_version() if release is None else release
    key = (padded, 'float32' if dtype == torch.float32 else 'half', 90 if arch >= 90 else 80)
    return SETTINGS.get(key + (tuple(release[:2]),)) or SETTINGS[key + (ANY,)]


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
    # Names of the shapes in the comments: BLOCK (a packed tile), BLOCK_M (queries), BLOCK_N (keys), HD_PAD
    # (a head's channels padded to a power of two); a sequence's tokens are t = 0 .. L - 1.
    _LOG2E_JIT = tl.constexpr(_LOG2E)  # _LOG2E where kernels can read it

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # torch's 'highest' float32 matmul precision (Triton's default would be tf32)
            return tl.dot(a, b, input_precision='ieee')
        return tl.dot(a, b)

    @triton.jit
    def _program(NUM_HEADS: tl.constexpr, BLOCKS: tl.constexpr):
        """(head, block, sequence or tile group) of this program. Heads vary fastest, so programs that run
        together read the same tokens' channels."""
        pid = tl.program_id(0)
        return pid % NUM_HEADS, (pid // NUM_HEADS) % BLOCKS, pid // (NUM_HEADS * BLOCKS)

    @triton.jit
    def _slope(DECAY, head):
        """The head's decay rate in the exp2 domain (negative)."""
        return tl.load(DECAY + head).to(tl.float32) * _LOG2E_JIT

    @triton.jit
    def _packed(group, SEQS, L: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr):
        """(token index, segment, sequence) of every slot of tile ``group``, each [BLOCK]: PACK sequences of L
        tokens side by side; slots past them or past the last sequence are segment PACK."""
        u = tl.arange(0, BLOCK)
        g = u // L
        seq = group * PACK + g
        return u - g * L, tl.where((g < PACK) & (seq < SEQS), g, PACK), seq

    @triton.jit
    def _tokens(seq, t, valid, D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, MODE: tl.constexpr,
                INT64: tl.constexpr):
        """(raster position (d * H + i) * W + j, row in the (B * D * H * W, C) matrix) of token ``t`` of
        sequence ``seq``, each [len(t)]; 0 where not ``valid``."""
        if INT64:
            seq = seq.to(tl.int64)
        if MODE == 0:  # along W: sequence (b * D + d) * H + i, token j
            pos = (seq % (D * H)) * W + t
            row = seq * W + t
        elif MODE == 1:  # along H: sequence (b * D + d) * W + j, token i
            bd = seq // W
            ij = t * W + (seq - bd * W)
            pos = (bd % D) * (H * W) + ij
            row = bd * (H * W) + ij
        elif MODE == 2:  # along D: sequence b * H * W + i * W + j, token d
            b = seq // (H * W)
            pos = t * (H * W) + (seq - b * (H * W))
            row = b * (D * H * W) + pos
        else:  # all tokens of batch item b = sequence
            pos = t
            row = seq * (D * H * W) + t
        return tl.where(valid, pos, 0).to(tl.int32), tl.where(valid, row, 0)

    @triton.jit
    def _offsets(row, valid, head, C: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr):
        """(offsets, mask) of the head's channels of matrix rows ``row``, each [len(row), HD_PAD]."""
        e = tl.arange(0, HD_PAD)
        return row[:, None] * C + head * HD + e[None, :], valid[:, None] & (e[None, :] < HD)

    @triton.jit
    def _coords(t, slope, D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, MODE: tl.constexpr):
        """Coordinates of tokens ``t`` times the head's decay slope, three float32 [len(t)]: (depth, row,
        column) in full attention (the depth unused when D == 1), the token index thrice in an axis pass.
        The bias between two tokens is minus the L1 distance of their scaled coordinates (``slope`` < 0, so
        ``slope * |a - b| = -|slope a - slope b|``)."""
        if MODE == 3:
            i = t // W
            j = t - i * W
            d = i
            if D > 1:
                d = i // H
                i = i - d * H
            return (slope * d).to(tl.float32), (slope * i).to(tl.float32), (slope * j).to(tl.float32)
        c = (slope * t).to(tl.float32)
        return c, c, c

    @triton.jit
    def _bias(a0, a1, a2, b0, b1, b2, D: tl.constexpr, MODE: tl.constexpr):
        """[len(a), len(b)] decay bias (exp2 domain) between tokens of :func:`_coords` ``a`` and ``b``."""
        if MODE == 3:
            bias = -tl.abs(a1[:, None] - b1[None, :]) - tl.abs(a2[:, None] - b2[None, :])
            if D > 1:
                bias -= tl.abs(a0[:, None] - b0[None, :])
            return bias
        return -tl.abs(a0[:, None] - b0[None, :])

    @triton.jit
    def _pairs(x, BLOCK: tl.constexpr, HD_PAD: tl.constexpr):
        """The even and odd channels of a [BLOCK, HD_PAD] tensor, each [BLOCK, HD_PAD / 2]; a pair sits in one
        thread, so this moves no data between threads."""
        return tl.split(tl.reshape(x, (BLOCK, HD_PAD // 2, 2)))

    @triton.jit
    def _rotation(ROT, pos, mask, BLOCK: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr):
        """(cos, sin) of every rotary frequency at raster positions ``pos``, each [BLOCK, HD_PAD / 2], from the
        (D * H * W, HD / 2, 2) float32 table of pairs."""
        tab = pos[:, None] * HD + tl.arange(0, HD_PAD)[None, :]  # [BLOCK, HD_PAD]
        return _pairs(tl.load(ROT + tab, mask=mask, other=0.), BLOCK, HD_PAD)

    @triton.jit
    def _load_rotated(X, offs, mask, ROT, pos, BLOCK: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr,
                      ROTATE: tl.constexpr):
        """[BLOCK, HD_PAD] float32 rows at ``offs``, theta-shifted as they are loaded when ``ROTATE``: each pair
        (x0, x1) becomes (x0 cos - x1 sin, x1 cos + x0 sin)."""
        x = tl.load(X + offs, mask=mask, other=0.).to(tl.float32)
        if ROTATE:
            x0, x1 = _pairs(x, BLOCK, HD_PAD)
            c, s = _rotation(ROT, pos, mask, BLOCK, HD, HD_PAD)
            x = tl.reshape(tl.join(x0 * c - x1 * s, x1 * c + x0 * s), (BLOCK, HD_PAD))
        return x

    @triton.jit
    def _rotate_back(x, ROT, pos, mask, BLOCK: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr,
                     ROTATE: tl.constexpr):
        """The theta shift's transpose, (x0 cos + x1 sin, x1 cos - x0 sin) per pair, on [BLOCK, HD_PAD] float32
        gradients (``x`` itself without ``ROTATE``)."""
        if ROTATE:
            x0, x1 = _pairs(x, BLOCK, HD_PAD)
            c, s = _rotation(ROT, pos, mask, BLOCK, HD, HD_PAD)
            x = tl.reshape(tl.join(x0 * c + x1 * s, x1 * c - x0 * s), (BLOCK, HD_PAD))
        return x

    @triton.jit
    def _keys(K, V, ROT, start, seq, head, D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
              HD: tl.constexpr, HD_PAD: tl.constexpr, L: tl.constexpr, MODE: tl.constexpr, ROTATE: tl.constexpr,
              INT64: tl.constexpr, BLOCK_N: tl.constexpr):
        """(rotated float32 keys [BLOCK_N, HD_PAD], values [BLOCK_N, HD_PAD], token indices [BLOCK_N]) of the
        key block at ``start`` (valid below L)."""
        t = start + tl.arange(0, BLOCK_N)
        pos, row = _tokens(seq, t, t < L, D, H, W, MODE, INT64)
        offs, mask = _offsets(row, t < L, head, C, HD, HD_PAD)
        return _load_rotated(K, offs, mask, ROT, pos, BLOCK_N, HD, HD_PAD, ROTATE), \
            tl.load(V + offs, mask=mask, other=0.), t

    @triton.jit
    def _logits(a, b, bias, valid_b, IEEE: tl.constexpr, MASK: tl.constexpr):
        """[len(a), len(b)] ``a b^T`` plus the decay ``bias`` (exp2 domain), -inf where ``b``'s token is not
        valid (when ``MASK``: a ragged last block)."""
        s = _dot(a, tl.trans(b), IEEE) + bias
        if MASK:
            s = tl.where(valid_b[None, :], s, float('-inf'))
        return s

    @triton.jit
    def _tile_logits(q, k, t, seg, slope, D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                     PACK: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr):
        """[BLOCK, BLOCK] logits of a packed tile (q already scaled), -inf between different sequences."""
        c0, c1, c2 = _coords(t, slope, D, H, W, MODE)  # [BLOCK]
        s = _logits(q, k, _bias(c0, c1, c2, c0, c1, c2, D, MODE), seg, IEEE, False)
        if PACK > 1 or L < BLOCK:
            s = tl.where(seg[:, None] == seg[None, :], s, float('-inf'))
        return s

    @triton.jit
    def _fwd_tile_kernel(
            Q, K, V, RES, O, ROT, DECAY, SEQS, qk_scale,
            D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr,
            HD: tl.constexpr, HD_PAD: tl.constexpr, L: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr,
            MODE: tl.constexpr, ROTATE: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
            INT64: tl.constexpr,
    ):
        """Attention of PACK short sequences of one head, all in one tile: their keys are their queries."""
        head, _, group = _program(NUM_HEADS, 1)
        t, seg, seq = _packed(group, SEQS, L, PACK, BLOCK)  # [BLOCK]
        pos, row = _tokens(seq, t, seg < PACK, D, H, W, MODE, INT64)  # [BLOCK]
        offs, mask = _offsets(row, seg < PACK, head, C, HD, HD_PAD)  # [BLOCK, HD_PAD]
        dtype = V.dtype.element_ty
        q = _load_rotated(Q, offs, mask, ROT, pos, BLOCK, HD, HD_PAD, ROTATE)  # [BLOCK, HD_PAD] float32
        k = _load_rotated(K, offs, mask, ROT, pos, BLOCK, HD, HD_PAD, ROTATE).to(dtype)  # [BLOCK, HD_PAD]
        v = tl.load(V + offs, mask=mask, other=0.)  # [BLOCK, HD_PAD]
        s = _tile_logits((q * qk_scale).to(dtype), k, t, seg, _slope(DECAY, head), D, H, W, L, PACK, BLOCK, MODE,
                         IEEE)  # [BLOCK, BLOCK]
        p = tl.exp2(s - tl.max(s, 1)[:, None])  # [BLOCK, BLOCK]
        out = _dot(p.to(v.dtype), v, IEEE) / tl.sum(p, 1)[:, None]  # [BLOCK, HD_PAD]
        if HAS_RES:
            out += tl.load(RES + offs, mask=mask, other=0.).to(tl.float32)
        tl.store(O + offs, out.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwd_loop_kernel(
            Q, K, V, RES, O, LSE, ROT, DECAY, SEQS, qk_scale,
            D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr,
            HD: tl.constexpr, HD_PAD: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MODE: tl.constexpr, ROTATE: tl.constexpr, HAS_RES: tl.constexpr, STORE_LSE: tl.constexpr,
            IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        """Attention of one block of queries of a long sequence: an online softmax over its key blocks."""
        head, m_block, seq = _program(NUM_HEADS, (L + BLOCK_M - 1) // BLOCK_M)
        slope = _slope(DECAY, head)
        t_q = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        pos_q, row_q = _tokens(seq, t_q, t_q < L, D, H, W, MODE, INT64)  # [BLOCK_M]
        offs_q, mask_q = _offsets(row_q, t_q < L, head, C, HD, HD_PAD)  # [BLOCK_M, HD_PAD]
        q = _load_rotated(Q, offs_q, mask_q, ROT, pos_q, BLOCK_M, HD, HD_PAD, ROTATE)  # [BLOCK_M, HD_PAD]
        q = (q * qk_scale).to(V.dtype.element_ty)
        q0, q1, q2 = _coords(t_q, slope, D, H, W, MODE)  # [BLOCK_M]

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # [BLOCK_M] running max
        l_i = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M] running sum
        acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)  # [BLOCK_M, HD_PAD] running output
        for start in range(0, L, BLOCK_N):
            k, v, t_k = _keys(K, V, ROT, start, seq, head, D, H, W, C, HD, HD_PAD, L, MODE, ROTATE, INT64,
                              BLOCK_N)  # [BLOCK_N, HD_PAD], [BLOCK_N, HD_PAD], [BLOCK_N]
            k0, k1, k2 = _coords(t_k, slope, D, H, W, MODE)  # [BLOCK_N]
            s = _logits(q, k.to(v.dtype), _bias(q0, q1, q2, k0, k1, k2, D, MODE), t_k < L, IEEE,
                        L % BLOCK_N != 0)  # [BLOCK_M, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
            p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
            alpha = tl.exp2(m_i - m_new)  # [BLOCK_M] rescale of what came before
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        out = acc / l_i[:, None]  # [BLOCK_M, HD_PAD]
        if HAS_RES:
            out += tl.load(RES + offs_q, mask=mask_q, other=0.).to(tl.float32)
        tl.store(O + offs_q, out.to(O.dtype.element_ty), mask=mask_q)
        if STORE_LSE:
            tl.store(LSE + row_q * NUM_HEADS + head, m_i + tl.log2(l_i), mask=t_q < L)

    @triton.jit
    def _bwd_tile_kernel(
            Q, K, V, DO, DQ, DK, DV, ROT, DECAY, SEQS, qk_scale, scale,
            D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr,
            HD: tl.constexpr, HD_PAD: tl.constexpr, L: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr,
            MODE: tl.constexpr, ROTATE: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
            INT64: tl.constexpr,
    ):
        """Gradients of PACK short sequences of one head in one tile; the softmax is recomputed in registers
        and ``delta = rowsum(P * dP)`` needs no output."""
        head, _, group = _program(NUM_HEADS, 1)
        t, seg, seq = _packed(group, SEQS, L, PACK, BLOCK)  # [BLOCK]
        pos, row = _tokens(seq, t, seg < PACK, D, H, W, MODE, INT64)  # [BLOCK]
        offs, mask = _offsets(row, seg < PACK, head, C, HD, HD_PAD)  # [BLOCK, HD_PAD]
        dtype = V.dtype.element_ty
        q = _load_rotated(Q, offs, mask, ROT, pos, BLOCK, HD, HD_PAD, ROTATE)  # [BLOCK, HD_PAD] float32
        k = _load_rotated(K, offs, mask, ROT, pos, BLOCK, HD, HD_PAD, ROTATE).to(dtype)  # [BLOCK, HD_PAD]
        v = tl.load(V + offs, mask=mask, other=0.)  # [BLOCK, HD_PAD]
        do = tl.load(DO + offs, mask=mask, other=0.).to(dtype)  # [BLOCK, HD_PAD]
        s = _tile_logits((q * qk_scale).to(dtype), k, t, seg, _slope(DECAY, head), D, H, W, L, PACK, BLOCK, MODE,
                         IEEE)  # [BLOCK, BLOCK]
        p = tl.exp2(s - tl.max(s, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]  # [BLOCK, BLOCK]
        dv = _dot(tl.trans(p.to(dtype)), do, IEEE)  # [BLOCK, HD_PAD]
        dp = _dot(do, tl.trans(v), IEEE)  # [BLOCK, BLOCK]
        ds = (p * (dp - tl.sum(p * dp, 1)[:, None])).to(dtype)  # [BLOCK, BLOCK]
        dq = _rotate_back(_dot(ds, k, IEEE) * scale, ROT, pos, mask, BLOCK, HD, HD_PAD, ROTATE)  # [BLOCK, HD_PAD]
        dk = _rotate_back(_dot(tl.trans(ds), q.to(dtype), IEEE) * scale, ROT, pos, mask, BLOCK, HD, HD_PAD,
                          ROTATE)  # [BLOCK, HD_PAD]
        if ACCUMULATE:
            dq += tl.load(DQ + offs, mask=mask, other=0.).to(tl.float32)
            dk += tl.load(DK + offs, mask=mask, other=0.).to(tl.float32)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=mask)
        tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_dq_kernel(
            Q, K, V, O, RES, DO, DQ, LSE, DELTA, ROT, DECAY, SEQS, qk_scale, scale,
            D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr,
            HD: tl.constexpr, HD_PAD: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MODE: tl.constexpr, ROTATE: tl.constexpr, HAS_RES: tl.constexpr, ACCUMULATE: tl.constexpr,
            IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        """dq of one query block of a long sequence, in one sweep over the keys. First stores
        ``delta = rowsum(dO * O)`` for the dk/dv kernel, O being the pass's output minus what it added."""
        head, m_block, seq = _program(NUM_HEADS, (L + BLOCK_M - 1) // BLOCK_M)
        slope = _slope(DECAY, head)
        t_q = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        pos_q, row_q = _tokens(seq, t_q, t_q < L, D, H, W, MODE, INT64)  # [BLOCK_M]
        offs_q, mask_q = _offsets(row_q, t_q < L, head, C, HD, HD_PAD)  # [BLOCK_M, HD_PAD]
        dtype = V.dtype.element_ty
        q = _load_rotated(Q, offs_q, mask_q, ROT, pos_q, BLOCK_M, HD, HD_PAD, ROTATE)  # [BLOCK_M, HD_PAD]
        q = (q * qk_scale).to(dtype)
        q0, q1, q2 = _coords(t_q, slope, D, H, W, MODE)  # [BLOCK_M]
        do = tl.load(DO + offs_q, mask=mask_q, other=0.)  # [BLOCK_M, HD_PAD]
        o = tl.load(O + offs_q, mask=mask_q, other=0.).to(tl.float32)  # [BLOCK_M, HD_PAD]
        if HAS_RES:
            o -= tl.load(RES + offs_q, mask=mask_q, other=0.).to(tl.float32)
        delta = tl.sum(do.to(tl.float32) * o, 1)  # [BLOCK_M]
        tl.store(DELTA + row_q * NUM_HEADS + head, delta, mask=t_q < L)
        do = do.to(dtype)
        lse = tl.load(LSE + row_q * NUM_HEADS + head, mask=t_q < L, other=0.)  # [BLOCK_M]

        dq = tl.zeros([BLOCK_M, HD_PAD], tl.float32)  # [BLOCK_M, HD_PAD]
        for start in range(0, L, BLOCK_N):
            k, v, t_k = _keys(K, V, ROT, start, seq, head, D, H, W, C, HD, HD_PAD, L, MODE, ROTATE, INT64,
                              BLOCK_N)  # [BLOCK_N, HD_PAD], [BLOCK_N, HD_PAD], [BLOCK_N]
            k = k.to(dtype)
            k0, k1, k2 = _coords(t_k, slope, D, H, W, MODE)  # [BLOCK_N]
            p = tl.exp2(_logits(q, k, _bias(q0, q1, q2, k0, k1, k2, D, MODE), t_k < L, IEEE, L % BLOCK_N != 0)
                        - lse[:, None])  # [BLOCK_M, BLOCK_N]
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])  # [BLOCK_M, BLOCK_N]
            dq += _dot(ds.to(dtype), k, IEEE)
        dq = _rotate_back(dq * scale, ROT, pos_q, mask_q, BLOCK_M, HD, HD_PAD, ROTATE)  # [BLOCK_M, HD_PAD]
        if ACCUMULATE:
            dq += tl.load(DQ + offs_q, mask=mask_q, other=0.).to(tl.float32)
        tl.store(DQ + offs_q, dq.to(DQ.dtype.element_ty), mask=mask_q)

    @triton.jit
    def _bwd_dkdv_kernel(
            Q, K, V, DO, DK, DV, LSE, DELTA, ROT, DECAY, SEQS, qk_scale, scale,
            D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, NUM_HEADS: tl.constexpr,
            HD: tl.constexpr, HD_PAD: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MODE: tl.constexpr, ROTATE: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
            INT64: tl.constexpr,
    ):
        """dk and dv of one key block of a long sequence, in one sweep over the query blocks (the roles of
        :func:`_bwd_dq_kernel` swapped: the logits are transposed, keys by queries)."""
        head, n_block, seq = _program(NUM_HEADS, (L + BLOCK_N - 1) // BLOCK_N)
        slope = _slope(DECAY, head)
        t_k = n_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        pos_k, row_k = _tokens(seq, t_k, t_k < L, D, H, W, MODE, INT64)  # [BLOCK_N]
        offs_k, mask_k = _offsets(row_k, t_k < L, head, C, HD, HD_PAD)  # [BLOCK_N, HD_PAD]
        dtype = V.dtype.element_ty
        k = _load_rotated(K, offs_k, mask_k, ROT, pos_k, BLOCK_N, HD, HD_PAD, ROTATE).to(dtype)  # [BLOCK_N, HD_PAD]
        v = tl.load(V + offs_k, mask=mask_k, other=0.)  # [BLOCK_N, HD_PAD]
        k0, k1, k2 = _coords(t_k, slope, D, H, W, MODE)  # [BLOCK_N]

        dk = tl.zeros([BLOCK_N, HD_PAD], tl.float32)  # [BLOCK_N, HD_PAD]
        dv = tl.zeros([BLOCK_N, HD_PAD], tl.float32)  # [BLOCK_N, HD_PAD]
        for start in range(0, L, BLOCK_M):
            t_q = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
            pos_q, row_q = _tokens(seq, t_q, t_q < L, D, H, W, MODE, INT64)  # [BLOCK_M]
            offs_q, mask_q = _offsets(row_q, t_q < L, head, C, HD, HD_PAD)  # [BLOCK_M, HD_PAD]
            q = _load_rotated(Q, offs_q, mask_q, ROT, pos_q, BLOCK_M, HD, HD_PAD, ROTATE)  # [BLOCK_M, HD_PAD]
            do = tl.load(DO + offs_q, mask=mask_q, other=0.)  # [BLOCK_M, HD_PAD]
            lse = tl.load(LSE + row_q * NUM_HEADS + head, mask=t_q < L, other=0.)  # [BLOCK_M]
            delta = tl.load(DELTA + row_q * NUM_HEADS + head, mask=t_q < L, other=0.)  # [BLOCK_M]
            q0, q1, q2 = _coords(t_q, slope, D, H, W, MODE)  # [BLOCK_M]
            # the logits as the forward rounded them: q scaled, then cast
            p_t = tl.exp2(_logits(k, (q * qk_scale).to(dtype), _bias(k0, k1, k2, q0, q1, q2, D, MODE), t_q < L, IEEE,
                                  L % BLOCK_M != 0) - lse[None, :])  # [BLOCK_N, BLOCK_M]
            do = do.to(dtype)
            dv += _dot(p_t.to(dtype), do, IEEE)
            ds_t = p_t * (_dot(v, tl.trans(do), IEEE) - delta[None, :])  # [BLOCK_N, BLOCK_M]
            dk += _dot(ds_t.to(dtype), q.to(dtype), IEEE)
        dk = _rotate_back(dk * scale, ROT, pos_k, mask_k, BLOCK_N, HD, HD_PAD, ROTATE)  # [BLOCK_N, HD_PAD]
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


def pass_modes(ndim: int, decomposed: bool) -> Tuple[str, ...]:
    """The passes of one MaSA call over a grid of ``ndim`` (1, 2 or 3) axes, in order: one pass per axis
    (W, then H, then D) when ``decomposed``, else one over all tokens; a 1-D grid has the one pass along W.
    Raises ``ValueError`` for another ``ndim``."""
    if ndim not in (1, 2, 3):
        raise ValueError(f'MaSA grids have 1, 2 or 3 axes, got {ndim}')
    if ndim == 1:
        return ('w',)
    return ('w', 'h', 'd')[:ndim] if decomposed else ('full',)


def _length(mode: str, D: int, H: int, W: int) -> int:
    return {'w': W, 'h': H, 'd': D, 'full': D * H * W}[mode]


def _sequences(mode: str, B: int, D: int, H: int, W: int) -> int:
    return B * D * H * W // _length(mode, D, H, W)


def looped(mode: str, grid: Sequence[int], config: KernelConfig) -> bool:
    """Whether the sequences of pass ``mode`` over a (D, H, W) ``grid`` are longer than a tile (the looped
    kernels, which keep statistics)."""
    return _length(mode, *grid) > config.tile


def _grid(q: torch.Tensor) -> Tuple[int, int, int]:
    if q.dim() != 5:
        raise ValueError(f'the kernels take (B, D, H, W, C) tensors, got shape {tuple(q.shape)}')
    return tuple(q.shape[1:4])


def _shape(q: torch.Tensor, num_heads: int, mode: str, rotate: bool, ieee: bool) -> Dict[str, Any]:
    B, D, H, W, C = q.shape
    HD = C // num_heads
    return dict(D=D, H=H, W=W, C=C, NUM_HEADS=num_heads, HD=HD, HD_PAD=max(16, triton.next_power_of_2(HD)),
                L=_length(mode, D, H, W), MODE=_MODES[mode], ROTATE=rotate, IEEE=ieee, INT64=q.numel() >= 2 ** 31)


def _packing(length: int, seqs: int, config: KernelConfig) -> Tuple[int, int]:
    """(sequences per tile, tile size) for sequences of at most ``config.tile`` tokens."""
    pack = max(1, min(config.tile // length, seqs))
    return pack, max(16, triton.next_power_of_2(pack * length))


def forward_pass(q, k, v, res, out, lse, rotation, decay, scale: float, num_heads: int, mode: str, ieee: bool,
                 config: KernelConfig) -> Launch:
    """The launch that writes ``out = attention(q, k, v) (+ res)`` along ``mode``, and ``lse`` when given;
    ``rotation`` None skips the theta shift."""
    B, D, H, W, _ = q.shape
    shape = _shape(q, num_heads, mode, rotation is not None, ieee)
    seqs = _sequences(mode, B, D, H, W)
    args = (q, k, v, out if res is None else res, out)
    rotation = q if rotation is None else rotation  # a pointer the kernels do not read
    if not looped(mode, (D, H, W), config):
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
    B, D, H, W, _ = q.shape
    shape = _shape(q, num_heads, mode, rotation is not None, ieee)
    seqs = _sequences(mode, B, D, H, W)
    scales = (scale * _LOG2E, scale)
    rotation = q if rotation is None else rotation
    if not looped(mode, (D, H, W), config):
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


def stats_shapes(q: torch.Tensor, num_heads: int, passes: Sequence[str], keep_stats: bool,
                 config: KernelConfig) -> List[Tuple[int, ...]]:
    """Shapes of the log-sum-exp planes a forward keeps, one per pass of ``passes``: (B * D * H * W, heads)
    for looped passes when ``keep_stats``, else (0,)."""
    grid = _grid(q)
    return [(q.shape[0] * math.prod(grid), num_heads) if keep_stats and looped(mode, grid, config) else (0,)
            for mode in passes]


def masa_forward(q, k, v, residual, rotation, decay, scale: float, num_heads: int, passes: Sequence[str],
                 keep_stats: bool, ieee: bool, config: KernelConfig):
    """Outputs and launches of MaSA's attention (plus ``residual``) along ``passes``.

    q, k, v, residual: contiguous (B, D, H, W, C), heads interleaved in C; ``residual`` None adds
    nothing. ``rotation``: contiguous float32 (D, H, W, 1, C / heads / 2, 2) table of (cos, sin)
    pairs at raster index (d * H + i) * W + j, or None for no theta shift. ``decay``: (heads,)
    float32 log decay rates (negative). ``passes``: modes from :func:`pass_modes`; each pass's
    output is the next one's values. Returns ``(out, stats, launches)``: ``out`` (B, D, H, W, C) and
    the log-sum-exp planes of :func:`stats_shapes` are allocated, not yet written; running the
    launches in order writes them.
    """
    _grid(q)
    out = torch.empty_like(q)
    stats = [torch.zeros(shape, device=q.device, dtype=torch.float32)
             for shape in stats_shapes(q, num_heads, passes, keep_stats, config)]
    common = (rotation, decay, scale, num_heads)
    launches, values = [], v
    for i, mode in enumerate(passes):
        last = i == len(passes) - 1
        dest = out if last else torch.empty_like(q)
        launches.append(forward_pass(q, k, values, residual if last else None, dest, _plane(stats[i]), *common,
                                     mode, ieee, config))
        values = dest
    return out, stats, launches


def masa_backward(grad, q, k, v, out, residual, stats, rotation, decay, scale: float, num_heads: int,
                  passes: Sequence[str], ieee: bool, config: KernelConfig):
    """Gradients and launches of MaSA's attention along ``passes`` for the output gradient ``grad``
    (B, D, H, W, C); the arguments as in :func:`masa_forward`.

    ``out`` and ``residual`` are the forward's output and residual (read by a looped last pass for
    ``delta``; may be empty otherwise), ``stats`` its log-sum-exp planes. The outputs of the passes
    before the last are recomputed. Returns ``(dq, dk, dv, launches)``; q and k gradients are with
    respect to the inputs before the theta shift (the residual's gradient is ``grad`` itself).
    """
    _grid(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (rotation, decay, scale, num_heads)
    deltas = [torch.empty_like(s) for s in stats]
    launches, values = [], [v]  # the values of every pass
    for mode in passes[:-1]:
        values.append(torch.empty_like(q))
        launches.append(forward_pass(q, k, values[-2], None, values[-1], None, *common, mode, ieee, config))
    outputs = values[1:] + [out]
    d_out = grad
    for i in reversed(range(len(passes))):
        last = i == len(passes) - 1
        d_values = dv if i == 0 else torch.empty_like(q)
        launches += backward_pass(q, k, values[i], outputs[i], residual if last else None, d_out, dq, dk, d_values,
                                  stats[i], deltas[i], *common, passes[i], not last, ieee, config)
        d_out = d_values
    return dq, dk, dv, launches


def _plane(stats: torch.Tensor) -> Optional[torch.Tensor]:
    return stats if stats.numel() > 0 else None

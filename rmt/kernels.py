"""Triton kernels for MaSA: decayed attention with the rotary shift, the decay bias and the LCE add fused.

One op, ``rmt::masa``, computes a MaSA layer's attention from the raw projections q, k, v and the
LCE output, all (B, H, W, C) channels-last as the Linear layers write them:

* the theta shift of q and k is applied in registers from the stage's (cos, sin) pairs;
* the decay bias ``lambda_h * distance`` is computed in registers from the head's rate and the
  token indices (1-D along a row or column, Manhattan for full attention), so no mask is read;
* decomposed MaSA is two passes, along every row and then along every column of the row result;
  the column pass reads strided views of the same (B, H, W, C) memory, with no permute copies;
* the last pass adds the LCE output as it stores, so ``proj`` reads the sum directly.

Sequences no longer than ``TILE`` tokens are packed, several to a program, into one tile whose
off-diagonal blocks are masked; the backward pass recomputes that tile's softmax in registers. Longer
sequences (full attention at detection sizes, rows of large images) loop over key blocks with an
online softmax, save the log-sum-exp, and run a two-kernel backward (dq, then dk and dv); no (L x L)
tensor exists. Backward keeps only q, k and v (and those statistics): decomposed MaSA reruns its row
pass rather than keeping the row result, one tensor less per block for a fraction of the backward.

The op is a ``torch.library`` custom op with a fake implementation and autograd through the
backward kernels, so ``torch.compile(fullgraph=True)`` captures it. Triton is optional: without
it (CPU-only torch builds) :func:`supports` is false and MaSA uses its other paths. On the CPU the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite
checks them without a GPU.
"""
import math
import os
from typing import Tuple

import torch

try:  # CPU-only torch builds ship no Triton
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 (a broken install must not break `import rmt`)
    triton = None

__all__ = ['TILE', 'available', 'interpreting', 'supports', 'masa_attention']

# Sequences up to this many tokens run as one packed tile per program; longer ones loop over blocks.
TILE = 64
# Query and key block sizes of the looped kernels.
BLOCK_M = 64
BLOCK_N = 64
# Head dims the kernels accept (padded to a power of two of at least 16 inside the kernels).
MAX_HEAD_DIM = 64
NUM_WARPS = 4
_LOG2E = math.log2(math.e)


def available() -> bool:
    """Whether Triton could be imported."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def supports(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernels can run MaSA on a stage input like ``x`` with heads of ``head_dim``."""
    if triton is None or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return x.device.type == 'cuda' or (x.device.type == 'cpu' and interpreting())


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # float32 models keep float32 accuracy (Triton's default would be tf32)
            return tl.dot(a, b, input_precision='ieee')
        return tl.dot(a, b)

    @triton.jit
    def _program(DECAY, NUM_HEADS, BLOCKS):
        """(head, block, sequence group) of this program, and the head's decay rate in the exp2 domain.
        Heads vary fastest, so programs that run together read the same tokens' channels."""
        pid = tl.program_id(0)
        head = pid % NUM_HEADS
        slope = tl.load(DECAY + head).to(tl.float32) * 1.4426950408889634
        return head, (pid // NUM_HEADS) % BLOCKS, pid // (NUM_HEADS * BLOCKS), slope

    @triton.jit
    def _tokens(u, group, L, SEQS, PACK, N_INNER, HW, SEQ_POS, TOK_POS):
        """Index ``u`` among a program's packed sequences -> (valid, sequence slot, index in the sequence,
        raster position i * W + j, token row in the (B * H * W, C) matrix)."""
        g = u // L
        t = u - g * L
        s = group * PACK + g
        valid = (g < PACK) & (s < SEQS)
        b = s // N_INNER
        pos = (s - b * N_INNER) * SEQ_POS + t * TOK_POS
        row = b.to(tl.int64) * HW + pos
        return valid, g, t, pos, row

    @triton.jit
    def _offsets(row, valid, C, head, D, D_PAD: tl.constexpr):
        e = tl.arange(0, D_PAD)
        return row[:, None] * C + head * D + e[None, :], valid[:, None] & (e[None, :] < D)

    @triton.jit
    def _rotation(ROT, pos, valid, D, D_PAD: tl.constexpr):
        """(cos, sin) of every frequency at raster positions ``pos``, each (len(pos), D_PAD / 2)."""
        t = tl.arange(0, D_PAD // 2)
        ptr = ROT + pos[:, None, None] * D + t[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
        return tl.split(tl.load(ptr, mask=valid[:, None, None] & (t[None, :, None] < D // 2), other=0.))

    @triton.jit
    def _rotate(x, cos, sin, BLOCK: tl.constexpr, D_PAD: tl.constexpr, INVERSE: tl.constexpr):
        """Theta shift of (BLOCK, D_PAD) float32 rows: each pair (x0, x1) becomes (x0 cos - x1 sin,
        x1 cos + x0 sin); ``INVERSE`` rotates back (the shift's transpose, for gradients)."""
        if INVERSE:
            sin = -sin
        x0, x1 = tl.split(tl.reshape(x, (BLOCK, D_PAD // 2, 2)))
        return tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK, D_PAD))

    @triton.jit
    def _load_rotated(ptr, offs, mask, cos, sin, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
        return _rotate(tl.load(ptr + offs, mask=mask, other=0.).to(tl.float32), cos, sin, BLOCK, D_PAD, False)

    @triton.jit
    def _decay_bias(t_q, t_k, slope, IMG_W, DIST2D: tl.constexpr):
        """``slope * distance`` between query and key tokens: |t - t'| along a row or column, or the
        Manhattan distance between raster indices of a W-wide image."""
        if DIST2D:
            dist = tl.abs(t_q[:, None] // IMG_W - t_k[None, :] // IMG_W) + \
                tl.abs(t_q[:, None] % IMG_W - t_k[None, :] % IMG_W)
        else:
            dist = tl.abs(t_q[:, None] - t_k[None, :])
        return slope * dist.to(tl.float32)

    @triton.jit
    def _fwd_kernel(
            Q, K, V, RES, O, LSE, ROT, DECAY,
            L, SEQS, PACK, N_INNER, HW, C, NUM_HEADS, D, IMG_W, SEQ_POS, TOK_POS, M_BLOCKS, qk_scale,
            D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIST2D: tl.constexpr,
            SINGLE: tl.constexpr, HAS_RES: tl.constexpr, STORE_LSE: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Attention of one block of queries; ``SINGLE``: the program's packed sequences fit one tile, whose
        keys are its queries, so their tokens, rotation and loads are shared."""
        head, m_block, group, slope = _program(DECAY, NUM_HEADS, M_BLOCKS)
        dtype = V.dtype.element_ty

        valid_q, g_q, t_q, pos_q, row_q = _tokens(
            m_block * BLOCK_M + tl.arange(0, BLOCK_M), group, L, SEQS, PACK, N_INNER, HW, SEQ_POS, TOK_POS)
        offs_q, mask_q = _offsets(row_q, valid_q, C, head, D, D_PAD)
        cos_q, sin_q = _rotation(ROT, pos_q, valid_q, D, D_PAD)
        q = (_load_rotated(Q, offs_q, mask_q, cos_q, sin_q, BLOCK_M, D_PAD) * qk_scale).to(dtype)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for start in range(0, PACK * L, BLOCK_N):
            if SINGLE:
                valid_k, g_k, t_k, offs_k, mask_k, cos_k, sin_k = valid_q, g_q, t_q, offs_q, mask_q, cos_q, sin_q
            else:
                valid_k, g_k, t_k, pos_k, row_k = _tokens(
                    start + tl.arange(0, BLOCK_N), group, L, SEQS, PACK, N_INNER, HW, SEQ_POS, TOK_POS)
                offs_k, mask_k = _offsets(row_k, valid_k, C, head, D, D_PAD)
                cos_k, sin_k = _rotation(ROT, pos_k, valid_k, D, D_PAD)
            k = _load_rotated(K, offs_k, mask_k, cos_k, sin_k, BLOCK_N, D_PAD).to(dtype)
            v = tl.load(V + offs_k, mask=mask_k, other=0.)
            s = _dot(q, tl.trans(k), IEEE) + _decay_bias(t_q, t_k, slope, IMG_W, DIST2D)
            s = tl.where((g_q[:, None] == g_k[None, :]) & valid_k[None, :], s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(dtype), v, IEEE)
            m_i = m_new
        l_i = tl.where(l_i > 0, l_i, 1.)
        out = acc / l_i[:, None]
        if HAS_RES:
            out += tl.load(RES + offs_q, mask=mask_q, other=0.).to(tl.float32)
        tl.store(O + offs_q, out.to(O.dtype.element_ty), mask=mask_q)
        if STORE_LSE:
            tl.store(LSE + row_q * NUM_HEADS + head, m_i + tl.log2(l_i), mask=valid_q)

    @triton.jit
    def _bwd_tile_kernel(
            Q, K, V, DO, DQ, DK, DV, ROT, DECAY,
            L, SEQS, PACK, N_INNER, HW, C, NUM_HEADS, D, IMG_W, SEQ_POS, TOK_POS, qk_scale, scale,
            D_PAD: tl.constexpr, BLOCK: tl.constexpr, DIST2D: tl.constexpr, ACCUMULATE: tl.constexpr,
            IEEE: tl.constexpr,
    ):
        """Gradients of packed short sequences, all in one tile: the softmax, the output (for the
        row sums of dO * O) and every product are recomputed in registers."""
        head, _, group, slope = _program(DECAY, NUM_HEADS, 1)
        dtype = V.dtype.element_ty

        valid, g, t, pos, row = _tokens(tl.arange(0, BLOCK), group, L, SEQS, PACK, N_INNER, HW, SEQ_POS, TOK_POS)
        offs, mask = _offsets(row, valid, C, head, D, D_PAD)
        cos, sin = _rotation(ROT, pos, valid, D, D_PAD)
        q = _load_rotated(Q, offs, mask, cos, sin, BLOCK, D_PAD)
        k = _load_rotated(K, offs, mask, cos, sin, BLOCK, D_PAD).to(dtype)
        v = tl.load(V + offs, mask=mask, other=0.)
        do = tl.load(DO + offs, mask=mask, other=0.).to(dtype)

        s = _dot((q * qk_scale).to(dtype), tl.trans(k), IEEE) + _decay_bias(t, t, slope, IMG_W, DIST2D)
        s = tl.where((g[:, None] == g[None, :]) & valid[None, :], s, float('-inf'))
        p = tl.exp2(s - tl.maximum(tl.max(s, 1), -1.0e30)[:, None])
        total = tl.sum(p, 1)
        p = p / tl.where(total > 0, total, 1.)[:, None]
        p_lo = p.to(dtype)
        delta = tl.sum(do.to(tl.float32) * _dot(p_lo, v, IEEE), 1)
        ds = (p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])).to(dtype)
        dv = _dot(tl.trans(p_lo), do, IEEE)
        dq = _rotate(_dot(ds, k, IEEE) * scale, cos, sin, BLOCK, D_PAD, True)
        dk = _rotate(_dot(tl.trans(ds), q.to(dtype), IEEE) * scale, cos, sin, BLOCK, D_PAD, True)
        if ACCUMULATE:
            dq += tl.load(DQ + offs, mask=mask, other=0.).to(tl.float32)
            dk += tl.load(DK + offs, mask=mask, other=0.).to(tl.float32)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=mask)
        tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _key_block(K, V, ROT, q, lse, t_q, start, seq, slope, L, SEQS, N_INNER, HW, C, head, D, IMG_W, SEQ_POS,
                   TOK_POS, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DIST2D: tl.constexpr, IEEE: tl.constexpr):
        """Rotated keys, values and softmax probabilities (from the saved log-sum-exp) of the key block at
        ``start`` of a long sequence, for scaled queries ``q``."""
        valid_k, g_k, t_k, pos_k, row_k = _tokens(
            start + tl.arange(0, BLOCK_N), seq, L, SEQS, 1, N_INNER, HW, SEQ_POS, TOK_POS)
        offs_k, mask_k = _offsets(row_k, valid_k, C, head, D, D_PAD)
        cos_k, sin_k = _rotation(ROT, pos_k, valid_k, D, D_PAD)
        k = _load_rotated(K, offs_k, mask_k, cos_k, sin_k, BLOCK_N, D_PAD).to(q.dtype)
        v = tl.load(V + offs_k, mask=mask_k, other=0.)
        s = _dot(q, tl.trans(k), IEEE) + _decay_bias(t_q, t_k, slope, IMG_W, DIST2D)
        return k, v, tl.exp2(tl.where(valid_k[None, :], s, float('-inf')) - lse[:, None])

    @triton.jit
    def _bwd_dq_kernel(
            Q, K, V, DO, DQ, LSE, DELTA, ROT, DECAY,
            L, SEQS, N_INNER, HW, C, NUM_HEADS, D, IMG_W, SEQ_POS, TOK_POS, M_BLOCKS, qk_scale, scale,
            D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIST2D: tl.constexpr,
            ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
    ):
        """dq of one query block of a long sequence. A first sweep over the keys rebuilds the block's
        output for the row sums of dO * O (stored for the dk/dv kernel), a second accumulates dq."""
        head, m_block, seq, slope = _program(DECAY, NUM_HEADS, M_BLOCKS)
        dtype = V.dtype.element_ty

        valid_q, g_q, t_q, pos_q, row_q = _tokens(
            m_block * BLOCK_M + tl.arange(0, BLOCK_M), seq, L, SEQS, 1, N_INNER, HW, SEQ_POS, TOK_POS)
        offs_q, mask_q = _offsets(row_q, valid_q, C, head, D, D_PAD)
        cos_q, sin_q = _rotation(ROT, pos_q, valid_q, D, D_PAD)
        q = (_load_rotated(Q, offs_q, mask_q, cos_q, sin_q, BLOCK_M, D_PAD) * qk_scale).to(dtype)
        do = tl.load(DO + offs_q, mask=mask_q, other=0.).to(dtype)
        lse = tl.load(LSE + row_q * NUM_HEADS + head, mask=valid_q, other=0.)

        out = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for start in range(0, L, BLOCK_N):
            k, v, p = _key_block(K, V, ROT, q, lse, t_q, start, seq, slope, L, SEQS, N_INNER, HW, C, head, D, IMG_W,
                                 SEQ_POS, TOK_POS, D_PAD, BLOCK_N, DIST2D, IEEE)
            out += _dot(p.to(dtype), v, IEEE)
        delta = tl.sum(do.to(tl.float32) * out, 1)
        tl.store(DELTA + row_q * NUM_HEADS + head, delta, mask=valid_q)

        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for start in range(0, L, BLOCK_N):
            k, v, p = _key_block(K, V, ROT, q, lse, t_q, start, seq, slope, L, SEQS, N_INNER, HW, C, head, D, IMG_W,
                                 SEQ_POS, TOK_POS, D_PAD, BLOCK_N, DIST2D, IEEE)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _dot(ds.to(dtype), k, IEEE)
        dq = _rotate(dq * scale, cos_q, sin_q, BLOCK_M, D_PAD, True)
        if ACCUMULATE:
            dq += tl.load(DQ + offs_q, mask=mask_q, other=0.).to(tl.float32)
        tl.store(DQ + offs_q, dq.to(DQ.dtype.element_ty), mask=mask_q)

    @triton.jit
    def _bwd_dkdv_kernel(
            Q, K, V, DO, DK, DV, LSE, DELTA, ROT, DECAY,
            L, SEQS, N_INNER, HW, C, NUM_HEADS, D, IMG_W, SEQ_POS, TOK_POS, N_BLOCKS, qk_scale, scale,
            D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIST2D: tl.constexpr,
            ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
    ):
        """dk and dv of one key block of a long sequence, sweeping over the query blocks."""
        head, n_block, seq, slope = _program(DECAY, NUM_HEADS, N_BLOCKS)
        dtype = V.dtype.element_ty

        valid_k, g_k, t_k, pos_k, row_k = _tokens(
            n_block * BLOCK_N + tl.arange(0, BLOCK_N), seq, L, SEQS, 1, N_INNER, HW, SEQ_POS, TOK_POS)
        offs_k, mask_k = _offsets(row_k, valid_k, C, head, D, D_PAD)
        cos_k, sin_k = _rotation(ROT, pos_k, valid_k, D, D_PAD)
        k = _load_rotated(K, offs_k, mask_k, cos_k, sin_k, BLOCK_N, D_PAD).to(dtype)
        v = tl.load(V + offs_k, mask=mask_k, other=0.)

        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        for start in range(0, L, BLOCK_M):
            valid_q, g_q, t_q, pos_q, row_q = _tokens(
                start + tl.arange(0, BLOCK_M), seq, L, SEQS, 1, N_INNER, HW, SEQ_POS, TOK_POS)
            offs_q, mask_q = _offsets(row_q, valid_q, C, head, D, D_PAD)
            q = _load_rotated(Q, offs_q, mask_q, *_rotation(ROT, pos_q, valid_q, D, D_PAD), BLOCK_M, D_PAD)
            do = tl.load(DO + offs_q, mask=mask_q, other=0.).to(dtype)
            lse = tl.load(LSE + row_q * NUM_HEADS + head, mask=valid_q, other=0.)
            delta = tl.load(DELTA + row_q * NUM_HEADS + head, mask=valid_q, other=0.)
            s_t = _dot(k, tl.trans((q * qk_scale).to(dtype)), IEEE) + _decay_bias(t_k, t_q, slope, IMG_W, DIST2D)
            p_t = tl.exp2(tl.where(valid_q[None, :], s_t, float('-inf')) - lse[None, :])
            dv += _dot(p_t.to(dtype), do, IEEE)
            ds_t = p_t * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
            dk += _dot(ds_t.to(dtype), q.to(dtype), IEEE)
        dk = _rotate(dk * scale, cos_k, sin_k, BLOCK_N, D_PAD, True)
        if ACCUMULATE:
            dk += tl.load(DK + offs_k, mask=mask_k, other=0.).to(tl.float32)
        tl.store(DK + offs_k, dk.to(DK.dtype.element_ty), mask=mask_k)
        tl.store(DV + offs_k, dv.to(DV.dtype.element_ty), mask=mask_k)


# --- launches ----------------------------------------------------------------------------------------

def _geometry(mode: str, B: int, H: int, W: int) -> Tuple[int, int, int, int, int, bool]:
    """(sequence length, sequence count, sequences per image row of the index, raster stride between
    sequences, raster stride between a sequence's tokens, Manhattan distance) of one pass."""
    if mode == 'row':
        return W, B * H, H, W, 1, False
    if mode == 'col':
        return H, B * W, W, 1, W, False
    return H * W, B, 1, 0, 1, True


def _looped(length: int) -> bool:
    return length > TILE


def _common(q: torch.Tensor, num_heads: int, mode: str):
    B, H, W, C = q.shape
    D = C // num_heads
    L, seqs, n_inner, seq_pos, tok_pos, dist2d = _geometry(mode, B, H, W)
    return dict(L=L, SEQS=seqs, N_INNER=n_inner, HW=H * W, C=C, NUM_HEADS=num_heads, D=D, IMG_W=W,
                SEQ_POS=seq_pos, TOK_POS=tok_pos), dict(D_PAD=max(16, triton.next_power_of_2(D)), DIST2D=dist2d,
                                                         IEEE=q.dtype == torch.float32)


def _packing(length: int, seqs: int) -> Tuple[int, int]:
    """(sequences per program, tile size) for sequences of at most TILE tokens."""
    pack = max(1, min(TILE // length, seqs))
    return pack, max(16, triton.next_power_of_2(pack * length))


def _forward_pass(q, k, v, res, out, lse, rotation, decay, scale, num_heads, mode):
    args, consts = _common(q, num_heads, mode)
    L, seqs = args['L'], args['SEQS']
    single = not _looped(L)
    if single:
        pack, block_m = _packing(L, seqs)
        block_n = block_m
    else:
        pack, block_m, block_n = 1, BLOCK_M, BLOCK_N
    m_blocks = triton.cdiv(pack * L, block_m)
    grid = (num_heads * m_blocks * triton.cdiv(seqs, pack),)
    _fwd_kernel[grid](
        q, k, v, out if res is None else res, out, out if lse is None else lse, rotation, decay,
        PACK=pack, M_BLOCKS=m_blocks, qk_scale=scale * _LOG2E, BLOCK_M=block_m, BLOCK_N=block_n,
        SINGLE=single, HAS_RES=res is not None, STORE_LSE=lse is not None, num_warps=NUM_WARPS, **args, **consts)


def _backward_pass(q, k, v, do, dq, dk, dv, lse, rotation, decay, scale, num_heads, mode, accumulate):
    args, consts = _common(q, num_heads, mode)
    L, seqs = args['L'], args['SEQS']
    if not _looped(L):
        pack, block = _packing(L, seqs)
        _bwd_tile_kernel[(num_heads * triton.cdiv(seqs, pack),)](
            q, k, v, do, dq, dk, dv, rotation, decay, PACK=pack, qk_scale=scale * _LOG2E, scale=scale,
            BLOCK=block, ACCUMULATE=accumulate, num_warps=NUM_WARPS, **args, **consts)
        return
    if lse is None or lse.numel() == 0:
        raise RuntimeError('rmt::masa backward: the forward pass ran without keeping its softmax statistics')
    delta = torch.empty_like(lse)
    m_blocks, n_blocks = triton.cdiv(L, BLOCK_M), triton.cdiv(L, BLOCK_N)
    common = dict(qk_scale=scale * _LOG2E, scale=scale, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ACCUMULATE=accumulate,
                  num_warps=NUM_WARPS, **args, **consts)
    _bwd_dq_kernel[(num_heads * m_blocks * seqs,)](
        q, k, v, do, dq, lse, delta, rotation, decay, M_BLOCKS=m_blocks, **common)
    _bwd_dkdv_kernel[(num_heads * n_blocks * seqs,)](
        q, k, v, do, dk, dv, lse, delta, rotation, decay, N_BLOCKS=n_blocks, **common)


def _stats_shape(q: torch.Tensor, num_heads: int, decomposed: bool, keep_stats: bool):
    B, H, W, _ = q.shape
    looped = _looped(max(H, W)) if decomposed else _looped(H * W)
    if not (keep_stats and looped):
        return (0,)
    return (2 if decomposed else 1, B * H * W, num_heads)


def _row_pass(q, k, v, stats, rotation, decay, scale, num_heads):
    """The first pass of decomposed MaSA, attention along every row, into a new tensor."""
    rows = torch.empty_like(q)
    _forward_pass(q, k, v, None, rows, stats if _looped(q.shape[2]) else None, rotation, decay, scale, num_heads,
                  'row')
    return rows


@torch.library.custom_op('rmt::masa', mutates_args=())
def _masa(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: torch.Tensor, rotation: torch.Tensor,
        decay: torch.Tensor, scale: float, num_heads: int, decomposed: bool, keep_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(attention + lce, the log-sum-exp of looped passes when ``keep_stats``)."""
    if triton is None:
        raise RuntimeError('rmt::masa needs Triton, which this torch build does not include')
    out = torch.empty_like(q)
    lse = q.new_empty(_stats_shape(q, num_heads, decomposed, keep_stats), dtype=torch.float32)
    stats = [None, None] if lse.numel() == 0 else [lse[0], lse[-1]]
    if decomposed:
        rows = _row_pass(q, k, v, stats[0], rotation, decay, scale, num_heads)
        _forward_pass(q, k, rows, lce, out, stats[1] if _looped(q.shape[1]) else None, rotation, decay, scale,
                      num_heads, 'col')
    else:
        _forward_pass(q, k, v, lce, out, stats[0], rotation, decay, scale, num_heads, 'full')
    return out, lse


@_masa.register_fake
def _(q, k, v, lce, rotation, decay, scale, num_heads, decomposed, keep_stats):
    return torch.empty_like(q), q.new_empty(_stats_shape(q, num_heads, decomposed, keep_stats), dtype=torch.float32)


@torch.library.custom_op('rmt::masa_backward', mutates_args=())
def _masa_backward(
        grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
        rotation: torch.Tensor, decay: torch.Tensor, scale: float, num_heads: int, decomposed: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k and v (before the theta shift) from the gradient of the op's output."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    stats = [None, None] if lse.numel() == 0 else [lse[0], lse[-1]]
    if decomposed:
        rows = _row_pass(q, k, v, stats[0], rotation, decay, scale, num_heads)
        d_rows = torch.empty_like(rows)
        _backward_pass(q, k, rows, grad, dq, dk, d_rows, stats[1], rotation, decay, scale, num_heads, 'col', False)
        _backward_pass(q, k, v, d_rows, dq, dk, dv, stats[0], rotation, decay, scale, num_heads, 'row', True)
    else:
        _backward_pass(q, k, v, grad, dq, dk, dv, stats[0], rotation, decay, scale, num_heads, 'full', False)
    return dq, dk, dv


@_masa_backward.register_fake
def _(grad, q, k, v, lse, rotation, decay, scale, num_heads, decomposed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, _lce, rotation, decay, scale, num_heads, decomposed, _keep = inputs
    _out, lse = output
    ctx.save_for_backward(q, k, v, lse, rotation, decay)
    ctx.config = (scale, num_heads, decomposed)


def _backward(ctx, grad, _grad_lse):
    dq = dk = dv = None
    if any(ctx.needs_input_grad[:3]):
        q, k, v, lse, rotation, decay = ctx.saved_tensors
        dq, dk, dv = _masa_backward(grad.contiguous(), q, k, v, lse, rotation, decay, *ctx.config)
    return dq, dk, dv, grad, None, None, None, None, None, None


_masa.register_autograd(_backward, setup_context=_setup_context)


def masa_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lce: torch.Tensor, rotation: torch.Tensor,
        decay: torch.Tensor, scale: float, num_heads: int, decomposed: bool,
) -> torch.Tensor:
    """MaSA's attention plus LCE: ``lce + softmax(theta(q) theta(k)^T * scale + decay bias) v``.

    q, k, v, lce: (B, H, W, C) projections, q and k before the theta shift; ``rotation``: the stage's
    (cos, sin) pairs, float32 (H, W, 1, C / num_heads / 2, 2); ``decay``: per-head log decay (num_heads,).
    Decomposed: along rows, then columns of the row result; else full attention over all H * W tokens.
    """
    keep_stats = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    lce = lce.to(q.dtype)
    out, _ = _masa(q.contiguous(), k.contiguous(), v.contiguous(), lce.contiguous(),
                      rotation.contiguous(), decay.contiguous(), float(scale), int(num_heads), bool(decomposed),
                      keep_stats)
    return out

"""The naive MaSA: dense bias matrices and explicit softmax, what every path of :func:`rmt.attention.masa`
and the Triton kernels are tested against. Slow and memory-hungry by design: nothing here is shared
with the fast paths."""
from typing import List, Optional

import torch

__all__ = ['masa_reference']


def masa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, grid: List[int],
                   decomposed: bool = False, attn_mask: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0,
                   scale: Optional[float] = None) -> torch.Tensor:
    """:func:`rmt.attention.masa` on (B, n, P + L, d) tokens, spelled out (same arguments; decay (n,),
    (B, n) or (B, n, L))."""
    B, n, N, d = q.shape
    P, L = num_prefix_tokens, N - num_prefix_tokens
    scale = d ** -0.5 if scale is None else scale
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in grid], indexing='ij'), -1).reshape(L, -1)
    rate = (decay if decay.dim() == 3 else decay.reshape(-1, n, 1)).to(q.dtype).expand(B, n, L)
    keep = torch.ones(B, N, dtype=torch.bool) if attn_mask is None else attn_mask

    def attend(queries, keys, values, bias, allowed):  # bias and allowed: (B, n, len(queries), len(keys))
        logits = (queries @ keys.transpose(-2, -1) * scale + bias).masked_fill(~allowed, float('-inf'))
        return torch.nan_to_num(logits.softmax(-1)) @ values

    every = keep[:, None, None, :].expand(B, n, N, N)
    if not decomposed:
        bias = torch.zeros(B, n, N, N, dtype=q.dtype)
        bias[:, :, P:, P:] = rate[..., None] * (coords[:, None] - coords[None]).abs().sum(-1)
        out = attend(q, k, v, bias, every)
    else:
        values = v[:, :, P:]
        for axis in reversed(range(len(grid))):
            others = [a for a in range(len(grid)) if a != axis]
            same = (coords[:, None, others] == coords[None, :, others]).all(-1)  # (L, L): one axis sequence
            bias = torch.zeros(B, n, L, N, dtype=q.dtype)
            bias[..., P:] = rate[..., None] * (coords[:, None, axis] - coords[None, :, axis]).abs()
            allowed = every[:, :, P:].clone()
            allowed[..., P:] &= same
            values = attend(q[:, :, P:], k, torch.cat([v[:, :, :P], values], 2), bias, allowed)
            values = values.masked_fill(~keep[:, None, P:, None], 0)
        prefix = attend(q[:, :, :P], k, v, torch.zeros(B, n, P, N, dtype=q.dtype), every[:, :, :P])
        out = torch.cat([prefix, values], 2)
    return out.masked_fill(~keep[:, None, :, None], 0)

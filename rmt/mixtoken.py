"""MixToken (Jiang et al., NeurIPS 2021), as the RMT release applies it inside its token-labeling models.

In training, the tokens of one box (on the last stage's grid, scaled to the stem's) are swapped with
the batch's mirror sample (i with B-1-i) right after the stem; the per-token aux outputs of that box
are swapped back, so each token's target is its own image's. The class target is mixed by area
instead (:func:`mixtoken_lam`). The model (:meth:`rmt.RMT.set_token_label_training`) and the loss
(:class:`rmt.token_labeling.TokenLabelLoss`) share these pieces.
"""
import math
from typing import NamedTuple, Tuple

import torch

__all__ = ['MixTokenBox', 'sample_mixtoken_box', 'mix_tokens', 'unmix_tokens', 'mixtoken_lam', 'TokenLabelOutput']


class MixTokenBox(NamedTuple):
    """Rows ``top:bottom`` and columns ``left:right`` of the output token grid (empty when the areas are 0)."""
    top: int
    left: int
    bottom: int
    right: int


def sample_mixtoken_box(grid: Tuple[int, int], alpha: float = 1.0) -> MixTokenBox:
    """One MixToken box on the output token ``grid`` (gh, gw), as the release samples it (R ``RMT.py``).

    lam ~ Beta(alpha, alpha) (the release: 1, uniform); sides ``int(g * sqrt(1 - lam))``; a centre at a
    random token; corners centre -/+ side // 2, clipped to the grid. Draws from torch's global generator,
    which the trainer seeds per epoch and rank, so every process (GPU batch) gets its own box.
    """
    gh, gw = grid
    lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    cut = math.sqrt(1. - lam)
    cut_h, cut_w = int(gh * cut), int(gw * cut)
    cy, cx = int(torch.randint(gh, ())), int(torch.randint(gw, ()))
    return MixTokenBox(max(cy - cut_h // 2, 0), max(cx - cut_w // 2, 0), min(cy + cut_h // 2, gh),
                       min(cx + cut_w // 2, gw))


def mix_tokens(x: torch.Tensor, box: MixTokenBox, scale: int = 1) -> torch.Tensor:
    """Tokens (B, H, W, C) with those in ``box`` (output-grid units, times ``scale``) taken from the batch
    flipped (sample i gets sample B-1-i's). ``scale`` is the stride from ``x``'s grid to the output grid
    (8 from RMT's stem to its last stage)."""
    t, l, b, r = (v * scale for v in box)
    out = x.clone()
    out[:, t:b, l:r] = x.flip(0)[:, t:b, l:r]
    return out


def unmix_tokens(aux: torch.Tensor, box: MixTokenBox) -> torch.Tensor:
    """Aux outputs (B, gh, gw, C) with every token of ``box`` moved back to the sample its input came from.

    Swapping the box with the flipped batch undoes itself, so this is :func:`mix_tokens` at the output grid.
    """
    return mix_tokens(aux, box)


def mixtoken_lam(box: MixTokenBox, grid: Tuple[int, int]) -> float:
    """The share of the output grid each sample keeps: 1 - box area / tokens."""
    return 1. - (box.bottom - box.top) * (box.right - box.left) / (grid[0] * grid[1])


class TokenLabelOutput(NamedTuple):
    """What a ``*_tl`` model returns when trained with token labels."""
    logits: torch.Tensor      # (B, C) class logits of the mixed images
    aux_logits: torch.Tensor  # (B, gh, gw, C) per-token logits, unmixed (:func:`unmix_tokens`)
    box: MixTokenBox          # the MixToken box on the (gh, gw) grid

"""The evaluation loop of training and ``scripts/validate.py``: one implementation, so both report the same numbers."""
from typing import Dict

import torch
from torch import nn

__all__ = ['evaluate']


@torch.no_grad()
def evaluate(model, loader, device, amp_autocast, channels_last=False, distributed=False) -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 (percent) of ``model`` over ``loader``, exact per-sample means."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1 hits, top5 hits, count
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(images)
        output = output.float()
        k = min(5, output.shape[-1])
        hits = output.topk(k, dim=-1).indices.eq(target[:, None])
        totals += torch.stack([
            nn.functional.cross_entropy(output, target, reduction='sum').double(),
            hits[:, :1].sum().double(), hits.sum().double(),
            torch.tensor(float(len(target)), device=device, dtype=torch.float64)])
    if distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.)
    return dict(loss=loss / count, top1=100. * top1 / count, top5=100. * top5 / count)

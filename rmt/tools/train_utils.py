"""What ``scripts/train.py`` needs beyond the library: the checkpoint saver, DDP set-up, a Pillow fix.

* :class:`AtomicCheckpointSaver`: timm's checkpoint files (``last``, ``model_best``, the best
  ``checkpoint-N``) and contents, plus the LR scheduler's state, every file written whole.
* :func:`distributed_data_parallel`: the model in ``DistributedDataParallel``, gradients in its
  parameters' layout.
* :func:`allow_posterize_to_zero_bits`: timm's RandAugment at the paper's magnitude with Pillow >= 13,
  for the duration of a ``with`` block.
"""
import os
import shutil
from contextlib import contextmanager
from functools import partial
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from timm.utils import get_state_dict, unwrap_model

from ..atomic import atomic_replace, atomic_torch_save, atomic_write

__all__ = ['AtomicCheckpointSaver', 'distributed_data_parallel', 'allow_posterize_to_zero_bits']


class AtomicCheckpointSaver:
    """A training run's checkpoints in ``checkpoint_dir``, in timm's layout, each file whole or absent.

    :meth:`save_checkpoint` writes ``last.pth.tar`` every epoch, copies it to ``checkpoint-EPOCH.pth.tar``
    while that epoch ranks among the ``max_history`` best (by ``metric``, lower first with ``decreasing``,
    ties keep the earlier epoch; epochs without a metric rank after those with one, newest first) and
    to ``model_best.pth.tar`` when it is the best yet. A checkpoint holds what timm's ``CheckpointSaver``
    writes (``epoch``, ``arch``, ``state_dict``, ``state_dict_ema``, ``optimizer``, the loss scaler's
    state, ``args``, ``metric``, ``version``), the LR scheduler's state (``lr_scheduler``) and this
    saver's ranking (``saver``, for :meth:`load_state_dict` on resume).

    timm's saver writes without fsync and removes ``last`` before renaming the new one over it, so a
    kill in between leaves none; here a write goes through :func:`rmt.atomic.atomic_write`, and the
    copies are hard links where the filesystem has them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, args=None, model_ema=None,
                 amp_scaler=None, lr_scheduler=None, checkpoint_dir: str = '', decreasing: bool = False,
                 max_history: int = 10):
        if max_history < 1:
            raise ValueError(f'max_history must be at least 1, got {max_history}')
        self.model, self.optimizer, self.args = model, optimizer, args
        self.model_ema, self.amp_scaler, self.lr_scheduler = model_ema, amp_scaler, lr_scheduler
        self.checkpoint_dir, self.decreasing, self.max_history = checkpoint_dir, decreasing, max_history
        self.history: List[Tuple[int, Optional[float]]] = []  # kept (epoch, metric), best first
        self.best_epoch: Optional[int] = None
        self.best_metric: Optional[float] = None

    def save_checkpoint(self, epoch: int, metric: Optional[float] = None) -> Tuple[Optional[float], Optional[int]]:
        """Save the run's state at the end of ``epoch``; returns the best (metric, epoch) so far (None before one)."""
        ranked = sorted([h for h in self.history if h[0] != epoch and h[1] is not None] +
                        ([(epoch, metric)] if metric is not None else []),
                        key=lambda h: h[1], reverse=not self.decreasing)
        unranked = sorted([h for h in self.history if h[0] != epoch and h[1] is None] +
                          ([(epoch, None)] if metric is None else []), key=lambda h: -h[0])
        history = ranked + unranked
        kept, dropped = history[:self.max_history], history[self.max_history:]
        is_best = metric is not None and (self.best_metric is None or self._better(metric, self.best_metric))
        best = (metric, epoch) if is_best else (self.best_metric, self.best_epoch)

        last = self._path('last')
        atomic_torch_save(self._state(epoch, metric, _ranking(kept, *best)), last)
        self.history, (self.best_metric, self.best_epoch) = kept, best  # once `last` holds them
        if any(e == epoch for e, _ in kept):
            self._duplicate(last, self._path(f'checkpoint-{epoch}'))
        if is_best:
            self._duplicate(last, self._path('model_best'))
        for e, _ in dropped:
            if e != epoch and os.path.exists(self._path(f'checkpoint-{e}')):
                os.remove(self._path(f'checkpoint-{e}'))
        return self.best_metric, self.best_epoch

    def state_dict(self) -> Dict[str, Any]:
        """The ranking: kept epochs with their metrics, and the best."""
        return _ranking(self.history, self.best_metric, self.best_epoch)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the ranking of a checkpoint's ``saver`` state (epochs whose file is gone are dropped)."""
        self.history = [(int(e), m) for e, m in state.get('history', [])
                        if os.path.exists(self._path(f'checkpoint-{e}'))]
        self.best_epoch, self.best_metric = state.get('best_epoch'), state.get('best_metric')

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def _path(self, name: str) -> str:
        return os.path.join(self.checkpoint_dir, name + '.pth.tar')

    def _state(self, epoch: int, metric: Optional[float], ranking: Dict[str, Any]) -> Dict[str, Any]:
        state = {'epoch': epoch, 'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
                 'state_dict': get_state_dict(self.model, unwrap_model), 'optimizer': self.optimizer.state_dict(),
                 'version': 2}  # timm's: the saved epoch is complete
        if self.args is not None:
            state['args'] = self.args
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, unwrap_model)
        if self.lr_scheduler is not None:
            state['lr_scheduler'] = self.lr_scheduler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = ranking
        return state

    @staticmethod
    def _duplicate(src: str, dst: str) -> None:
        tmp = dst + '.tmp'
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(src, tmp)
        except (OSError, NotImplementedError):  # no hard links on this filesystem: a copy
            atomic_write(dst, partial(_copy_into, src))
            return
        atomic_replace(tmp, dst)


def _ranking(history, best_metric, best_epoch) -> Dict[str, Any]:
    return dict(history=[list(h) for h in history], best_epoch=best_epoch, best_metric=best_metric)


def _copy_into(src: str, f: BinaryIO) -> None:
    with open(src, 'rb') as source:
        shutil.copyfileobj(source, f)


def distributed_data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in ``DistributedDataParallel``, each gradient handed to DDP in its parameter's layout.

    A depthwise kernel's weight (C, 1, k, k), strides (k*k, k*k, k, 1), gets from the convolution of
    channels-last features (as RMT's blocks run it) a gradient with strides (k*k, 1, k, 1): the same
    memory order (a size-1 dimension is never stepped along), but DDP compares strides and warned
    "Grad strides do not match bucket view strides" on every run. Such a gradient is viewed with its
    parameter's strides (no copy) before DDP reads it.
    """
    for p in model.parameters():
        if p.requires_grad and 1 in p.shape:
            p.register_hook(partial(_in_layout_of, p.stride()))
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)


def _in_layout_of(stride: Tuple[int, ...], grad: torch.Tensor) -> Optional[torch.Tensor]:
    """``grad`` viewed with ``stride`` when the two differ only on size-1 dimensions, else None (unchanged)."""
    if grad.layout != torch.strided or grad.stride() == stride:
        return None
    if any(n != 1 and s != t for n, s, t in zip(grad.shape, grad.stride(), stride)):
        return None
    return grad.as_strided(grad.shape, stride)


@contextmanager
def allow_posterize_to_zero_bits():
    """Keep timm's RandAugment working with Pillow >= 13 inside the ``with`` block (training with RandAugment).

    ``rand-m9-mstd0.5-inc1`` (the paper's policy) asks for 0 bits when the noisy magnitude reaches
    its maximum, which older Pillow turned into a black image and Pillow 13 rejects with a
    ``ValueError`` that stops training at random. Inside the block (and in data-loader workers started
    in it) ``bits == 0`` gives the old result; Pillow is restored on exit.
    """
    from PIL import Image, ImageOps
    posterize = ImageOps.posterize

    def posterize_any_bits(image, bits):
        if bits == 0:
            return Image.new(image.mode, image.size)  # every bit cleared
        return posterize(image, bits)
    ImageOps.posterize = posterize_any_bits
    try:
        yield
    finally:
        ImageOps.posterize = posterize

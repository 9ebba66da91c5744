"""What ``scripts/train.py`` needs beyond the library: the training checkpoint saver, a Pillow fix.

* :class:`AtomicCheckpointSaver`: timm's ``CheckpointSaver`` (its history, ranking and file layout),
  with the LR scheduler's state in each checkpoint and every file written whole.
* :func:`allow_posterize_to_zero_bits`: timm's RandAugment at the paper's magnitude with Pillow >= 13,
  for the duration of a ``with`` block.
"""
import os
import shutil
from contextlib import contextmanager
from functools import partial
from typing import Any, BinaryIO, Dict

import torch

from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

from ..atomic import atomic_replace, atomic_write

__all__ = ['AtomicCheckpointSaver', 'allow_posterize_to_zero_bits']


class _RunState:
    """timm's ``task`` hook of ``CheckpointSaver``: the weights, the EMA weights and the LR scheduler's state."""

    def __init__(self, model, model_ema=None, lr_scheduler=None):
        self.model, self.model_ema, self.lr_scheduler = model, model_ema, lr_scheduler

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=unwrap_model) -> Dict[str, Any]:
        if ema:
            return {} if self.model_ema is None else {'state_dict_ema': get_state_dict(self.model_ema, unwrap_fn)}
        state = {'state_dict': get_state_dict(self.model, unwrap_fn)}
        if self.lr_scheduler is not None:
            state['lr_scheduler'] = self.lr_scheduler.state_dict()
        return state


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` with the LR scheduler's state in each checkpoint and crash-safe files.

    The checkpoint's contents are timm's (``task`` adds the scheduler). Only its three file operations are
    wrapped: timm writes ``tmp`` without fsync and unlinks ``last`` before renaming ``tmp`` over it, so a
    kill between the two leaves no ``last``; here every file appears whole or not at all, and ``last``
    always exists once written.
    """

    def __init__(self, *args, lr_scheduler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = _RunState(self.model, self.model_ema, lr_scheduler)

    def _save(self, save_path, epoch, metric=None):
        atomic_write(save_path, lambda f: super(AtomicCheckpointSaver, self)._save(f, epoch, metric))

    def _replace(self, src, dst):
        atomic_replace(src, dst)

    def _duplicate(self, src, dst):
        tmp = dst + '.tmp'
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(src, tmp)
        except (OSError, NotImplementedError):  # no hard links on this filesystem: a copy
            atomic_write(dst, partial(_copy_into, src))
            return
        atomic_replace(tmp, dst)


def _copy_into(src: str, f: BinaryIO) -> None:
    with open(src, 'rb') as source:
        shutil.copyfileobj(source, f)


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

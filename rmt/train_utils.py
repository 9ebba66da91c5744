"""What the scripts need beyond the library: files written whole, the training checkpoint saver, a Pillow fix.

* :func:`atomic_write` / :func:`atomic_torch_save`: a file appears whole or not at all (temporary file
  in the same folder, fsync, rename), used for checkpoints, converted weights and label files.
* :class:`AtomicCheckpointSaver`: timm's ``CheckpointSaver`` (its history, ranking and file layout),
  with the LR scheduler's state in each checkpoint and every file written whole.
* :func:`allow_posterize_to_zero_bits`: timm's RandAugment at the paper's magnitude with Pillow >= 13,
  for the duration of a ``with`` block.
"""
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import partial
from typing import Any, BinaryIO, Callable, Dict, Union

import torch

from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

__all__ = ['atomic_write', 'atomic_torch_save', 'atomic_replace', 'AtomicCheckpointSaver',
           'allow_posterize_to_zero_bits']


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` durably: ``dst`` is never removed first, and the rename is on disk when
    this returns (POSIX and Windows rename atomically)."""
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> None:
    """Write a file with ``write(f)`` so that ``path`` is never partial: temporary file in the same
    folder, fsync, rename over ``path``. On any error (or interrupt) ``path`` keeps its old contents."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        atomic_replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


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

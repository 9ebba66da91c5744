"""Files written whole: a file appears with all its contents or not at all, and a crash keeps the old one.

Each write goes to a temporary file in the same folder, is flushed to disk (fsync), then renamed over
the target (POSIX and Windows rename atomically), and the folder is synced so that the rename itself
survives a power loss. Used for checkpoints, converted weights and label files.
"""
import os
import tempfile
from typing import Any, BinaryIO, Callable, Union

import torch

__all__ = ['atomic_write', 'atomic_torch_save', 'atomic_replace']


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
    this returns."""
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

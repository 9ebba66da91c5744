"""Datasets for the scripts: opening them from ``--dataset`` / ``--data-dir`` with clear errors, and the
evaluation loader.

Errors are ordinary exceptions (``FileNotFoundError``, ``ValueError``) with a message that names the
flag and the folder; the scripts turn them into their one-line errors (:func:`rmt.tools.cli.open_split`).
"""
import os

from timm.data import ImageDataset as TimmImageDataset, create_dataset, create_loader

from ..data import ImageDataset

__all__ = ['open_dataset', 'create_eval_loader']

_SPLIT_SYNONYMS = (('train', 'training'), ('validation', 'val', 'valid', 'eval', 'evaluation'))


def open_dataset(args, split: str, is_training: bool, class_map: str = '', require_split: bool = True):
    """``timm.data.create_dataset`` for ``args.dataset`` at ``args.data_dir``, with a clear message for a
    missing or empty data folder; an image folder comes as :class:`rmt.data.ImageDataset` (a skipped
    image's warning names the file).

    For an image folder, ``require_split`` insists on a ``DIR/<split>`` folder (or a synonym such as
    ``val``) rather than silently reading all of ``DIR``, which would mix the splits. Raises
    ``FileNotFoundError`` for a missing folder and ``ValueError`` for one that cannot be read as the split.
    """
    folder_dataset = not args.dataset or args.dataset.lower() in ('folder', 'imagefolder', 'image_folder')
    if not args.data_dir:
        if folder_dataset:
            raise ValueError('--data-dir is required: a folder with train/ and validation/ (or val/) '
                             'sub-folders of class folders of images')
    elif folder_dataset and not os.path.exists(args.data_dir):
        raise FileNotFoundError(f'--data-dir {args.data_dir} does not exist')
    elif folder_dataset and not os.path.isdir(args.data_dir):
        raise NotADirectoryError(f'--data-dir {args.data_dir} is a file: expected a folder of class folders of '
                                 f'images')
    elif folder_dataset and require_split:
        names = next((s for s in _SPLIT_SYNONYMS if split in s), (split,))
        if not any(os.path.isdir(os.path.join(args.data_dir, n)) for n in names):
            raise ValueError(f'--data-dir {args.data_dir} has no "{split}" split: expected a sub-folder named '
                             f'{" or ".join(names)}')
    try:
        dataset = create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=class_map,
            download=getattr(args, 'dataset_download', False), batch_size=args.batch_size,
            seed=getattr(args, 'seed', 42))
    except Exception as e:  # timm raises a mix of types; all mean "cannot read this data"
        raise ValueError(f'cannot open the "{split}" split of {args.dataset or "the image folder"} at '
                         f'{args.data_dir}: {type(e).__name__}: {e}') from e
    return ImageDataset.of(dataset) if type(dataset) is TimmImageDataset else dataset


def create_eval_loader(dataset, data_config, batch_size, workers, device, distributed=False, prefetcher=False):
    """timm's evaluation loader (no augmentation, centre crop) for ``data_config`` (``resolve_data_config``)."""
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        use_prefetcher=prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=workers, distributed=distributed, crop_pct=data_config['crop_pct'],
        device=device, persistent_workers=False)

"""Datasets for the scripts: opening them with clear errors, the evaluation loader, and a small real image set.

``write_digits_folder`` writes scikit-learn's handwritten digits (shipped inside its wheel, so
nothing is downloaded) as an image folder: the data of the README's test run and of the tests.
"""
import os
from typing import Optional

from timm.data import create_dataset, create_loader

from .cli import ScriptError

__all__ = ['allow_posterize_to_zero_bits', 'open_dataset', 'dataset_classes', 'check_num_classes',
           'create_eval_loader', 'write_digits_folder']


def allow_posterize_to_zero_bits() -> None:
    """Keep timm's RandAugment working with Pillow >= 13 (call it before training with RandAugment).

    ``rand-m9-mstd0.5-inc1`` (the paper's policy) asks for 0 bits when the noisy magnitude reaches
    its maximum, which older Pillow turned into a black image and Pillow 13 rejects with a
    ``ValueError`` that stops training at random. Restore the old result for ``bits == 0``.
    """
    from PIL import Image, ImageOps
    if getattr(ImageOps.posterize, '_zero_bits_ok', False):
        return
    posterize = ImageOps.posterize

    def posterize_any_bits(image, bits):
        if bits == 0:
            return Image.new(image.mode, image.size)  # every bit cleared
        return posterize(image, bits)
    posterize_any_bits._zero_bits_ok = True
    ImageOps.posterize = posterize_any_bits


_SPLIT_SYNONYMS = (('train', 'training'), ('validation', 'val', 'valid', 'eval', 'evaluation'))


def open_dataset(args, split: str, is_training: bool, class_map: str = '', require_split: bool = True):
    """``timm.data.create_dataset`` with a clear message for a missing or empty data folder.

    For an image folder, ``require_split`` insists on a ``DIR/<split>`` folder (or a synonym such as
    ``val``) rather than silently reading all of ``DIR``, which would mix the splits.
    """
    folder_dataset = not args.dataset or args.dataset.lower() in ('folder', 'imagefolder', 'image_folder')
    if not args.data_dir:
        if folder_dataset:
            raise ScriptError('--data-dir is required: a folder with train/ and validation/ (or val/) '
                              'sub-folders of class folders of images')
    elif folder_dataset and not os.path.exists(args.data_dir):
        raise ScriptError(f'--data-dir {args.data_dir} does not exist')
    elif folder_dataset and require_split and os.path.isdir(args.data_dir):
        names = next((s for s in _SPLIT_SYNONYMS if split in s), (split,))
        if not any(os.path.isdir(os.path.join(args.data_dir, n)) for n in names):
            raise ScriptError(f'--data-dir {args.data_dir} has no "{split}" split: expected a sub-folder named '
                              f'{" or ".join(names)}')
    try:
        return create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=class_map,
            download=getattr(args, 'dataset_download', False), batch_size=args.batch_size,
            seed=getattr(args, 'seed', 42))
    except Exception as e:  # timm raises a mix of types; all mean "cannot read this data"
        raise ScriptError(f'cannot open the "{split}" split of {args.dataset or "the image folder"} at '
                          f'{args.data_dir}: {type(e).__name__}: {e}') from None


def dataset_classes(dataset) -> Optional[list]:
    """Class names of a dataset, in label order, when the dataset tells them (image folders, torchvision)."""
    for obj in (getattr(dataset, 'reader', None), dataset):
        class_to_idx = getattr(obj, 'class_to_idx', None)
        if class_to_idx:
            return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        classes = getattr(obj, 'classes', None)
        if classes:
            return list(classes)
    return None


def check_num_classes(classes: Optional[list], num_classes: int, where: str, fix: str) -> None:
    if classes is not None and len(classes) != num_classes:
        shown = ', '.join(map(str, classes[:5])) + (', ...' if len(classes) > 5 else '')
        raise ScriptError(f'class-count mismatch: {where} has {len(classes)} classes ({shown}) but the model has '
                          f'{num_classes} outputs; {fix}')


def create_eval_loader(dataset, data_config, batch_size, workers, device, distributed=False, prefetcher=False):
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        use_prefetcher=prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=workers, distributed=distributed, crop_pct=data_config['crop_pct'],
        device=device, persistent_workers=False)


def write_digits_folder(root: str, classes=range(10), size: int = 32, limit: int = 0, num_val: int = 360) -> str:
    """Write scikit-learn's 1,797 digits as ``root/{train,validation}/digit{k}/NNNN.png`` (RGB, ``size`` px).

    The split is the same every time: 360 validation images of all 1,797 (fewer with ``classes`` or
    ``limit``, in proportion). Needs scikit-learn (a dev extra); nothing is downloaded.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    kept = [i for i in order if digits.target[i] in set(classes)]
    if limit:
        kept = kept[:limit]
    val_count = len(kept) * num_val // len(order)
    for n, i in enumerate(kept):
        folder = os.path.join(root, 'validation' if n < val_count else 'train', f'digit{digits.target[i]}')
        os.makedirs(folder, exist_ok=True)
        pixels = (digits.images[i] * (255. / 16.)).round().astype(np.uint8)
        Image.fromarray(pixels).convert('RGB').resize((size, size), Image.BILINEAR).save(
            os.path.join(folder, f'{i:04d}.png'))
    return root

"""Datasets: the class list of a dataset, and timm's image dataset with its skipped files named.

The command-line layer opens datasets from the scripts' flags (:mod:`rmt.tools.data`).
"""
import logging
from typing import Optional

import timm.data
from PIL import Image

__all__ = ['dataset_classes', 'ImageDataset']

_logger = logging.getLogger(__name__)


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


class ImageDataset(timm.data.ImageDataset):
    """timm's ``ImageDataset`` (an image folder or tar file) whose warning for a skipped image names its file.

    As in timm, an image that cannot be opened or decoded (a truncated JPEG, a corrupt or unreadable
    file) is skipped with a warning and the next one is read in its place, at most
    ``TIMM_DATASET_MAX_RETRIES`` (10) in a row, then ``RuntimeError``. timm's warning names only the
    sample's index ("Skipped sample (index 1234)"); this one names the file, so it can be found and
    replaced.
    """

    @classmethod
    def of(cls, dataset: timm.data.ImageDataset) -> 'ImageDataset':
        """``dataset`` (from ``timm.data.create_dataset``) as this class: the same reader, transforms and settings."""
        named = cls.__new__(cls)
        named.__dict__.update(vars(dataset))
        return named

    def __getitem__(self, index: int):
        for _ in range(self._max_retries):
            try:
                source, target, *features = self.reader[index]
                if self.load_bytes:
                    image = source.read()
                else:
                    image = Image.open(source)
                    if self.input_img_mode:
                        image = image.convert(self.input_img_mode)  # decodes the pixels: a truncated file fails here
                break
            except OSError as e:
                failed = self.filename(index, absolute=True)
                _logger.warning(f'Skipped image {failed} (sample {index}): {e}')
                index = (index + 1) % len(self.reader)
        else:
            raise RuntimeError(f'{self._max_retries} images in a row could not be read, the last {failed}')
        if self.transform is not None:
            image = self.transform(image)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return (image, target) if self.additional_features is None else (image, target, *features)

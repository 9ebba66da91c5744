"""Datasets: the class list of a dataset.

The command-line layer opens datasets from the scripts' flags (:mod:`rmt.tools.data`).
"""
from typing import Optional

__all__ = ['dataset_classes']


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

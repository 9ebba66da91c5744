"""Token labeling (Jiang et al., NeurIPS 2021) as the RMT release trains its ``*_tl`` models.

A teacher's per-location top-k logits are stored per image (the *label map*). In training, the image
and its map go through the same flip and RandAugment geometry, the image is cropped, and the crop box
cuts the map into one soft target for the whole crop and one per output token (``roi_align``).
MixToken swaps a box of stem tokens with the batch's mirror sample; the aux logits of that box are
swapped back, so the token targets stay unmixed while the class target is mixed by area. The loss is
``cls_weight * SoftCE(logits, crop target) + dense_weight * SoftCE(aux_logits, token targets)``.

Pieces, in the order a training step uses them:

- label files: ``<label_root>/<image path relative to the image folder, suffix .pt>`` holding a
  ``[2, k, h, w]`` tensor, top-k logits and their class ids (:func:`read_label_file`);
- :class:`TokenLabelTransform`: flip, RandAugment (timm's) and RandomResizedCrop of the image, the
  same flip and RandAugment geometry on the map, and the crop box;
- :class:`TokenLabelDataset`: a timm image dataset paired with its label files; a sample is
  ``(image, target)`` with the class, crop box and map packed in one tensor (:func:`pack_target`),
  so timm's collate and prefetching loader carry it unchanged;
- :func:`dense_targets`: the crop target and the token targets, at the model's output grid;
- MixToken, which the model applies (:mod:`rmt.mixtoken`);
- :class:`TokenLabelLoss`: the loss on the model's :class:`TokenLabelOutput` and the packed targets;
- :class:`DenseTeacher`: a classifier applied at every feature location, to write label files.

Where the release has a quirk that shapes its published numbers, the default follows it (see
:func:`dense_targets`, ``release_boxes``).
"""
import json
import math
import os
import random
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms import ColorJitter
from torchvision.transforms import functional as TF

from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from timm.loss import SoftTargetCrossEntropy

from .data import dataset_classes
from .mixtoken import MixTokenBox, TokenLabelOutput, mixtoken_lam

__all__ = [
    'LABEL_SUFFIX', 'META_FILE', 'PAPER_AUTO_AUGMENT', 'label_file_path', 'check_label_map', 'read_label_file',
    'topk_label_map', 'label_map_for_file', 'read_meta', 'read_image', 'pack_target', 'TokenLabelTargets',
    'unpack_targets', 'op_affine', 'warp_label_map', 'TokenLabelTransform', 'TokenLabelDataset', 'dense_targets',
    'TokenLabelLoss', 'DenseTeacher',
]

LABEL_SUFFIX = '.pt'
META_FILE = 'token_labels.json'  # written beside the label files by scripts/make_token_labels.py
PAPER_AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
FP16_MAX_CLASSES = 2048  # float16 holds every integer up to 2048 exactly; the released files store ids in it


# --- label files -------------------------------------------------------------------------------------

def label_file_path(label_root: str, image_relpath: str) -> str:
    """The label file of an image: its path relative to the image folder, under ``label_root``, suffix ``.pt``.

    ``train/n01440764/n01440764_10026.JPEG`` read from ``train/`` has ``<label_root>/n01440764/n01440764_10026.pt``,
    the released layout.
    """
    return os.path.join(label_root, os.path.splitext(image_relpath)[0] + LABEL_SUFFIX)


def check_label_map(label_map: Any, source: str, num_classes: Optional[int] = None) -> torch.Tensor:
    """Return ``label_map`` as float32 ``[2, k, h, w]`` (scores, class ids), or raise ``ValueError`` naming ``source``.

    Checks the shape, finite scores, and ids that are whole numbers, below ``num_classes`` and distinct at
    every location (the target scatters them).
    """
    if not isinstance(label_map, torch.Tensor):
        raise ValueError(f'label file {source} holds a {type(label_map).__name__}, expected a [2, k, h, w] tensor')
    if label_map.dim() != 4 or label_map.shape[0] != 2 or min(label_map.shape[1:]) < 1:
        raise ValueError(f'label file {source} has shape {list(label_map.shape)}, expected [2, k, h, w] '
                         f'(top-k scores and class ids at h x w locations)')
    if label_map.is_complex() or label_map.dtype == torch.bool:
        raise ValueError(f'label file {source} has dtype {label_map.dtype}, expected a real number type')
    label_map = label_map.float()
    scores, ids = label_map[0], label_map[1]
    if not torch.isfinite(scores).all():
        raise ValueError(f'label file {source} has non-finite scores')
    if not (ids == ids.round()).all() or (ids < 0).any():
        raise ValueError(f'label file {source} has class ids that are not non-negative whole numbers')
    if num_classes is not None and (ids >= num_classes).any():
        raise ValueError(f'label file {source} has class id {int(ids.max())}, but there are {num_classes} classes')
    if ids.shape[0] > 1 and (ids.sort(dim=0).values.diff(dim=0) == 0).any():
        raise ValueError(f'label file {source} repeats a class id among the top-k of one location')
    return label_map


def read_label_file(path: str, num_classes: Optional[int] = None) -> torch.Tensor:
    """Read one label file, weights-only (it cannot run code), as float32 ``[2, k, h, w]``; clear errors otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'label file not found: {path}')
    try:
        label_map = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors alike mean the file is not a readable tensor
        raise ValueError(f'cannot read label file {path} ({type(e).__name__}: {e}): it is truncated, corrupted or '
                         f'holds objects other than tensors') from None
    return check_label_map(label_map, path, num_classes)


def topk_label_map(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per-location top-k of (B, num_classes, h, w) logits as (B, 2, k, h, w): scores (descending), class ids."""
    if k > logits.shape[1]:
        raise ValueError(f'top-{k} asked of {logits.shape[1]} classes')
    scores, ids = logits.float().topk(k, dim=1)
    return torch.stack([scores, ids.float()], dim=1)


def label_map_for_file(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One image's ``[2, k, h, w]`` map in the released file format: float16, ids included (exact up to 2048
    classes); float32 beyond, where float16 would round the ids. A fresh tensor, so saving it saves no more."""
    dtype = torch.float16 if num_classes <= FP16_MAX_CLASSES else torch.float32
    return label_map.to(dtype=dtype, copy=True).contiguous()


def read_meta(label_root: str) -> Dict[str, Any]:
    """The ``token_labels.json`` that make_token_labels writes (teacher, size, classes), or {} (released sets)."""
    path = os.path.join(label_root, META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# --- packed targets ----------------------------------------------------------------------------------

_HEADER = 8  # class, crop box (top, left, bottom, right as fractions of the image), k, h, w


def pack_target(class_index: int, box: Sequence[float], label_map: torch.Tensor) -> torch.Tensor:
    """One sample's target as a flat float32 tensor: class, crop box, map shape, then the ``[2, k, h, w]`` map.

    One tensor per sample, so timm's ``fast_collate`` and ``PrefetchLoader`` move it like any target.
    """
    header = torch.tensor([float(class_index), *map(float, box), *map(float, label_map.shape[1:])])
    return torch.cat([header, label_map.float().flatten()])


class TokenLabelTargets(NamedTuple):
    classes: torch.Tensor     # (B,) int64 ground-truth class (the release's loss does not use it)
    boxes: torch.Tensor       # (B, 4) crop (top, left, bottom, right), fractions of the augmented image
    label_maps: torch.Tensor  # (B, 2, k, h, w) scores and class ids after flip and RandAugment


def unpack_targets(packed: torch.Tensor) -> TokenLabelTargets:
    """Split a batch of :func:`pack_target` rows (B, L) back into classes, crop boxes and label maps."""
    if packed.dim() != 2 or packed.shape[1] <= _HEADER:
        raise ValueError(f'expected packed token-label targets (B, L), got shape {list(packed.shape)}: is the '
                         f'loader reading a TokenLabelDataset?')
    k, h, w = (int(v) for v in packed[0, 5:_HEADER].tolist())
    if packed.shape[1] != _HEADER + 2 * k * h * w or not (packed[:, 5:_HEADER] == packed[:1, 5:_HEADER]).all():
        raise ValueError('packed token-label targets disagree on the label map shape')
    return TokenLabelTargets(
        packed[:, 0].long(), packed[:, 1:5], packed[:, _HEADER:].reshape(-1, 2, k, h, w))


# --- joint augmentation ------------------------------------------------------------------------------

Affine = Tuple[float, float, float, float, float, float]

# RandAugment ops that move pixels, and those that only change their values (timm's op names)
_GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')
_PHOTOMETRIC_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal', 'Solarize',
    'SolarizeIncreasing', 'SolarizeAdd', 'Color', 'ColorIncreasing', 'Contrast', 'ContrastIncreasing', 'Brightness',
    'BrightnessIncreasing', 'Sharpness', 'SharpnessIncreasing', 'Desaturate', 'GaussianBlur', 'GaussianBlurRand')


def op_affine(name: str, args: Sequence[float], image_size: Tuple[int, int]) -> Affine:
    """The affine map (PIL's output-to-input ``(a, b, c, d, e, f)``) that timm's op ``name`` applied with ``args``
    to an image of ``image_size`` (W, H), as PIL's ``Image.transform`` and ``Image.rotate`` build it."""
    w, h = image_size
    if name == 'ShearX':
        return 1., args[0], 0., 0., 1., 0.
    if name == 'ShearY':
        return 1., 0., 0., args[0], 1., 0.
    if name == 'TranslateX':
        return 1., 0., args[0], 0., 1., 0.
    if name == 'TranslateY':
        return 1., 0., 0., 0., 1., args[0]
    if name == 'TranslateXRel':
        return 1., 0., args[0] * w, 0., 1., 0.
    if name == 'TranslateYRel':
        return 1., 0., 0., 0., 1., args[0] * h
    if name == 'Rotate':  # counter-clockwise by args[0] degrees about the image centre
        angle = -math.radians(args[0] % 360.)
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = w / 2., h / 2.
        return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy
    raise ValueError(f'no affine map for RandAugment op {name!r}')


def warp_label_map(label_map: torch.Tensor, affines: Sequence[Affine], image_size: Tuple[int, int]) -> torch.Tensor:
    """Move a ``[2, k, h, w]`` map covering an image of ``image_size`` (W, H) as ``affines``, applied to the image
    in turn, moved the image.

    Nearest neighbour, once through the composed maps: each cell takes the cell under the source of its
    centre. Cells whose source left the image at any step get score 0 and the nearest cell's ids, as in the
    release (T ``random_augment_label.py``), which resamples the map after every op instead (drifting by up
    to a cell per op). Cells are mapped through the image's own coordinates, so maps coarser than the image
    and images that are not square move exactly as the image does.
    """
    _, _, h, w = label_map.shape
    img_w, img_h = image_size
    y, x = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) * (img_h / h),
                          (torch.arange(w, dtype=torch.float64) + 0.5) * (img_w / w), indexing='ij')
    inside = torch.ones(h, w, dtype=torch.bool)
    for a, b, c, d, e, f in reversed(affines):  # output to input: the last op first
        x, y = a * x + b * y + c, d * x + e * y + f
        inside &= (x >= 0) & (x < img_w) & (y >= 0) & (y < img_h)
    col = torch.floor(x * (w / img_w)).long().clamp(0, w - 1)
    row = torch.floor(y * (h / img_h)).long().clamp(0, h - 1)
    out = label_map[:, :, row, col]
    out[0].masked_fill_(~inside, 0.)
    return out


class _AffineRecorder:
    """Stands in for a geometric op's function: notes the affine map it applies, then applies it."""

    def __init__(self, name: str, fn, applied: List[Affine]):
        self.name, self.fn, self.applied = name, fn, applied

    def __call__(self, img: Image.Image, *args, **kwargs) -> Image.Image:
        self.applied.append(op_affine(self.name, args, img.size))
        return self.fn(img, *args, **kwargs)


class TokenLabelTransform:
    """Flip, RandAugment, RandomResizedCrop on an image; the same flip and RandAugment geometry on its label map.

    The release's order (T ``label_transforms_factory.py``). The map is not cropped: the crop box, as
    fractions (top, left, bottom, right) of the augmented image, is returned and :func:`dense_targets`
    cuts the map with it. RandAugment is timm's (``auto_augment``, a ``rand-...`` policy; the recipe's is
    ``rand-m9-mstd0.5-inc1``), run as it is; its Rotate, Shear and Translate ops also move the map. Colour
    jitter applies only without RandAugment, as in timm and the release. With Pillow >= 13 the recipe's
    policy needs :func:`rmt.tools.train_utils.allow_posterize_to_zero_bits` (``scripts/train.py`` trains in it).

    Returns ``(image, label_map, box)``: a PIL image of ``img_size``, the ``[2, k, h, w]`` map, a 4-tuple.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]],
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3. / 4., 4. / 3.),
            hflip: float = 0.5,
            vflip: float = 0.,
            auto_augment: Optional[str] = PAPER_AUTO_AUGMENT,
            color_jitter: Optional[float] = 0.4,
            interpolation: str = 'random',
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    ):
        self.crop = RandomResizedCropAndInterpolation(img_size, tuple(scale), tuple(ratio), interpolation)
        self.hflip, self.vflip = hflip, vflip
        self.rand_augment = None
        self.color_jitter = None
        self._applied: List[Affine] = []
        if auto_augment:
            if not auto_augment.startswith('rand'):
                raise ValueError(f'token labeling supports RandAugment policies ("rand-..."), got {auto_augment!r}')
            hparams = dict(translate_const=int(min(self.crop.size) * 0.45),
                           img_mean=tuple(min(255, round(255 * x)) for x in mean))
            if interpolation and interpolation != 'random':
                hparams['interpolation'] = str_to_pil_interp(interpolation)
            self.rand_augment = rand_augment_transform(auto_augment, hparams)
            for op in self.rand_augment.ops:
                if op.name in _GEOMETRIC_OPS:
                    op.aug_fn = _AffineRecorder(op.name, op.aug_fn, self._applied)
                elif op.name not in _PHOTOMETRIC_OPS:
                    raise ValueError(f'RandAugment op {op.name!r}: not known to keep pixels in place, so the label '
                                     f'map cannot follow it')
        elif color_jitter:
            self.color_jitter = ColorJitter(*(float(color_jitter),) * 3)

    def __call__(self, img: Image.Image, label_map: torch.Tensor
                 ) -> Tuple[Image.Image, torch.Tensor, Tuple[float, float, float, float]]:
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            img, label_map = TF.hflip(img), label_map.flip(-1)
        if self.vflip > 0 and torch.rand(1).item() < self.vflip:
            img, label_map = TF.vflip(img), label_map.flip(-2)
        if self.rand_augment is not None:
            self._applied.clear()
            size = img.size  # RandAugment keeps it
            img = self.rand_augment(img)
            if self._applied:
                label_map = warp_label_map(label_map, self._applied, size)
            self._applied.clear()
        elif self.color_jitter is not None:
            img = self.color_jitter(img)
        img_w, img_h = img.size
        top, left, height, width = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (list, tuple)):
            interpolation = random.choice(interpolation)
        img = TF.resized_crop(img, top, left, height, width, list(self.crop.size), interpolation)
        return img, label_map, (top / img_h, left / img_w, (top + height) / img_h, (left + width) / img_w)


# --- dataset -----------------------------------------------------------------------------------------

def read_image(dataset, index: int) -> Tuple[Image.Image, int]:
    """Image ``index`` of a timm dataset and its class (-1 without one), read from its reader.

    An unreadable image is an error naming it: timm's dataset would hand over the next image instead,
    which would then be paired with this one's labels.
    """
    source, target, *_ = dataset.reader[index]
    try:
        img = Image.open(source).convert(getattr(dataset, 'input_img_mode', None) or 'RGB')
    except OSError as e:
        raise RuntimeError(f'cannot read image {dataset.filename(index, absolute=True)}: {e}') from None
    return img, -1 if target is None else int(target)


class TokenLabelDataset(torch.utils.data.Dataset):
    """A timm image dataset (e.g. ``timm.data.create_dataset('', root=...)``) with the label file of every image.

    A sample is ``(image, target)``: the image after ``joint_transform`` (a :class:`TokenLabelTransform`;
    without one, the whole image and box (0, 0, 1, 1)) and then ``transform`` (image only, e.g. to a
    normalised tensor; timm's ``create_loader`` sets it), and ``target`` = :func:`pack_target` of the class,
    crop box and map. Every image must have a label file, all of one shape (they are batched): missing
    files and classes that differ from the label folder's ``token_labels.json`` are errors at construction,
    a malformed file or another shape when it is read.

    Images are read with :func:`read_image`, so an unreadable image is an error, never a mispairing.
    """

    def __init__(
            self,
            dataset,
            label_root: str,
            num_classes: Optional[int] = None,
            joint_transform: Optional[TokenLabelTransform] = None,
            transform=None,
            check_files: bool = True,
    ):
        if not os.path.isdir(label_root):
            raise FileNotFoundError(f'token-label folder not found: {label_root}')
        if not (hasattr(dataset, 'reader') and hasattr(dataset, 'filename')):
            raise TypeError(f'expected a timm image dataset (a reader and file names), got {type(dataset).__name__}')
        if getattr(dataset, 'transform', None) is not None:
            raise ValueError('pass the image dataset without a transform: TokenLabelDataset applies its own')
        if len(dataset) == 0:
            raise ValueError('the image dataset is empty')
        self.dataset = dataset
        self.label_root = label_root
        self.num_classes = num_classes
        self.joint_transform = joint_transform
        self.transform = transform
        meta = read_meta(label_root)
        classes = self.classes
        if meta.get('classes') and classes is not None and list(meta['classes']) != classes:
            raise ValueError(f'{os.path.join(label_root, META_FILE)} was written for classes {meta["classes"][:5]}..., '
                             f'but the images have classes {classes[:5]}...: the label ids would name other classes')
        if check_files:  # one listing of the label folder, rather than a stat per image
            present = {os.path.normpath(os.path.join(folder, name))
                       for folder, _, names in os.walk(label_root) for name in names}
            missing = [p for p in map(self.label_path, range(len(dataset))) if os.path.normpath(p) not in present]
            if missing:
                raise FileNotFoundError(f'{len(missing)} of {len(dataset)} images have no label file in {label_root}, '
                                        f'e.g. {", ".join(missing[:3])}')
        self.label_shape: Optional[Tuple[int, ...]] = None
        self.label_shape = tuple(self.read_label(0).shape)

    @property
    def reader(self):
        return getattr(self.dataset, 'reader', None)

    @property
    def classes(self) -> Optional[List[str]]:
        return dataset_classes(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return self.dataset.filename(index, basename, absolute)

    def label_path(self, index: int) -> str:
        return label_file_path(self.label_root, self.dataset.filename(index))

    def read_label(self, index: int) -> torch.Tensor:
        label_map = read_label_file(self.label_path(index), self.num_classes)
        if self.label_shape is not None and tuple(label_map.shape) != self.label_shape:
            raise ValueError(f'label file {self.label_path(index)} has shape {list(label_map.shape)}, the first '
                             f'image\'s {list(self.label_shape)}: maps are batched, so they must share a shape')
        return label_map

    def __getitem__(self, index: int) -> Tuple[Any, torch.Tensor]:
        img, target = read_image(self.dataset, index)
        label_map = self.read_label(index)
        box: Tuple[float, ...] = (0., 0., 1., 1.)
        if self.joint_transform is not None:
            img, label_map, box = self.joint_transform(img, label_map)
        if self.transform is not None:
            img = self.transform(img)
        return img, pack_target(target, box, label_map)


# --- dense targets -----------------------------------------------------------------------------------

@torch.no_grad()
def dense_targets(
        label_maps: torch.Tensor,
        boxes: torch.Tensor,
        num_classes: int,
        grid: Tuple[int, int],
        smoothing: float = 0.1,
        release_boxes: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The crop target (B, C) and the token targets (B, gh, gw, C) of a batch, as the release makes them.

    The top-k scores are scattered into a zero (B, C, h, w) map; ``roi_align`` (``aligned=False``, boxes
    shifted by -0.5 map cells) averages it over the crop box at 1 x 1 and at the model's output ``grid``;
    a softmax over all C classes follows, then label smoothing ``t * (1 - s + s / C) + s / C`` (T ``mixup.py``).

    ``release_boxes=True`` reproduces the release: the box (top, left, bottom, right) is handed to
    ``roi_align``, which reads (x1, y1, x2, y2), so the crop's rows select map columns and its columns map
    rows, and all four are scaled by the map width. ``False`` gives boxes in the crop's own axes.
    """
    batch, _, _, h, w = label_maps.shape
    with torch.autocast(label_maps.device.type, enabled=False):  # float32 targets, also inside an AMP step
        scores, ids = label_maps[:, 0].float(), label_maps[:, 1].long()
        dense = scores.new_zeros(batch, num_classes, h, w).scatter_(1, ids, scores)
        top, left, bottom, right = boxes.float().to(dense.device).unbind(1)
        if release_boxes:
            rois = torch.stack([top, left, bottom, right], 1) * w
        else:
            rois = torch.stack([left * w, top * h, right * w, bottom * h], 1)
        rois = torch.cat([torch.arange(batch, device=dense.device, dtype=dense.dtype)[:, None], rois - 0.5], 1)
        off = smoothing / num_classes
        on = 1. - smoothing + off
        crop = roi_align(dense, rois, output_size=(1, 1), aligned=False).flatten(1)
        tokens = roi_align(dense, rois, output_size=tuple(grid), aligned=False)
        return crop.softmax(1) * on + off, tokens.softmax(1).permute(0, 2, 3, 1) * on + off


# --- loss --------------------------------------------------------------------------------------------

class TokenLabelLoss(nn.Module):
    """``cls_weight * SoftCE(logits, crop target mixed by area) + dense_weight * SoftCE(aux_logits, token targets)``.

    The release's ``TokenLabelCrossEntropy`` (weights 1.0 and 0.5, ``--cls-weight``/``--dense-weight``):
    the class term is averaged over the batch, the dense term over batch x tokens; with a MixToken box the
    crop target becomes ``lam * t + (1 - lam) * t.flip(0)``, lam = 1 - box area / tokens. The ground-truth
    class is not used. Targets are made from the packed batch (:func:`unpack_targets`) at the aux grid.
    """

    def __init__(self, num_classes: int, cls_weight: float = 1.0, dense_weight: float = 0.5,
                 smoothing: float = 0.1, release_boxes: bool = True):
        super().__init__()
        if cls_weight < 0 or dense_weight < 0 or cls_weight + dense_weight <= 0:
            raise ValueError(f'cls_weight ({cls_weight}) and dense_weight ({dense_weight}) must be >= 0, '
                             f'and not both 0')
        self.num_classes = num_classes
        self.cls_weight = cls_weight
        self.dense_weight = dense_weight
        self.smoothing = smoothing
        self.release_boxes = release_boxes
        self.soft_ce = SoftTargetCrossEntropy()

    def forward(self, output: TokenLabelOutput, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, tuple) or len(output) != 3:
            raise TypeError(f'TokenLabelLoss needs the model\'s token-labeling training output (logits, aux_logits, '
                            f'box), got {type(output).__name__}')
        logits, aux_logits, box = output
        if aux_logits.dim() != 4 or aux_logits.shape[-1] != self.num_classes:
            raise ValueError(f'aux logits must be (B, h, w, {self.num_classes}), got {list(aux_logits.shape)}')
        grid = tuple(aux_logits.shape[1:3])
        targets = unpack_targets(target)
        crop_target, token_target = dense_targets(targets.label_maps, targets.boxes, self.num_classes, grid,
                                                  self.smoothing, self.release_boxes)
        lam = mixtoken_lam(MixTokenBox(*box), grid)
        if lam < 1.:
            crop_target = lam * crop_target + (1. - lam) * crop_target.flip(0)
        return self.cls_weight * self.soft_ce(logits.float(), crop_target) + \
            self.dense_weight * self.soft_ce(aux_logits.float(), token_target)


# --- teachers ----------------------------------------------------------------------------------------

class DenseTeacher(nn.Module):
    """A timm classifier applied at every feature location: images (B, 3, H, W) to logits (B, C, h, w).

    ``head='classifier'``: the model's own head with pooling removed (``reset_classifier(0, '')``), then its
    classifier (a Linear or 1x1 conv) on every location of the pre-logits map. For RMT that is the head's
    per-token path (projection, norm, Swish, classifier), whose average over locations is the model's
    logits; the same holds for any head that pools right before its classifier (ResNet, EfficientNet,
    NFNet, RegNet). Heads that do more after pooling run it per location instead (ConvNeXt's norm,
    MobileNetV3's conv head): reasonable maps, but their average is not the pooled logits. ViT-like token
    outputs drop their prefix tokens; a class-token ViT's classifier was not trained on patch tokens, so
    its maps are poor. Models with two classifiers (distilled ViTs) are refused. ``head='aux'``: the
    token-labeling aux head of a ``*_tl`` RMT on its last-stage tokens (what the release's label
    script prefers when a model has one). Takes over ``model`` (its classifier is reset).
    """

    def __init__(self, model: nn.Module, head: str = 'classifier'):
        super().__init__()
        if head not in ('classifier', 'aux'):
            raise ValueError(f"head must be 'classifier' or 'aux', got {head!r}")
        self.use_aux = head == 'aux'
        if self.use_aux:
            classifier = getattr(model, 'aux_head', None)
            if not isinstance(classifier, nn.Linear):
                raise ValueError(f'{type(model).__name__} has no token-labeling aux head (a *_tl RMT has one)')
        else:
            classifier = model.get_classifier()
            if not isinstance(classifier, (nn.Linear, nn.Conv2d)) or (
                    isinstance(classifier, nn.Conv2d) and tuple(classifier.kernel_size) != (1, 1)):
                raise ValueError(f'{type(model).__name__}: the classifier is a {type(classifier).__name__}, not one '
                                 f'Linear or 1x1 conv, so it cannot be applied per location')
            model.reset_classifier(0, '')
        self.model = model
        self.classifier = classifier
        self.num_classes = classifier.out_features if isinstance(classifier, nn.Linear) else classifier.out_channels
        self.in_features = classifier.in_features if isinstance(classifier, nn.Linear) else classifier.in_channels

    def _to_nhwc(self, feats: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        if feats.dim() == 3:  # (B, N, C) tokens, prefix tokens first
            feats = feats[:, getattr(self.model, 'num_prefix_tokens', 0):]
            patch_embed = getattr(self.model, 'patch_embed', None)
            if hasattr(patch_embed, 'dynamic_feat_size'):
                gh, gw = patch_embed.dynamic_feat_size(image_hw)
            else:
                gh = gw = math.isqrt(feats.shape[1])
            if gh * gw != feats.shape[1]:
                raise ValueError(f'cannot arrange {feats.shape[1]} tokens on a grid for a {image_hw} input')
            return feats.reshape(feats.shape[0], gh, gw, feats.shape[-1])
        if feats.dim() != 4:
            raise ValueError(f'{type(self.model).__name__} still pools before its classifier (features of shape '
                             f'{list(feats.shape)}), so it has no per-location features')
        if getattr(self.model, 'output_fmt', 'NCHW') != 'NHWC':
            feats = feats.permute(0, 2, 3, 1)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if not self.use_aux:
            feats = self.model.forward_head(feats, pre_logits=True)
        feats = self._to_nhwc(feats, tuple(x.shape[-2:]))
        if feats.shape[-1] != self.in_features:
            raise ValueError(f'per-location features have {feats.shape[-1]} channels, the classifier takes '
                             f'{self.in_features}')
        weight = self.classifier.weight.flatten(1)  # a 1x1 conv's weight as a Linear's
        return F.linear(feats, weight, self.classifier.bias).permute(0, 3, 1, 2)

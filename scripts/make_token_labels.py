#!/usr/bin/env python3
"""Write token-labeling label files for an image folder with any teacher, or check an existing label set.

    python scripts/make_token_labels.py /data/imagenet/train labels --model dm_nfnet_f6 --pretrained --img-size 576
    python scripts/make_token_labels.py pets/train pets_labels --checkpoint output/train/pets/model_best.pth.tar
    python scripts/make_token_labels.py /data/imagenet/train label_top5_train_nfnet --verify --num-classes 1000

For every image ``DATA/<class>/<name>.<ext>`` it writes ``LABELS/<class>/<name>.pt``: a ``[2, k, h, w]``
tensor of the teacher's top-k logits at each of its h x w output locations and their class ids, float16
(float32 above 2048 classes), the format of the released ImageNet set (``label_top5_train_nfnet``). The
teacher sees the whole image resized to its input size (``--crop-mode squash``), so the map covers the
image as training assumes; ``--crop-mode center`` takes the centre square, as the released set's script
did. A checkpoint of ``scripts/train.py`` supplies its model, kwargs, classes and image settings (size,
interpolation, mean, std), so its teacher sees images as it was trained to. The teacher's classifier
runs at every feature location (``rmt.token_labeling.DenseTeacher`` says which heads that suits).
``LABELS/token_labels.json`` records the teacher and the class order, and training checks it. Files
are written atomically; ``--skip-existing`` continues an interrupted run.

``--verify`` reads every label file of DATA's images instead: present, readable, one shape, ids below
``--num-classes``.
"""
import json
import logging
import os
import time

import torch

from timm import utils
from timm.data import create_transform, resolve_data_config

from rmt.atomic import atomic_torch_save
from rmt.data import dataset_classes
from rmt.token_labeling import (
    META_FILE, DenseTeacher, TokenLabelDataset, label_file_path, label_map_for_file, read_image, read_meta,
    topk_label_map)
from rmt.tools.cli import (
    ArgumentParser, ScriptError, add_amp_args, add_model_args, apply_saved_settings, autocast_for, available_device,
    build_model, data_workers, default_device, default_workers, finite_float, load_weights, model_name, open_split,
    positive_float, positive_int, run_main)

_logger = logging.getLogger('make_token_labels')


class TeacherInputs(torch.utils.data.Dataset):
    """The images to label, in ``indices`` order, transformed for the teacher, with their classes."""

    def __init__(self, dataset, indices, transform):
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, target = read_image(self.dataset, self.indices[i])
        return self.transform(img), target


class LabelFiles(torch.utils.data.Dataset):
    """Reads (and so checks) every label file of a :class:`TokenLabelDataset`, without its images."""

    def __init__(self, labels: TokenLabelDataset):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> int:
        self.labels.read_label(i)
        return i


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description='Write (or --verify) token-labeling label files for an image folder',
                                allow_abbrev=False)
    p.add_argument('data', metavar='DATA', help='image folder: DATA/<class>/<image>')
    p.add_argument('labels', metavar='LABELS', help='label folder to write (or check): LABELS/<class>/<image>.pt')
    p.add_argument('--verify', action='store_true', default=False, help='check the label files instead of writing')
    p.add_argument('--model', type=model_name, default=None, metavar='NAME',
                   help='teacher: any timm model name (or rmt_*)')
    p.add_argument('--pretrained', action='store_true', default=False, help="the timm model's pretrained weights")
    p.add_argument('--checkpoint', default='', metavar='FILE',
                   help='teacher weights: a checkpoint of scripts/train.py, a released RMT .pth, or .safetensors')
    p.add_argument('--use-ema', action='store_true', default=False, help='the EMA weights of the checkpoint')
    add_model_args(p)
    p.add_argument('--num-classes', type=positive_int, default=None, help="teacher classes (default: the checkpoint's)")
    p.add_argument('--in-chans', type=positive_int, default=None)
    p.add_argument('--dense-head', default='classifier', choices=('classifier', 'aux'),
                   help="per-location classifier: the model's head, or a *_tl RMT's aux head")
    p.add_argument('--img-size', type=positive_int, default=None, metavar='N',
                   help="teacher input size (default: the size a training checkpoint was trained at, else the model's)")
    p.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar=('C', 'H', 'W'))
    p.add_argument('--crop-mode', default='squash', choices=('squash', 'center'),
                   help='squash: the whole image (default); center: the centre square, as the released set')
    p.add_argument('--interpolation', default=None, type=str)
    p.add_argument('--mean', type=finite_float, nargs='+', default=None)
    p.add_argument('--std', type=positive_float, nargs='+', default=None)
    p.add_argument('--topk', type=positive_int, default=5, metavar='K', help='scores kept per location (default: 5)')
    p.add_argument('--skip-existing', action='store_true', default=False, help='keep label files already written')
    p.add_argument('--any-classes', action='store_true', default=False,
                   help="allow a teacher whose class count differs from the folder's (its ids are written as they are)")
    p.add_argument('-b', '--batch-size', type=positive_int, default=64)
    p.add_argument('-j', '--workers', type=data_workers, default=default_workers(),
                   help='data-loading processes, at most the number of cores (default: 4, or the cores if fewer)')
    p.add_argument('--log-interval', type=positive_int, default=50, metavar='N', help='log progress every N batches')
    p.add_argument('--device', type=available_device, default=default_device(),
                   help='default: cuda when available, else cpu')
    add_amp_args(p)
    return p


def build_teacher(args) -> torch.nn.Module:
    """The teacher, its weights loaded, with a check that its classifier came from the weights it was given."""
    state = apply_saved_settings(args)
    if not (args.pretrained or args.checkpoint):
        raise ScriptError('the teacher needs weights: --pretrained (timm\'s) or --checkpoint FILE')
    model = build_model(args, args.num_classes, weights_flag='--checkpoint')
    pretrained_classes = model.pretrained_cfg.get('num_classes')
    if args.pretrained and not args.checkpoint and args.num_classes not in (None, pretrained_classes):
        raise ScriptError(f'--num-classes {args.num_classes}: the pretrained {args.model} has {pretrained_classes} '
                          f'classes, and a new classifier would label at random')
    if args.dense_head == 'aux' and not isinstance(getattr(model, 'aux_head', None), torch.nn.Linear):
        raise ScriptError(f'--dense-head aux: {args.model} has no token-labeling aux head (a *_tl RMT has one)')
    if args.checkpoint:
        load_weights(model, args.checkpoint, use_ema=args.use_ema)
        classifier = model.aux_head if args.dense_head == 'aux' else model.get_classifier()
        weight = getattr(classifier, 'weight', None)
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)] + [
            v for d in state.values() if isinstance(d, dict) for v in d.values() if isinstance(v, torch.Tensor)]
        if weight is None or not any(t.shape == weight.shape and torch.equal(t.to(weight), weight) for t in tensors):
            raise ScriptError(f'{args.checkpoint}: its classifier was not loaded into {args.model} with '
                              f'{model.num_classes} classes (a new one would label at random); pass the '
                              f'checkpoint\'s --num-classes')
    return model.eval()


def verify(args) -> dict:
    dataset = open_split(args, 'train', False, require_split=False)
    try:
        labels = TokenLabelDataset(dataset, args.labels, args.num_classes)
    except (OSError, ValueError) as e:
        raise ScriptError(f'LABELS {args.labels}: {e}') from None
    loader = torch.utils.data.DataLoader(LabelFiles(labels), batch_size=256, num_workers=args.workers, collate_fn=len)
    try:
        count = sum(loader)
    except (OSError, ValueError) as e:
        raise ScriptError(f'LABELS {args.labels}: {e}') from None
    result = dict(images=len(labels), label_files=count, shape=list(labels.label_shape), labels=args.labels)
    _logger.info(f'{count} label files for the {len(labels)} images, all readable, shape {list(labels.label_shape)}'
                 + (f', ids below {args.num_classes}' if args.num_classes else ''))
    return result


def write_labels(args) -> dict:
    teacher = build_teacher(args)
    dataset = open_split(args, 'train', False, require_split=False)
    root = getattr(getattr(dataset, 'reader', None), 'root', args.data)
    classes = dataset_classes(dataset)
    try:
        dense = DenseTeacher(teacher, args.dense_head)
    except ValueError as e:
        raise ScriptError(f'{args.model} cannot label per location: {e}') from None
    if args.topk > dense.num_classes:
        raise ScriptError(f'--topk {args.topk} is more than the teacher\'s {dense.num_classes} classes')
    if classes is not None and len(classes) != dense.num_classes and not args.any_classes:
        raise ScriptError(f'{root} has {len(classes)} classes, the teacher {dense.num_classes}: training reads the '
                          f'label ids as the folder\'s class indices, so they must be the same classes in the same '
                          f'(sorted) order; pass --any-classes if the ids mean something else on purpose')
    data_config = resolve_data_config(vars(args), model=teacher)
    transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=1.0, crop_mode=args.crop_mode)
    meta = dict(teacher=args.model, checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
                dense_head=args.dense_head, input_size=list(data_config['input_size']), crop_mode=args.crop_mode,
                topk=args.topk, num_classes=dense.num_classes, classes=classes)
    todo = list(range(len(dataset)))
    if args.skip_existing:
        written = read_meta(args.labels)
        if written and written != meta:
            changed = sorted(k for k in meta if written.get(k) != meta[k])
            raise ScriptError(f'--skip-existing: {args.labels} was written with other settings ({", ".join(changed)}); '
                              f'a label set must come from one teacher')
        todo = [i for i in todo if not os.path.isfile(label_file_path(args.labels, dataset.filename(i)))]
    _logger.info(f'{root}: {len(dataset)} images in {len(classes or [])} classes; {len(todo)} to label with '
                 f'{args.model} at {tuple(data_config["input_size"][1:])} px ({args.crop_mode}), top-{args.topk}')

    device = torch.device(args.device)
    dense.to(device)
    amp_autocast, _ = autocast_for(args, device)
    loader = torch.utils.data.DataLoader(TeacherInputs(dataset, todo, transform), batch_size=args.batch_size,
                                         num_workers=args.workers, pin_memory=device.type == 'cuda')
    os.makedirs(args.labels, exist_ok=True)
    grid, hits, start, done, batch = None, 0, time.time(), 0, 0
    with torch.no_grad():
        for images, targets in loader:
            with amp_autocast():
                try:
                    logits = dense(images.to(device))
                except ValueError as e:
                    raise ScriptError(f'{args.model} cannot label per location: {e}') from None
            label_maps = topk_label_map(logits, args.topk).cpu()
            grid = tuple(label_maps.shape[-2:])
            hits += (logits.float().mean((2, 3)).argmax(1).cpu() == targets).sum().item()
            for label_map in label_maps:
                path = label_file_path(args.labels, dataset.filename(todo[done]))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_torch_save(label_map_for_file(label_map, dense.num_classes), path)
                done += 1
            batch += 1
            if batch % args.log_interval == 0 or done == len(todo):
                _logger.info(f'{done}/{len(todo)} images, {done / max(time.time() - start, 1e-9):.1f} img/s')
    with open(os.path.join(args.labels, META_FILE + '.tmp'), 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(args.labels, META_FILE + '.tmp'), os.path.join(args.labels, META_FILE))
    result = dict(images=len(dataset), written=done, grid=list(grid) if grid else None, labels=args.labels,
                  teacher_top1=100. * hits / done if done and classes and len(classes) == dense.num_classes else None)
    _logger.info(f'Wrote {done} label files ({args.topk} x {grid} each) to {args.labels}'
                 + (f'; the teacher\'s pooled top-1 on these images: {result["teacher_top1"]:.2f}%'
                    if result['teacher_top1'] is not None else ''))
    return result


def main(argv=None) -> dict:
    utils.setup_default_logging()
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.data):
        found = 'a file, expected' if os.path.exists(args.data) else 'no such'
        raise ScriptError(f'DATA {args.data}: {found} image folder (DATA/<class>/<image>)')
    if os.path.exists(args.labels) and not os.path.isdir(args.labels):
        raise ScriptError(f'LABELS {args.labels}: a file, expected a folder of label files')
    # open_dataset's names: the folder is read as it is (no split sub-folder is required)
    args.data_dir, args.dataset, args.seed = args.data, '', 0
    result = verify(args) if args.verify else write_labels(args)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    run_main(main)

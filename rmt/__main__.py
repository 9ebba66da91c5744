"""Classify an image with an RMT model: ``python -m rmt --model rmt_s --checkpoint RMT-S.pth --image cat.jpg``.

Without ``--checkpoint`` the weights are random: the output only shows that everything runs, and the
predictions mean nothing. Without ``--image`` a synthetic test image is used. A ``.safetensors`` from
``scripts/convert_checkpoint.py`` names its model and kwargs; for a released file of a custom size
give ``--official-config``.

``python -m rmt --self-test`` checks the Triton kernels on this machine's GPU instead: every kernel
configuration of the models at 224 px and a detection size, forward and backward, against the float64
reference (:func:`rmt.tools.self_test.self_test`); a pasteable report, exit status 1 on a failure, 0
with one line where no GPU (or Triton's interpreter) can run them.
"""
import logging
import os
import sys
import time

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from .tools.cli import (
    ArgumentParser, ScriptError, add_model_args, available_device, build_model, model_name, positive_int, run_main)


def demo_image(size: int = 256) -> Image.Image:
    """A smooth colour pattern, so the demo runs with no file at hand."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    rgb = torch.stack([x, y, 0.5 + 0.5 * torch.sin(12 * (x + y))], dim=-1)
    return Image.fromarray((rgb * 255).byte().numpy())


def read_image(path: str) -> Image.Image:
    """An image file as RGB, or a :class:`ScriptError` saying why it cannot be one."""
    if os.path.isdir(path):
        raise ScriptError(f'--image {path}: a folder, expected an image file')
    try:
        with Image.open(path) as image:
            return image.convert('RGB')  # decodes the whole file: a truncated one fails here
    except FileNotFoundError:
        raise ScriptError(f'--image {path}: no such file') from None
    except UnidentifiedImageError:
        raise ScriptError(f'--image {path}: not an image file Pillow can read (JPEG, PNG, ...)') from None
    except OSError as e:  # unreadable (permissions), or a corrupt or truncated image
        raise ScriptError(f'--image {path}: cannot read it as an image ({e.strerror or e})') from None


def parse_sizes(text: str):
    """'224,800x1344' -> [(224, 224), (800, 1344)]: image sizes in px, height x width."""
    sizes = []
    for item in text.split(','):
        parts = item.split('x')
        if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ScriptError(f'--sizes {text!r}: expected sizes in px like 224 or 800x1344, comma-separated')
        sizes.append((int(parts[0]), int(parts[-1])))
    return sizes


def self_test(args) -> int:
    from .tools.self_test import DETECTION_SIZE, self_test
    from .model import MODEL_ARGS
    models = [m for m in args.models.split(',') if m]
    unknown = [m for m in models if m not in MODEL_ARGS]
    if unknown or not models:
        raise ScriptError(f'--models {args.models!r}: unknown model(s) {unknown}, expected some of '
                          f'{", ".join(MODEL_ARGS)}')
    dtypes = None
    if args.dtypes:
        names = args.dtypes.split(',')
        if not all(n in ('bfloat16', 'float16', 'float32') for n in names):
            raise ScriptError(f'--dtypes {args.dtypes!r}: expected some of bfloat16, float16, float32')
        dtypes = [getattr(torch, n) for n in names]
    sizes = parse_sizes(args.sizes) if args.sizes else [(224, 224), DETECTION_SIZE]
    return self_test(models, sizes, dtypes, args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))


def main(argv=None) -> int:
    parser = ArgumentParser(prog='python -m rmt', description=__doc__.splitlines()[0])
    parser.add_argument('--model', type=model_name, default=None,
                        help='rmt_t, rmt_s, rmt_b, rmt_l, optionally with a tag (e.g. rmt_s.in1k_tl for '
                             'token-labeling weights); default: the one a converted --checkpoint names, else rmt_t')
    parser.add_argument('--checkpoint', default=None, help='released .pth or our .pth/.safetensors file '
                                                            '(default: random weights)')
    add_model_args(parser)
    parser.add_argument('--image', default=None, help='image file (default: a synthetic pattern)')
    parser.add_argument('--top-k', type=positive_int, default=5)
    test = parser.add_argument_group('self-test of the Triton kernels on this GPU')
    test.add_argument('--self-test', action='store_true', help='check every kernel configuration against float64 '
                                                               'and print a report (exit 1 on a failure)')
    test.add_argument('--models', default='rmt_t,rmt_s,rmt_b,rmt_l', help='the models whose stage shapes to check')
    test.add_argument('--sizes', default='', help='image sizes, e.g. 224,800x1344 (default: those two)')
    test.add_argument('--dtypes', default='', help='e.g. bfloat16,float16,float32 (default: all three on CUDA, '
                                                   'float32 in Triton\'s CPU interpreter)')
    test.add_argument('--device', type=available_device, default=None, help='default: cuda if there is one')
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test(args)

    args.pretrained_path = args.checkpoint
    image = read_image(args.image) if args.image else demo_image()
    model = build_model(args, None, default_model='rmt_t', weights_flag='--checkpoint').eval()
    params = sum(p.numel() for p in model.parameters())
    name = model.pretrained_cfg['architecture']
    print(f'{name}: {params:,} parameters, weights: {args.checkpoint or "random (no --checkpoint)"}')

    transform = create_transform(**resolve_data_config(model=model))
    x = transform(image).unsqueeze(0)
    start = time.perf_counter()
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    print(f'input {tuple(x.shape)} from {args.image or "a synthetic image"}, '
          f'inference {1000 * (time.perf_counter() - start):.0f} ms')
    info = ImageNetInfo() if model.num_classes == 1000 else None
    top = probs.topk(min(args.top_k, probs.numel()))
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        label = info.index_to_description(i) if info else f'class {i}'
        print(f'{p:8.4f}  {i:4d}  {label}')
    return 0


if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    sys.exit(run_main(main, prog='python -m rmt'))

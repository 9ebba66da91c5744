"""Classify an image with an RMT model: ``python -m rmt --model rmt_s --checkpoint RMT-S.pth --image cat.jpg``.

Without ``--checkpoint`` the weights are random: the output only shows that everything runs, and the
predictions mean nothing. Without ``--image`` a synthetic test image is used. A ``.safetensors`` from
``scripts/convert_checkpoint.py`` names its model and kwargs; for a released file of a custom size
give ``--official-config``.
"""
import logging
import os
import time

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from .tools.cli import ArgumentParser, ScriptError, add_model_args, build_model, model_name, positive_int, run_main


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


def main(argv=None) -> None:
    parser = ArgumentParser(prog='python -m rmt', description=__doc__.splitlines()[0])
    parser.add_argument('--model', type=model_name, default=None,
                        help='rmt_t, rmt_s, rmt_b, rmt_l, optionally with a tag (e.g. rmt_s.in1k_tl for '
                             'token-labeling weights); default: the one a converted --checkpoint names, else rmt_t')
    parser.add_argument('--checkpoint', default=None, help='released .pth or our .pth/.safetensors file '
                                                            '(default: random weights)')
    add_model_args(parser)
    parser.add_argument('--image', default=None, help='image file (default: a synthetic pattern)')
    parser.add_argument('--top-k', type=positive_int, default=5)
    args = parser.parse_args(argv)

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


if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    run_main(main, prog='python -m rmt')

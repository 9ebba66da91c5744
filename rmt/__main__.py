"""Classify an image with an RMT model: ``python -m rmt --model rmt_s --checkpoint RMT-S.pth --image cat.jpg``.

Without ``--checkpoint`` the weights are random (the output only shows that everything runs);
without ``--image`` a synthetic test image is used.
"""
import argparse
import time

import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import rmt  # noqa: F401  (registers the models)


def demo_image(size: int = 256) -> Image.Image:
    """A smooth colour pattern, so the demo runs with no file at hand."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    rgb = torch.stack([x, y, 0.5 + 0.5 * torch.sin(12 * (x + y))], dim=-1)
    return Image.fromarray((rgb * 255).byte().numpy())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog='python -m rmt', description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='rmt_t', help='rmt_t, rmt_s, rmt_b, rmt_l, optionally with a tag '
                                                          '(e.g. rmt_s.in1k_tl for token-labeling weights)')
    parser.add_argument('--checkpoint', default=None, help='released .pth or our .pth/.safetensors file')
    parser.add_argument('--image', default=None, help='image file (default: a synthetic pattern)')
    parser.add_argument('--top-k', type=int, default=5)
    args = parser.parse_args(argv)

    overlay = dict(file=args.checkpoint) if args.checkpoint else None
    model = timm.create_model(args.model, pretrained=bool(args.checkpoint), pretrained_cfg_overlay=overlay).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f'{args.model}: {params:,} parameters, weights: {args.checkpoint or "random (no --checkpoint)"}')

    image = Image.open(args.image).convert('RGB') if args.image else demo_image()
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
    main()

#!/usr/bin/env python3
"""Write scikit-learn's handwritten digits as an image folder, the data of the README's test run.

    python scripts/make_digits.py /tmp/digits        # /tmp/digits/train/digitK/*.png, /tmp/digits/validation/...

1,437 training and 360 validation images, the 8x8 scans upscaled to 32 px RGB; the data ship inside
the scikit-learn wheel, so nothing is downloaded. The tests write their image set with
:func:`write_digits_folder`.
"""
import os

from rmt.tools.cli import ArgumentParser, ScriptError, positive_int, run_main


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


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='folder to write train/ and validation/ into')
    parser.add_argument('--size', type=positive_int, default=32, help='image side in pixels (default: 32)')
    args = parser.parse_args(argv)
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        raise ScriptError(f'root {args.root}: a file, expected a folder to write the images into')
    try:
        write_digits_folder(args.root, size=args.size)
    except ImportError as e:
        raise ScriptError(f'scikit-learn is needed for its digits ({e}): pip install scikit-learn') from None
    except OSError as e:
        raise ScriptError(f'root {args.root}: cannot write there ({e.strerror})') from None
    print(f'wrote {args.root}/train and {args.root}/validation')


if __name__ == '__main__':
    run_main(main)

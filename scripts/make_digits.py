#!/usr/bin/env python3
"""Write scikit-learn's handwritten digits as an image folder, the data of the README's test run.

    python scripts/make_digits.py /tmp/digits        # /tmp/digits/train/digitK/*.png, /tmp/digits/validation/...

1,437 training and 360 validation images, the 8x8 scans upscaled to 32 px RGB; the data ship inside
the scikit-learn wheel, so nothing is downloaded (``rmt.data.write_digits_folder``).
"""
import argparse

from rmt.data import write_digits_folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='folder to write train/ and validation/ into')
    parser.add_argument('--size', type=int, default=32, help='image side in pixels (default: 32)')
    args = parser.parse_args(argv)
    write_digits_folder(args.root, size=args.size)
    print(f'wrote {args.root}/train and {args.root}/validation')


if __name__ == '__main__':
    main()

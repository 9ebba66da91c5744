"""Shared by the script tests: a small real image set, and running the scripts as a user would.

The data are scikit-learn's 1797 handwritten digits (8x8 grey scans shipped inside the wheel, no
download), written once per test session as 32x32 RGB PNGs in an image folder with ``train/`` and
``validation/`` splits. ``python tests/_rmt_training.py DIR`` writes the same folder for a manual run.
"""
import csv
import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
SMOKE_CONFIG = os.path.join(REPO, 'configs', 'smoke_digits.yaml')
NUM_VAL = 360


def make_digits_folder(root: str, classes=range(10), size: int = 32, limit: int = 0) -> str:
    """Write the digits as ``root/{train,validation}/digit{k}/NNNN.png``; the same split every time."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    kept = [i for i in order if digits.target[i] in set(classes)]
    if limit:
        kept = kept[:limit]
    num_val = len(kept) * NUM_VAL // len(order)
    for n, i in enumerate(kept):
        folder = os.path.join(root, 'validation' if n < num_val else 'train', f'digit{digits.target[i]}')
        os.makedirs(folder, exist_ok=True)
        pixels = (digits.images[i] * (255. / 16.)).round().astype(np.uint8)
        Image.fromarray(pixels).convert('RGB').resize((size, size), Image.BILINEAR).save(
            os.path.join(folder, f'{i:04d}.png'))
    return root


_tmp_dirs = []


def session_dir(name: str) -> str:
    path = tempfile.mkdtemp(prefix=f'rmt-{name}-')
    _tmp_dirs.append(path)
    return path


@functools.lru_cache(maxsize=None)
def digits_folder() -> str:
    return make_digits_folder(os.path.join(session_dir('digits'), 'digits'))


def env() -> dict:
    # one thread per process: fast and reproducible on a small shared CPU
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def script(name: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>.py`` with ``args`` in a fresh interpreter; output captured as text."""
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, name + '.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f'{name}.py {" ".join(map(str, args))} exited {proc.returncode}:\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return proc


def smoke_args(output: str, experiment: str, *extra: str) -> list:
    return ['--config', SMOKE_CONFIG, '--data-dir', digits_folder(), '--device', 'cpu', '--output', output,
            '--experiment', experiment, *extra]


@functools.lru_cache(maxsize=None)
def smoke_run() -> str:
    """The test recipe trained once, uninterrupted; returns its output folder."""
    output = session_dir('runs')
    script('train', *smoke_args(output, 'uninterrupted'))
    return os.path.join(output, 'uninterrupted')


def read_summary(run_dir: str) -> list:
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def cleanup() -> None:
    for path in _tmp_dirs:
        shutil.rmtree(path, ignore_errors=True)


import atexit  # noqa: E402

atexit.register(cleanup)

if __name__ == '__main__':
    target = sys.argv[1] if len(sys.argv) > 1 else 'digits'
    make_digits_folder(target)
    print(f'wrote {target}/train and {target}/validation')


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread like the scripts' subprocesses: fast on a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

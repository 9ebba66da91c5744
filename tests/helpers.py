"""Helpers shared by the tests: the released-format fixtures, a small real image set, running the scripts.

The image set is scikit-learn's 1797 handwritten digits (``rmt.data.write_digits_folder``: 8x8
grey scans shipped inside the wheel, no download), written once per test session as 32x32 RGB PNGs
in an image folder with ``train/`` and ``validation/`` splits.
"""
import csv
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm

import rmt
from rmt.data import write_digits_folder

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / 'scripts'
FIXTURES = REPO / 'tests' / 'fixtures'
SMALL_CONFIG = FIXTURES / 'official_small_config.json'
SMALL_CHECKPOINT = FIXTURES / 'official_small_checkpoint.pth'
SMALL_TL_CHECKPOINT = FIXTURES / 'official_small_tokenlabel_checkpoint.pth'
SMOKE_CONFIG = REPO / 'configs' / 'smoke_digits.yaml'


def small_kwargs(**overrides):
    """Model kwargs of the fixtures' small configuration (10 classes)."""
    return dict(rmt.official_config_to_kwargs(json.loads(SMALL_CONFIG.read_text())), **overrides)


def load_small(checkpoint=SMALL_CHECKPOINT, **overrides):
    """The small released-format checkpoint, loaded through timm's pretrained path."""
    return timm.create_model(
        'rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), **small_kwargs(**overrides)).eval()


@functools.lru_cache(maxsize=None)
def load_script(name: str):
    """``scripts/<name>.py`` as a module, to call its ``main`` in-process (the scripts import only ``rmt`` and timm)."""
    spec = importlib.util.spec_from_file_location(f'scripts_{name}', SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tmp_dirs = []


def session_dir(name: str) -> str:
    path = tempfile.mkdtemp(prefix=f'rmt-{name}-')
    _tmp_dirs.append(path)
    return path


@functools.lru_cache(maxsize=None)
def digits_folder() -> str:
    return write_digits_folder(os.path.join(session_dir('digits'), 'digits'))


def env() -> dict:
    # one thread per process: fast and reproducible on a small shared CPU
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def run(args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS...`` in a fresh interpreter at the repository root; output captured as text."""
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f'python {" ".join(map(str, args))} exited {proc.returncode}:\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return proc


def script(name: str, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>.py ARGS...`` as a user would."""
    return run([SCRIPTS / f'{name}.py', *args], timeout=timeout, check=check)


def kill_when_written(proc: subprocess.Popen, path: str, timeout: float = 240) -> None:
    """SIGKILL a running training process as soon as ``path`` (a checkpoint) appears."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, 'the run ended before it could be killed'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def smoke_args(output: str, experiment: str, *extra: str) -> list:
    return ['--config', str(SMOKE_CONFIG), '--data-dir', digits_folder(), '--device', 'cpu', '--output', output,
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

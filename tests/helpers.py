"""Helpers shared by the tests: the released-format fixtures, a small real image set, running the scripts.

The image set is scikit-learn's 1797 handwritten digits (``write_digits_folder`` of
``scripts/make_digits.py``: 8x8 grey scans shipped inside the wheel, no download), written once per
test session as 32x32 RGB PNGs in an image folder with ``train/`` and ``validation/`` splits.

Subprocesses get no tight time limit (a busy machine may be many times slower than a quiet one):
only :data:`PATIENCE`, which catches a hang, and a failure says what the test was waiting for.
"""
import argparse
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
import torch

import rmt

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / 'scripts'
FIXTURES = REPO / 'tests' / 'fixtures'
SMALL_CONFIG = FIXTURES / 'official_small_config.json'
SMALL_CHECKPOINT = FIXTURES / 'official_small_checkpoint.pth'
SMALL_TL_CHECKPOINT = FIXTURES / 'official_small_tokenlabel_checkpoint.pth'
DETECTION_CHECKPOINT = FIXTURES / 'official_small_detection_checkpoint.pth'
SMOKE_CONFIG = REPO / 'configs' / 'smoke_digits.yaml'
PATIENCE = 3600.  # seconds a subprocess may take before a test calls it hung (about 100x a quiet machine's time)


class CodePayload:
    """Pickles into a call of ``os.system`` that creates ``marker``: what a file that carries code does when
    loaded without weights-only unpickling. ``ran()`` tells whether it did."""

    def __init__(self, marker: str):
        self.marker = marker
        if os.path.exists(marker):
            os.remove(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)

    def ran(self) -> bool:
        return os.path.exists(self.marker)


def one_line_error(capsys, main, argv) -> str:
    """Run a script's ``main(argv)`` as its ``__main__`` does (``rmt.tools.cli.run_main``, program name PROG); return
    its error line after checking exit status 2, one line on stderr and no traceback."""
    import pytest
    from rmt.tools.cli import run_main
    with pytest.raises(SystemExit) as exit_:
        run_main(main, [str(a) for a in argv], prog='PROG')
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert 'Traceback' not in err
    errors = [line for line in err.splitlines() if 'error' in line.lower()]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith('PROG: error: ')
    return errors[0]


def hub_cache_repo(cache, repo_id: str, folder, commit: str = '0123456789abcdef0123456789abcdef01234567') -> Path:
    """Put the files of ``folder`` into the Hugging Face Hub cache ``cache`` (``$HF_HOME/hub``) as the main revision
    of ``repo_id``, laid out as huggingface_hub reads it offline: ``models--ORG--NAME/refs/main`` holds a commit
    hash, ``snapshots/<hash>/`` the files. Returns the snapshot folder."""
    repo = Path(cache) / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    return snapshot


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


def write_digits_folder(root: str, **kwargs) -> str:
    """scikit-learn's digits as an image folder (``scripts/make_digits.py``'s ``write_digits_folder``)."""
    return load_script('make_digits').write_digits_folder(root, **kwargs)


@functools.lru_cache(maxsize=None)
def digits_folder() -> str:
    return write_digits_folder(os.path.join(session_dir('digits'), 'digits'))


def env() -> dict:
    # one thread per process: fast and reproducible on a small shared CPU
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def _text(output) -> str:
    return output.decode(errors='replace') if isinstance(output, bytes) else output or ''


def run(args, timeout: float = PATIENCE, check: bool = True, extra_env=None) -> subprocess.CompletedProcess:
    """Run ``python ARGS...`` in a fresh interpreter at the repository root (``extra_env`` added to its environment);
    output captured as text."""
    command = f'python {" ".join(map(str, args))}'
    try:
        proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=dict(env(), **(extra_env or {})), cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f'waited {timeout:.0f} s for {command} to finish; it was still running (hung?):\n'
                             f'{_text(e.stdout)[-3000:]}\n{_text(e.stderr)[-6000:]}') from None
    if check and proc.returncode != 0:
        raise AssertionError(f'python {" ".join(map(str, args))} exited {proc.returncode}:\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return proc


def script(name: str, *args, timeout: float = PATIENCE, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>.py ARGS...`` as a user would."""
    return run([SCRIPTS / f'{name}.py', *args], timeout=timeout, check=check)


def kill_when_written(proc: subprocess.Popen, path: str, timeout: float = PATIENCE) -> None:
    """SIGKILL a running training process as soon as ``path`` (a checkpoint) appears."""
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f'waiting for {path} to kill the run then, but the run ended (exit ' \
                                    f'{proc.returncode}) without writing it'
        assert time.time() - start < timeout, f'waited {timeout:.0f} s for the run to write {path}; it did not (hung?)'
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


def run_side_by_side(*commands, cwd=REPO, timeout: float = PATIENCE) -> list:
    """Run ``python ARGS...`` commands at once (they share the cores either way); ``(returncode, stdout, stderr)``
    of each, in order."""
    procs = [subprocess.Popen([sys.executable, *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env(), cwd=cwd) for c in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f'waited {timeout:.0f} s for {" ".join(map(str, e.cmd))} to finish (hung?)') from None
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def load_run_checkpoint(path) -> dict:
    """A checkpoint of scripts/train.py, read as resuming reads it (weights-only, with the run's args)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def assert_resumed_like_uninterrupted(run_dir: str, reference_dir: str, epoch: int) -> None:
    """A killed and resumed run ends as the uninterrupted one: weights, EMA, optimizer state and summary.csv."""
    resumed, uninterrupted = (load_run_checkpoint(os.path.join(d, 'last.pth.tar')) for d in (run_dir, reference_dir))
    assert resumed['epoch'] == uninterrupted['epoch'] == epoch
    for part in ('state_dict', 'state_dict_ema'):
        for k, v in uninterrupted[part].items():
            assert torch.equal(resumed[part][k], v), f'{part}.{k} differs after the resume'
    for i, s in uninterrupted['optimizer']['state'].items():
        assert all(torch.equal(resumed['optimizer']['state'][i][k], s[k]) for k in s)
    assert read_summary(run_dir) == read_summary(reference_dir)


def read_summary(run_dir: str) -> list:
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def cleanup() -> None:
    for path in _tmp_dirs:
        shutil.rmtree(path, ignore_errors=True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0., name: str = 'tensor'):
    """``torch.testing.assert_close`` whose failure names the tensor, the tolerances and the largest error."""
    __tracebackhide__ = True
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f'{name}: shape {list(actual.shape)}, expected {list(expected.shape)}'
    error = (actual.double() - expected.double()).abs()
    allowed = atol + rtol * expected.double().abs()
    bad = ~(error <= allowed)
    assert not bad.any(), (f'{name}: {int(bad.sum())} of {error.numel()} elements beyond atol={atol:g}, rtol={rtol:g}; '
                           f'largest error {error.max().item():.3g} at {list(map(int, torch.nonzero(error == error.max())[0]))}')


def tables_for(grid, n=3, d=8, with_full=True, dtype=torch.float32, decay_exponent=2., heads_range=4., device='cpu'):
    """The position tables of ``n`` heads of ``d`` channels over ``grid`` (a list of sizes)."""
    from rmt.position import RelPos
    return RelPos(n * d, n, decay_exponent, heads_range).build(list(grid), torch.device(device), dtype, with_full)

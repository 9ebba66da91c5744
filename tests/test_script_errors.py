"""Every script's answer to a user's mistake: one line on stderr naming the argument, the value and what is
expected, exit status 2, no traceback.

Each script's ``main`` runs in-process under ``rmt.cli.run_main`` (what the scripts' ``__main__`` does), so
the line and the exit status are what a user sees; one test runs every script as a user would, in fresh
interpreters.
"""
import argparse
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import rmt.__main__
from rmt.cli import run_main
from tests.helpers import (
    PATIENCE, REPO, SCRIPTS, SMALL_CHECKPOINT, SMOKE_CONFIG, digits_folder, env, load_script, write_digits_folder)

pytestmark = pytest.mark.usefixtures('one_thread')

SMOKE_KWARGS = dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), projection=64)


@pytest.fixture(autouse=True)
def _log_handlers_of_this_test_only():
    """The scripts add a stderr log handler (timm's ``setup_default_logging``); in-process, each test's handler
    writes to that test's captured stderr, which is gone after it."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    root.handlers[:] = before


def one_line_error(capsys, main, argv) -> str:
    """Run ``main(argv)`` as the script would; return its error line after checking the exit and stderr."""
    with pytest.raises(SystemExit) as exit_:
        run_main(main, [str(a) for a in argv], prog='PROG')
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert 'Traceback' not in err
    errors = [line for line in err.splitlines() if 'error' in line.lower()]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith('PROG: error: ')
    return errors[0]


def assert_says(line: str, *fragments: str) -> None:
    missing = [f for f in fragments if f not in line]
    assert not missing, f'{missing} not in: {line}'


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Wrong inputs of every kind: missing, a folder, a text file, a truncated JPEG, random bytes."""
    root = tmp_path_factory.mktemp('wrong')
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / 'ok.jpg')
    (root / 'truncated.jpg').write_bytes((root / 'ok.jpg').read_bytes()[:600])
    (root / 'noise.jpg').write_bytes(np.random.RandomState(1).bytes(700))
    (root / 'text.pth').write_text('not a checkpoint\n')
    (root / 'folder').mkdir()
    return root


# --- python -m rmt -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('argv, fragments', [
    (['--image', '{w}/nope.jpg'], ['--image', 'nope.jpg: no such file']),
    (['--image', '{w}/folder'], ['--image', 'folder: a folder, expected an image file']),
    (['--image', '{w}/truncated.jpg'], ['--image', 'truncated.jpg: cannot read it as an image', 'truncated']),
    (['--image', '{w}/noise.jpg'], ['--image', 'noise.jpg: not an image file Pillow can read']),
    (['--image', '{w}/text.pth'], ['--image', 'text.pth: not an image file Pillow can read']),
    (['--top-k', '0'], ['--top-k', "expected a positive integer, got '0'"]),
    (['--model', 'rmt_x'], ['--model', "unknown model 'rmt_x'", 'rmt_t']),
    (['--model', 'rmt_s.nope'], ['--model', "rmt_s has no tag 'nope'", 'in1k_tl']),
    (['--model-kwargs', 'depths=(1,1,1'], ['--model-kwargs', "'(1,1,1' is not a Python literal"]),
    (['--model-kwargs', 'depths'], ['--model-kwargs', "expected key=value, got 'depths'"]),
    (['--checkpoint', '{w}/nope.pth'], ['--checkpoint', 'nope.pth: no such file']),
    (['--checkpoint', '{w}/folder'], ['--checkpoint', 'folder: a folder, expected a checkpoint file']),
    (['--checkpoint', '{w}/text.pth'], ['--checkpoint', 'text.pth', 'not a PyTorch checkpoint']),
    (['--official-config', '{w}/text.pth'], ['--official-config', 'text.pth', 'expected a JSON object']),
])
def test_demo_mistakes(capsys, files, argv, fragments):
    line = one_line_error(capsys, rmt.__main__.main, [a.format(w=files) for a in argv])
    assert_says(line, *fragments)


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root reads any file')
def test_demo_unreadable_image(capsys, files, tmp_path):
    locked = tmp_path / 'locked.jpg'
    locked.write_bytes((files / 'ok.jpg').read_bytes())
    locked.chmod(0)
    assert_says(one_line_error(capsys, rmt.__main__.main, ['--image', locked]), '--image', 'Permission denied')


# --- scripts/train.py --------------------------------------------------------------------------------------

def fake_run_checkpoint(path, epoch: int, **kwargs) -> str:
    """A checkpoint of scripts/train.py (weights, epoch, the run's args) for an rmt_t of ``kwargs``."""
    model = timm.create_model('rmt_t', num_classes=10, **kwargs)
    args = argparse.Namespace(model='rmt_t', model_kwargs=kwargs)
    torch.save(dict(epoch=epoch, state_dict=model.state_dict(), optimizer={}, args=args), path)
    return str(path)


@pytest.fixture(scope='module')
def train_files(files):
    """Config files with wrong values, a split smaller than a batch, and checkpoints of other runs."""
    (files / 'zero_batch.yaml').write_text('batch_size: 0\n')
    (files / 'bad_choice.yaml').write_text('amp_dtype: float8\n')
    write_digits_folder(str(files / 'tiny'), classes=range(2), limit=20)  # 16 training images
    fake_run_checkpoint(files / 'other.pth.tar', 0, **dict(SMOKE_KWARGS, embed_dims=(8, 16, 24, 32)))
    fake_run_checkpoint(files / 'finished.pth.tar', 3, **SMOKE_KWARGS)
    return files


@pytest.mark.parametrize('argv, fragments', [
    (['-b', '0'], ['-b/--batch-size', "expected a positive integer, got '0'"]),
    (['--epochs', '0'], ['--epochs', "got '0'"]),
    (['--lr', 'nan'], ['--lr', "expected a finite number > 0, got 'nan'"]),
    (['--lr', 'inf'], ['--lr', "got 'inf'"]),
    (['--lr', '-0.1'], ['--lr', "got '-0.1'"]),
    (['--warmup-lr', 'fast'], ['--warmup-lr', "got 'fast'"]),
    (['--img-size', '-32'], ['--img-size', "got '-32'"]),
    (['-j', '-1'], ['-j/--workers', "expected an integer >= 0, got '-1'"]),
    (['--smoothing', '1.5'], ['--smoothing', "expected a number from 0 to 1, got '1.5'"]),
    (['--model', 'rmt_x'], ['--model', "unknown model 'rmt_x'"]),
    (['--opt', 'adamx'], ['--opt', "unknown optimizer 'adamx'", 'did you mean adamax']),
    (['--sched', 'cosin'], ['--sched', "invalid choice: 'cosin'"]),
    (['--model-kwargs', 'depths=(1,1,1'], ['--model-kwargs', 'not a Python literal']),
    (['--nope'], ['unrecognized arguments: --nope']),
    (['--config', '{w}/nope.yaml'], ['--config', 'nope.yaml: no such file']),
    (['--config', '{w}/zero_batch.yaml'], ['--config', 'zero_batch.yaml: batch_size', "positive integer, got '0'"]),
    (['--config', '{w}/bad_choice.yaml'], ['--config', 'bad_choice.yaml: amp_dtype', "'float8' is not one of"]),
    (['--data-dir', '{w}/nowhere'], ['--data-dir', 'nowhere does not exist']),
    (['--data-dir', '{w}/text.pth'], ['--data-dir', 'text.pth is a file']),
    (['--data-dir', '{digits}', '--amp', '--amp-dtype', 'float16', '--device', 'cpu'],
     ['--amp-dtype float16', 'CPU', 'bfloat16']),
    (['--data-dir', '{tiny}', '-b', '64'], ['--batch-size 64', 'has 16 images, fewer than one batch',
                                            'at most 16']),
    (['--data-dir', '{digits}', '--resume', '{w}/nope.pth.tar'], ['--resume', 'nope.pth.tar: no such file']),
    (['--data-dir', '{digits}', '--resume', '{w}/text.pth'], ['--resume', 'text.pth', 'not a PyTorch checkpoint']),
    (['--data-dir', '{digits}', '--resume', '{w}/other.pth.tar'],
     ['--resume', 'other.pth.tar (a run of rmt_t with', 'made for another model or config', 'tensors disagree (',
      'args.yaml']),
    (['--data-dir', '{digits}', '--resume', '{w}/finished.pth.tar', '--no-resume-opt'],
     ['--resume', 'finished.pth.tar: the run would start at epoch 4 of 4', 'raise --epochs']),
    (['--data-dir', '{digits}', '--initial-checkpoint', '{w}/folder'],
     ['--initial-checkpoint', 'folder: a folder, expected a checkpoint file']),
])
def test_train_mistakes(capsys, train_files, tmp_path, argv, fragments):
    argv = [a.format(w=train_files, digits=digits_folder(), tiny=train_files / 'tiny') for a in argv]
    output = tmp_path / 'out'
    line = one_line_error(capsys, load_script('train').main,
                          ['--config', SMOKE_CONFIG, '--output', output, '--device', 'cpu', *argv])
    assert_says(line, *fragments)
    assert not output.exists()  # refused before anything was written


def test_train_resume_of_another_config_counts_the_disagreeing_tensors(capsys, files, tmp_path):
    path = fake_run_checkpoint(tmp_path / 'other.pth.tar', 0, **dict(SMOKE_KWARGS, embed_dims=(8, 16, 24, 32)))
    line = one_line_error(capsys, load_script('train').main, [
        '--config', SMOKE_CONFIG, '--data-dir', digits_folder(), '--device', 'cpu', '--resume', path])
    ours = timm.create_model('rmt_t', num_classes=10, **SMOKE_KWARGS).state_dict()
    theirs = torch.load(path, weights_only=False)['state_dict']
    differ = [k for k in ours if ours[k].shape != theirs[k].shape]  # in the model's order: the stem first
    assert_says(line, f'{len(differ)} of {len(ours)} tensors disagree ({differ[0]} {tuple(theirs[differ[0]].shape)} '
                      f'vs {tuple(ours[differ[0]].shape)}, {differ[1]} ')


# --- scripts/validate.py -------------------------------------------------------------------------------------

@pytest.mark.parametrize('argv, fragments', [
    (['-b', '0'], ['-b/--batch-size', "got '0'"]),
    (['--crop-pct', '0'], ['--crop-pct', "expected a finite number > 0, got '0'"]),
    (['--std', '0'], ['--std', "got '0'"]),
    (['--data-dir', '{digits}'], ['--model is required']),
    (['--data-dir', '{digits}', '--checkpoint', '{w}/nope.pth'], ['--checkpoint', 'nope.pth: no such file']),
    (['--data-dir', '{digits}', '--checkpoint', '{w}/folder'], ['--checkpoint', 'folder: a folder']),
    (['--data-dir', '{digits}', '--model', 'rmt_x'], ['--model', "unknown model 'rmt_x'"]),
    (['--data-dir', '{w}/nowhere', '--model', 'rmt_t'], ['--data-dir', 'nowhere does not exist']),
    (['--data-dir', '{w}/folder', '--model', 'rmt_t'], ['cannot open the "validation" split', 'folder']),
    (['--data-dir', '{digits}', '--model', 'rmt_t', '--results-file', '{w}/no/such/r.json'],
     ['--results-file', 'no folder']),
    (['--data-dir', '{digits}', '--model', 'rmt_t', '--checkpoint', str(SMALL_CHECKPOINT)],
     ['--checkpoint', 'official_small_checkpoint.pth', 'does not fit']),
])
def test_validate_mistakes(capsys, files, argv, fragments):
    argv = [a.format(w=files, digits=digits_folder()) for a in argv]
    assert_says(one_line_error(capsys, load_script('validate').main, argv + ['--device', 'cpu']), *fragments)


# --- scripts/export.py ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('argv, fragments', [
    (['--batch', '0'], ['--batch', "got '0'"]),
    (['--batch', '1'], ['--batch 1', 'at least 2', '--static-batch']),
    (['--tol', '-1'], ['--tol', "expected a finite number >= 0, got '-1'"]),
    (['--export-size', '10x10'], ['--export-size', 'at least 33 px', '10x10']),
    (['--export-size', 'big'], ['--export-size', "expected HxW, e.g. 224x224, got 'big'"]),
    (['--check-sizes', '224x0'], ['--check-sizes', 'at least 33 px']),
    (['--opset', '16'], ['--opset', 'too old']),
    (['--opset', 'x'], ['--opset', "got 'x'"]),
    (['--num-classes', '-1'], ['--num-classes', "got '-1'"]),
    (['--model', 'rmt_x'], ['--model', "unknown model 'rmt_x'"]),
    (['--checkpoint', '{w}/nope.pth'], ['--checkpoint', 'nope.pth: no such file']),
    (['--out-dir', '{w}/text.pth'], ['--out-dir', 'a file, expected a folder']),
])
def test_export_mistakes(capsys, files, argv, fragments):
    argv = [a.format(w=files) for a in argv]
    assert_says(one_line_error(capsys, load_script('export').main, argv), *fragments)


# --- scripts/flops.py and scripts/benchmark.py ------------------------------------------------------------------

@pytest.mark.parametrize('argv, fragments', [
    (['--models', 'rmt_x'], ['--models', "unknown model 'rmt_x'"]),
    (['--models', 'rmt_t', 'rmt_x'], ['--models', "unknown model 'rmt_x'"]),
    (['--size', '0', '0'], ['--size', "expected a positive integer, got '0'"]),
    (['--size', '224'], ['--size', 'expected 2 arguments']),
    (['--max-depth', '-1'], ['--max-depth', "got '-1'"]),
    (['--impl', 'fast'], ['--impl', "invalid choice: 'fast'"]),
    (['--models', 'resnet18', '--impl', 'sdpa'], ['--impl sdpa', 'resnet18 has no RMT attention paths']),
])
def test_flops_mistakes(capsys, argv, fragments):
    assert_says(one_line_error(capsys, load_script('flops').main, argv), *fragments)


@pytest.mark.parametrize('argv, fragments', [
    (['--models', 'rmt_x'], ['--models', "unknown model 'rmt_x'"]),
    (['--models', 'rmt_t@nope'], ['--models', "'rmt_t@nope': attention path 'nope' is not one of"]),
    (['--models', 'resnet18@sdpa'], ['--models', "'resnet18@sdpa': only RMT models have attention paths"]),
    (['--models', ','], ['--models', "expected model names separated by commas, got ','"]),
    (['--modes', 'fly'], ['--modes', "expected infer, train or infer,train, got 'fly'"]),
    (['-b', '0'], ['-b/--batch-size', "got '0'"]),
    (['--train-batch-size', '-2'], ['--train-batch-size', "got '-2'"]),
    (['--img-size', 'abc'], ['--img-size', "got 'abc'"]),
    (['--resolutions', '224,0'], ['--resolutions', "got '224,0'"]),
    (['--rounds', '0'], ['--rounds', "got '0'"]),
    (['--threads', '0'], ['--threads', "got '0'"]),
    (['--dtype', 'float8'], ['--dtype', "invalid choice: 'float8'"]),
])
def test_benchmark_mistakes(capsys, argv, fragments):
    assert_says(one_line_error(capsys, load_script('benchmark').main, argv), *fragments)


# --- scripts/convert_checkpoint.py ---------------------------------------------------------------------------------

@pytest.mark.parametrize('argv, fragments', [
    (['{w}/nope.pth', '{out}/x.safetensors'], ['INPUT', 'nope.pth: no such file']),
    (['{w}/folder', '{out}/x.safetensors'], ['INPUT', 'folder: a folder, expected a checkpoint file']),
    (['{w}/text.pth', '{out}/x.safetensors'], ['INPUT', 'text.pth', 'not a PyTorch checkpoint']),
    (['{small}', '{out}/x.pth'], ['OUTPUT', 'x.pth: expected a file name ending in .safetensors']),
    (['{small}', '{out}/x.safetensors'], ['--model is required']),
    (['{small}', '{out}/x.safetensors', '--model', 'rmt_x'], ['--model', "unknown model 'rmt_x'"]),
    (['{small}', '{out}/x.safetensors', '--model', 'resnet18'], ['--model resnet18', 'converts RMT checkpoints']),
    (['{small}', '{out}/x.safetensors', '--model', 'rmt_t'], ['official_small_checkpoint.pth', 'does not fit']),
    (['{small}', '{out}/x.safetensors', '--verify-size', '0'], ['--verify-size', "got '0'"]),
    (['{small}', '{out}/x.safetensors', '--no-ema'], ['unrecognized arguments: --no-ema']),
])
def test_convert_checkpoint_mistakes(capsys, files, tmp_path, argv, fragments):
    argv = [a.format(w=files, out=tmp_path, small=SMALL_CHECKPOINT) for a in argv]
    assert_says(one_line_error(capsys, load_script('convert_checkpoint').main, argv), *fragments)
    assert not os.listdir(tmp_path)


# --- scripts/make_token_labels.py, make_digits.py, timm_contract.py ----------------------------------------------

@pytest.mark.parametrize('argv, fragments', [
    (['{w}/nowhere', '{out}'], ['DATA', 'nowhere: no such image folder']),
    (['{w}/text.pth', '{out}'], ['DATA', 'text.pth: a file, expected image folder']),
    (['{train}', '{w}/text.pth'], ['LABELS', 'text.pth: a file, expected a folder']),
    (['{train}', '{out}'], ['--model is required']),
    (['{train}', '{out}', '--model', 'rmt_t'], ['the teacher needs weights: --pretrained', '--checkpoint']),
    (['{train}', '{out}', '--topk', '0'], ['--topk', "got '0'"]),
    (['{train}', '{out}', '-b', '0'], ['-b/--batch-size', "got '0'"]),
    (['{train}', '{out}', '--crop-mode', 'zoom'], ['--crop-mode', "invalid choice: 'zoom'"]),
    (['{train}', '{w}/folder', '--verify'], ['LABELS', 'folder', 'have no label file']),
])
def test_make_token_labels_mistakes(capsys, files, tmp_path, argv, fragments):
    out = tmp_path / 'labels'
    argv = [a.format(w=files, out=out, train=os.path.join(digits_folder(), 'train')) for a in argv]
    assert_says(one_line_error(capsys, load_script('make_token_labels').main, argv + ['--device', 'cpu']),
                *fragments)
    assert not out.exists()


@pytest.mark.parametrize('argv, fragments', [
    (['{out}', '--size', '0'], ['--size', "got '0'"]),
    (['{w}/text.pth'], ['root', 'text.pth: a file, expected a folder']),
    ([], ['the following arguments are required: root']),
])
def test_make_digits_mistakes(capsys, files, tmp_path, argv, fragments):
    argv = [a.format(w=files, out=tmp_path / 'digits') for a in argv]
    assert_says(one_line_error(capsys, load_script('make_digits').main, argv), *fragments)


@pytest.mark.parametrize('argv, fragments', [
    (['--test-file', '{w}/nope.py'], ['--test-file', 'nope.py: no such test file']),
    (['--timm-src', '{w}/folder'], ['--timm-src', 'folder: no such test file']),
    (['--test-file', '{w}/text.pth', '--models', 'nope*'], ['--models nope*: no registered timm model matches']),
])
def test_timm_contract_mistakes(capsys, files, argv, fragments):
    argv = [a.format(w=files) for a in argv]
    assert_says(one_line_error(capsys, load_script('timm_contract').main, argv), *fragments)


# --- as a user runs them ------------------------------------------------------------------------------------------

def test_every_script_run_as_a_user_would_answers_a_mistake_with_one_line_and_status_2(files, tmp_path):
    cases = {  # command -> the line it must print, exactly
        'python -m rmt': (['-m', 'rmt', '--image', f'{files}/truncated.jpg'],
                          f'--image {files}/truncated.jpg: cannot read it as an image'),
        'train.py': ([SCRIPTS / 'train.py', '-b', '0'], "argument -b/--batch-size: expected a positive integer"),
        'validate.py': ([SCRIPTS / 'validate.py', '--data-dir', files, '--checkpoint', files / 'nope.pth'],
                        f'--checkpoint {files}/nope.pth: no such file'),
        'export.py': ([SCRIPTS / 'export.py', '--export-size', '10x10'], 'argument --export-size: exported RMT'),
        'flops.py': ([SCRIPTS / 'flops.py', '--models', 'rmt_x'], "argument --models: unknown model 'rmt_x'"),
        'benchmark.py': ([SCRIPTS / 'benchmark.py', '--models', 'rmt_t@nope'],
                         "argument --models: 'rmt_t@nope': attention path 'nope'"),
        'convert_checkpoint.py': ([SCRIPTS / 'convert_checkpoint.py', files / 'text.pth', tmp_path / 'x.safetensors'],
                                  f'INPUT {files}/text.pth: '),
        'make_token_labels.py': ([SCRIPTS / 'make_token_labels.py', files / 'nowhere', tmp_path / 'labels'],
                                 f'DATA {files}/nowhere: no such image folder'),
        'make_digits.py': ([SCRIPTS / 'make_digits.py', files / 'text.pth'], f'root {files}/text.pth: a file'),
        'timm_contract.py': ([SCRIPTS / 'timm_contract.py', '--test-file', files / 'nope.py'],
                             f'--test-file {files}/nope.py: no such test file'),
    }
    procs = {prog: subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env(), cwd=REPO) for prog, (argv, _) in cases.items()}
    try:
        outputs = {prog: proc.communicate(timeout=PATIENCE) for prog, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for prog, (argv, expected) in cases.items():
        out, err = outputs[prog]
        assert procs[prog].returncode == 2, f'{prog} exited {procs[prog].returncode}:\n{err[-3000:]}'
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: {expected}'), f'{prog}:\n{err[-3000:]}'

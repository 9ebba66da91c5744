"""Every script's answer to a user's mistake: one line on stderr naming the argument, the value and what is
expected, exit status 2, no traceback, nothing written.

Each script's ``main`` runs in-process under ``rmt.tools.cli.run_main`` (what the scripts' ``__main__`` does), so
the line and the exit status are what a user sees; one test runs every script as a user would, in fresh
interpreters.
"""
import argparse
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import rmt.__main__
from tests.helpers import (
    SCRIPTS, SMALL_CHECKPOINT, SMOKE_CONFIG, digits_folder, load_script, one_line_error, run_side_by_side,
    write_digits_folder)

pytestmark = pytest.mark.usefixtures('one_thread')

SMOKE_KWARGS = dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), projection=64)
# what every call of a script gets before the case's own arguments ({out} is a path that must stay unwritten)
COMMON = {
    'train': ['--config', str(SMOKE_CONFIG), '--output', '{out}', '--device', 'cpu'],
    'validate': ['--device', 'cpu'],
    'make_token_labels': ['--device', 'cpu'],
}


def case(script, argv, *fragments):
    return pytest.param(script, argv, fragments, id=f'{script} {" ".join(argv)}'.replace('{w}/', ''))


CASES = [
    # python -m rmt
    case('rmt', ['--image', '{w}/nope.jpg'], '--image', 'nope.jpg: no such file'),
    case('rmt', ['--image', '{w}/folder'], '--image', 'folder: a folder, expected an image file'),
    case('rmt', ['--image', '{w}/truncated.jpg'], '--image', 'truncated.jpg: cannot read it as an image', 'truncated'),
    case('rmt', ['--image', '{w}/noise.jpg'], '--image', 'noise.jpg: not an image file Pillow can read'),
    case('rmt', ['--image', '{w}/text.pth'], '--image', 'text.pth: not an image file Pillow can read'),
    case('rmt', ['--top-k', '0'], '--top-k', "expected a positive integer, got '0'"),
    case('rmt', ['--model', 'rmt_x'], '--model', "unknown model 'rmt_x'", 'rmt_t'),
    case('rmt', ['--model', 'rmt_s.nope'], '--model', "rmt_s has no tag 'nope'", 'in1k_tl'),
    case('rmt', ['--model-kwargs', 'depths=(1,1,1'], '--model-kwargs', "'(1,1,1' is not a Python literal"),
    case('rmt', ['--model-kwargs', 'depths'], '--model-kwargs', "expected key=value, got 'depths'"),
    case('rmt', ['--checkpoint', '{w}/nope.pth'], '--checkpoint', 'nope.pth: no such file'),
    case('rmt', ['--checkpoint', '{w}/folder'], '--checkpoint', 'folder: a folder, expected a checkpoint file'),
    case('rmt', ['--checkpoint', '{w}/text.pth'], '--checkpoint', 'text.pth', 'not a PyTorch checkpoint'),
    case('rmt', ['--official-config', '{w}/text.pth'], '--official-config', 'text.pth', 'expected a JSON object'),
    # train.py: values, names, files, data, and runs that would make no step
    case('train', ['-b', '0'], '-b/--batch-size', "expected a positive integer, got '0'"),
    case('train', ['--epochs', '0'], '--epochs', "got '0'"),
    case('train', ['--lr', 'nan'], '--lr', "expected a finite number > 0, got 'nan'"),
    case('train', ['--lr', 'inf'], '--lr', "got 'inf'"),
    case('train', ['--lr', '-0.1'], '--lr', "got '-0.1'"),
    case('train', ['--warmup-lr', 'fast'], '--warmup-lr', "got 'fast'"),
    case('train', ['--img-size', '-32'], '--img-size', "got '-32'"),
    case('train', ['-j', '-1'], '-j/--workers', "expected an integer >= 0, got '-1'"),
    case('train', ['--smoothing', '1.5'], '--smoothing', "expected a number from 0 to 1, got '1.5'"),
    case('train', ['--model', 'rmt_x'], '--model', "unknown model 'rmt_x'"),
    case('train', ['--opt', 'adamx'], '--opt', "unknown optimizer 'adamx'", 'did you mean adamax'),
    case('train', ['--sched', 'cosin'], '--sched', "invalid choice: 'cosin'"),
    case('train', ['--model-kwargs', 'depths=(1,1,1'], '--model-kwargs', 'not a Python literal'),
    case('train', ['--nope'], 'unrecognized arguments: --nope'),
    case('train', ['--config', '{w}/nope.yaml'], '--config', 'nope.yaml: no such file'),
    case('train', ['--config', '{w}/zero_batch.yaml'], '--config', 'zero_batch.yaml: batch_size',
         "positive integer, got '0'"),
    case('train', ['--config', '{w}/bad_choice.yaml'], '--config', 'bad_choice.yaml: amp_dtype',
         "'float8' is not one of"),
    case('train', ['--data-dir', '{w}/nowhere'], '--data-dir', 'nowhere does not exist'),
    case('train', ['--data-dir', '{w}/text.pth'], '--data-dir', 'text.pth is a file'),
    case('train', ['--data-dir', '{digits}', '--amp', '--amp-dtype', 'float16'], '--amp-dtype float16', 'CPU',
         'bfloat16'),
    case('train', ['--data-dir', '{w}/tiny', '-b', '64'], '--batch-size 64', 'has 16 images, fewer than one batch',
         'at most 16'),
    case('train', ['--data-dir', '{digits}', '-b', '63'], '--batch-size 63: mixup and CutMix',
         'need an even batch size per process', '-b 62 or 64'),
    case('train', ['--data-dir', '{digits}', '--resume', '{w}/nope.pth.tar'], '--resume', 'nope.pth.tar: no such file'),
    case('train', ['--data-dir', '{digits}', '--resume', '{w}/text.pth'], '--resume', 'text.pth',
         'not a PyTorch checkpoint'),
    case('train', ['--data-dir', '{digits}', '--resume', '{w}/other.pth.tar'], '--resume',
         'other.pth.tar (a run of rmt_t with', 'made for another model or config', 'tensors disagree (', 'args.yaml'),
    case('train', ['--data-dir', '{digits}', '--resume', '{w}/finished.pth.tar', '--no-resume-opt'], '--resume',
         'finished.pth.tar: the run would start at epoch 4 of 4', 'raise --epochs'),
    case('train', ['--data-dir', '{digits}', '--start-epoch', '4'], '--start-epoch 4', 'start at epoch 4 of 4'),
    case('train', ['--data-dir', '{digits}', '--initial-checkpoint', '{w}/folder'], '--initial-checkpoint',
         'folder: a folder, expected a checkpoint file'),
    # validate.py
    case('validate', ['-b', '0'], '-b/--batch-size', "got '0'"),
    case('validate', ['--crop-pct', '0'], '--crop-pct', "expected a finite number > 0, got '0'"),
    case('validate', ['--std', '0'], '--std', "got '0'"),
    case('validate', ['--data-dir', '{digits}'], '--model is required'),
    case('validate', ['--data-dir', '{digits}', '--checkpoint', '{w}/nope.pth'], '--checkpoint',
         'nope.pth: no such file'),
    case('validate', ['--data-dir', '{digits}', '--checkpoint', '{w}/folder'], '--checkpoint', 'folder: a folder'),
    case('validate', ['--data-dir', '{digits}', '--model', 'rmt_x'], '--model', "unknown model 'rmt_x'"),
    case('validate', ['--data-dir', '{w}/nowhere', '--model', 'rmt_t'], '--data-dir', 'nowhere does not exist'),
    case('validate', ['--data-dir', '{w}/folder', '--model', 'rmt_t'], 'cannot open the "validation" split', 'folder'),
    case('validate', ['--data-dir', '{digits}', '--model', 'rmt_t', '--results-file', '{out}/r.json'],
         '--results-file', 'no folder'),
    case('validate', ['--data-dir', '{digits}', '--model', 'rmt_t', '--checkpoint', '{small}'], '--checkpoint',
         'official_small_checkpoint.pth', 'does not fit'),
    # export.py
    case('export', ['--batch', '0'], '--batch', "got '0'"),
    case('export', ['--batch', '1'], '--batch 1', 'at least 2', '--static-batch'),
    case('export', ['--tol', '-1'], '--tol', "expected a finite number >= 0, got '-1'"),
    case('export', ['--export-size', '10x10'], '--export-size', 'at least 33 px', '10x10'),
    case('export', ['--export-size', 'big'], '--export-size', "expected HxW, e.g. 224x224, got 'big'"),
    case('export', ['--check-sizes', '224x0'], '--check-sizes', 'at least 33 px'),
    case('export', ['--opset', '16'], '--opset', 'too old'),
    case('export', ['--opset', 'x'], '--opset', "got 'x'"),
    case('export', ['--num-classes', '-1'], '--num-classes', "got '-1'"),
    case('export', ['--model', 'rmt_x'], '--model', "unknown model 'rmt_x'"),
    case('export', ['--checkpoint', '{w}/nope.pth', '--out-dir', '{out}'], '--checkpoint', 'nope.pth: no such file'),
    case('export', ['--out-dir', '{w}/text.pth'], '--out-dir', 'a file, expected a folder'),
    # flops.py
    case('flops', ['--models', 'rmt_x'], '--models', "unknown model 'rmt_x'"),
    case('flops', ['--models', 'rmt_t', 'rmt_x'], '--models', "unknown model 'rmt_x'"),
    case('flops', ['--size', '0', '0'], '--size', "expected a positive integer, got '0'"),
    case('flops', ['--size', '224'], '--size', 'expected 2 arguments'),
    case('flops', ['--max-depth', '-1'], '--max-depth', "got '-1'"),
    case('flops', ['--impl', 'fast'], '--impl', "invalid choice: 'fast'"),
    case('flops', ['--models', 'resnet18', '--impl', 'sdpa'], '--impl sdpa', 'resnet18 has no RMT attention paths'),
    # benchmark.py
    case('benchmark', ['--models', 'rmt_x'], '--models', "unknown model 'rmt_x'"),
    case('benchmark', ['--models', 'rmt_t@nope'], '--models', "'rmt_t@nope': attention path 'nope' is not one of"),
    case('benchmark', ['--models', 'resnet18@sdpa'], '--models', "'resnet18@sdpa': only RMT models have attention"),
    case('benchmark', ['--models', ','], '--models', "expected model names separated by commas, got ','"),
    case('benchmark', ['--modes', 'fly'], '--modes', "expected infer, train or infer,train, got 'fly'"),
    case('benchmark', ['-b', '0'], '-b/--batch-size', "got '0'"),
    case('benchmark', ['--train-batch-size', '-2'], '--train-batch-size', "got '-2'"),
    case('benchmark', ['--img-size', 'abc'], '--img-size', "got 'abc'"),
    case('benchmark', ['--resolutions', '224,0'], '--resolutions', "got '224,0'"),
    case('benchmark', ['--rounds', '0'], '--rounds', "got '0'"),
    case('benchmark', ['--threads', '0'], '--threads', "got '0'"),
    case('benchmark', ['--dtype', 'float8'], '--dtype', "invalid choice: 'float8'"),
    # convert_checkpoint.py
    case('convert_checkpoint', ['{w}/nope.pth', '{out}/x.safetensors'], 'INPUT', 'nope.pth: no such file'),
    case('convert_checkpoint', ['{w}/folder', '{out}/x.safetensors'], 'INPUT', 'folder: a folder, expected a'),
    case('convert_checkpoint', ['{w}/text.pth', '{out}/x.safetensors'], 'INPUT', 'text.pth', 'not a PyTorch'),
    case('convert_checkpoint', ['{small}', '{out}/x.pth'], 'OUTPUT', 'x.pth: expected a file name ending in'),
    case('convert_checkpoint', ['{small}', '{out}/x.safetensors'], '--model is required'),
    case('convert_checkpoint', ['{small}', '{out}/x.safetensors', '--model', 'rmt_x'], '--model',
         "unknown model 'rmt_x'"),
    case('convert_checkpoint', ['{small}', '{out}/x.safetensors', '--model', 'resnet18'], '--model resnet18',
         'converts RMT checkpoints'),
    case('convert_checkpoint', ['{small}', '{out}/x.safetensors', '--model', 'rmt_t'], 'official_small_checkpoint.pth',
         'does not fit'),
    case('convert_checkpoint', ['{small}', '{out}/x.safetensors', '--verify-size', '0'], '--verify-size', "got '0'"),
    case('convert_checkpoint', ['{small}', '{out}/x.safetensors', '--no-ema'], 'unrecognized arguments: --no-ema'),
    # make_token_labels.py
    case('make_token_labels', ['{w}/nowhere', '{out}'], 'DATA', 'nowhere: no such image folder'),
    case('make_token_labels', ['{w}/text.pth', '{out}'], 'DATA', 'text.pth: a file, expected image folder'),
    case('make_token_labels', ['{train}', '{w}/text.pth'], 'LABELS', 'text.pth: a file, expected a folder'),
    case('make_token_labels', ['{train}', '{out}'], '--model is required'),
    case('make_token_labels', ['{train}', '{out}', '--model', 'rmt_t'], 'the teacher needs weights: --pretrained'),
    case('make_token_labels', ['{train}', '{out}', '--topk', '0'], '--topk', "got '0'"),
    case('make_token_labels', ['{train}', '{out}', '-b', '0'], '-b/--batch-size', "got '0'"),
    case('make_token_labels', ['{train}', '{out}', '--crop-mode', 'zoom'], '--crop-mode', "invalid choice: 'zoom'"),
    case('make_token_labels', ['{train}', '{w}/folder', '--verify'], 'LABELS', 'folder', 'have no label file'),
    # make_digits.py, timm_contract.py
    case('make_digits', ['{out}', '--size', '0'], '--size', "got '0'"),
    case('make_digits', ['{w}/text.pth'], 'root', 'text.pth: a file, expected a folder'),
    case('make_digits', [], 'the following arguments are required: root'),
    case('timm_contract', ['--test-file', '{w}/nope.py'], '--test-file', 'nope.py: no such test file'),
    case('timm_contract', ['--timm-src', '{w}/folder'], '--timm-src', 'folder: no such test file'),
    case('timm_contract', ['--test-file', '{w}/text.pth', '--models', 'nope*'],
         '--models nope*: no registered timm model matches'),
]


def fake_run_checkpoint(path, epoch: int, **kwargs) -> str:
    """A checkpoint of scripts/train.py (weights, epoch, the run's args) for an rmt_t of ``kwargs``."""
    model = timm.create_model('rmt_t', num_classes=10, **kwargs)
    args = argparse.Namespace(model='rmt_t', model_kwargs=kwargs)
    torch.save(dict(epoch=epoch, state_dict=model.state_dict(), optimizer={}, args=args), path)
    return str(path)


@pytest.fixture(scope='module')
def wrong(tmp_path_factory):
    """Wrong inputs of every kind: missing files, a folder, a text file, a truncated JPEG, random bytes, config
    files of wrong values, a split smaller than a batch, checkpoints of another config and of a finished run."""
    root = tmp_path_factory.mktemp('wrong')
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / 'ok.jpg')
    (root / 'truncated.jpg').write_bytes((root / 'ok.jpg').read_bytes()[:600])
    (root / 'noise.jpg').write_bytes(np.random.RandomState(1).bytes(700))
    (root / 'text.pth').write_text('not a checkpoint\n')
    (root / 'folder').mkdir()
    (root / 'zero_batch.yaml').write_text('batch_size: 0\n')
    (root / 'bad_choice.yaml').write_text('amp_dtype: float8\n')
    write_digits_folder(str(root / 'tiny'), classes=range(2), limit=20)  # 16 training images
    fake_run_checkpoint(root / 'other.pth.tar', 0, **dict(SMOKE_KWARGS, embed_dims=(8, 16, 24, 32)))
    fake_run_checkpoint(root / 'finished.pth.tar', 3, **SMOKE_KWARGS)
    return root


@pytest.mark.parametrize('script, argv, fragments', CASES)
def test_a_mistake_ends_in_one_line_naming_it_and_status_2(capsys, wrong, tmp_path, script, argv, fragments):
    main = rmt.__main__.main if script == 'rmt' else load_script(script).main
    out = tmp_path / 'out'
    values = dict(w=wrong, out=out, digits=digits_folder(), train=os.path.join(digits_folder(), 'train'),
                  small=SMALL_CHECKPOINT)
    line = one_line_error(capsys, main, [a.format(**values) for a in COMMON.get(script, []) + argv])
    missing = [f for f in fragments if f not in line]
    assert not missing, f'{missing} not in: {line}'
    assert not out.exists()  # refused before anything was written


def test_a_resume_of_another_config_counts_the_disagreeing_tensors_and_names_the_first(capsys, wrong):
    line = one_line_error(capsys, load_script('train').main, ['--config', SMOKE_CONFIG, '--data-dir', digits_folder(),
                                                               '--device', 'cpu', '--resume', wrong / 'other.pth.tar'])
    ours = timm.create_model('rmt_t', num_classes=10, **SMOKE_KWARGS).state_dict()
    theirs = torch.load(wrong / 'other.pth.tar', weights_only=False)['state_dict']
    differ = [k for k in ours if ours[k].shape != theirs[k].shape]  # in the model's order: the stem first
    assert f'{len(differ)} of {len(ours)} tensors disagree ({differ[0]} {tuple(theirs[differ[0]].shape)} ' \
           f'vs {tuple(ours[differ[0]].shape)}, {differ[1]} ' in line


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root reads any file')
def test_an_unreadable_image_is_one_line(capsys, wrong, tmp_path):
    locked = tmp_path / 'locked.jpg'
    locked.write_bytes((wrong / 'ok.jpg').read_bytes())
    locked.chmod(0)
    assert 'Permission denied' in one_line_error(capsys, rmt.__main__.main, ['--image', locked])


@pytest.mark.slow
def test_every_script_run_as_a_user_would_answers_a_mistake_with_one_line_and_status_2(wrong, tmp_path):
    cases = {  # command -> how its one line must begin
        'python -m rmt': (['-m', 'rmt', '--image', f'{wrong}/truncated.jpg'],
                          f'--image {wrong}/truncated.jpg: cannot read it as an image'),
        'train.py': ([SCRIPTS / 'train.py', '-b', '0'], "argument -b/--batch-size: expected a positive integer"),
        'validate.py': ([SCRIPTS / 'validate.py', '--data-dir', wrong, '--checkpoint', wrong / 'nope.pth'],
                        f'--checkpoint {wrong}/nope.pth: no such file'),
        'export.py': ([SCRIPTS / 'export.py', '--export-size', '10x10'], 'argument --export-size: exported RMT'),
        'flops.py': ([SCRIPTS / 'flops.py', '--models', 'rmt_x'], "argument --models: unknown model 'rmt_x'"),
        'benchmark.py': ([SCRIPTS / 'benchmark.py', '--models', 'rmt_t@nope'],
                         "argument --models: 'rmt_t@nope': attention path 'nope'"),
        'convert_checkpoint.py': ([SCRIPTS / 'convert_checkpoint.py', wrong / 'text.pth', tmp_path / 'x.safetensors'],
                                  f'INPUT {wrong}/text.pth: '),
        'make_token_labels.py': ([SCRIPTS / 'make_token_labels.py', wrong / 'nowhere', tmp_path / 'labels'],
                                 f'DATA {wrong}/nowhere: no such image folder'),
        'make_digits.py': ([SCRIPTS / 'make_digits.py', wrong / 'text.pth'], f'root {wrong}/text.pth: a file'),
        'timm_contract.py': ([SCRIPTS / 'timm_contract.py', '--test-file', wrong / 'nope.py'],
                             f'--test-file {wrong}/nope.py: no such test file'),
    }
    results = run_side_by_side(*(argv for argv, _ in cases.values()))
    for (prog, (_, expected)), (code, out, err) in zip(cases.items(), results, strict=True):
        assert code == 2, f'{prog} exited {code}:\n{err[-3000:]}'
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: {expected}'), f'{prog}:\n{err[-3000:]}'

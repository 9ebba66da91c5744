"""scripts/train.py --token-label end to end on scikit-learn's digits, on CPU.

A teacher (the student's model trained plainly) labels the digits with make_token_labels.py; a
student is trained with token labels and, for comparison, without (same recipe and epochs,
``configs/smoke_digits_tl.yaml``); then resuming, DDP with AMP, and fine-tuning the released-format
token-labeling checkpoint.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import timm
import torch

import rmt
from rmt.token_labeling import META_FILE, read_meta
from rmt.tools.cli import ScriptError, parse_args_with_config
from rmt.tools.data import open_dataset
from tests.helpers import (
    FIXTURES, PATIENCE, REPO, SCRIPTS, SMALL_CONFIG, assert_resumed_like_uninterrupted, digits_folder, env,
    kill_when_written, load_run_checkpoint, load_script, read_summary, run_side_by_side, script, session_dir,
    small_kwargs)

train = load_script('train')
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

TL_CONFIG = REPO / 'configs' / 'smoke_digits_tl.yaml'
SMALL_TL_CHECKPOINT = str(FIXTURES / 'official_small_tokenlabel_checkpoint.pth')


def tl_args(output: str, experiment: str, *extra: str) -> list:
    return ['--config', str(TL_CONFIG), '--data-dir', digits_folder(), '--device', 'cpu', '--output', output,
            '--experiment', experiment, *extra]


def train_command(*args: str) -> list:
    return [sys.executable, str(SCRIPTS / 'train.py'), *args]


def run_together(*commands: list) -> None:
    """Run ``python ARGS...`` commands side by side (the cores are used either way); fail with the output of any that
    fails."""
    for c, (code, out, err) in zip(commands, run_side_by_side(*commands), strict=True):
        assert code == 0, f'{" ".join(map(str, c))} exited {code}:\n{out[-2000:]}\n{err[-4000:]}'


@pytest.fixture(scope='module')
def labels() -> str:
    """Label files for the digits' training split, from a teacher trained for 10 epochs (sharper logits:
    no mixup, smoothing or erasing)."""
    output = session_dir('tl-teacher')
    script('train', *tl_args(output, 'teacher', '--epochs', '10', '--mixup', '0', '--smoothing', '0', '--reprob', '0'))
    folder = os.path.join(output, 'labels')
    script('make_token_labels', os.path.join(digits_folder(), 'train'), folder,
           '--checkpoint', os.path.join(output, 'teacher', 'last.pth.tar'), '--device', 'cpu')
    return folder


@pytest.fixture(scope='module')
def students(labels) -> dict:
    """The student trained with token labels and without, for the same 20 epochs (both at once)."""
    output = session_dir('tl-students')
    run_together([SCRIPTS / 'train.py', *tl_args(output, 'token-label', '--token-label', '--token-label-data', labels)],
                 [SCRIPTS / 'train.py', *tl_args(output, 'plain')])
    return {name: os.path.join(output, name) for name in ('token-label', 'plain')}


def test_token_labeled_student_is_within_one_point_of_the_plain_student(students):
    token_label, plain = (read_summary(students[name])[-1] for name in ('token-label', 'plain'))
    assert token_label['epoch'] == plain['epoch'] == 19
    print(f'digits, 20 epochs: top-1 {token_label["eval_top1"]:.2f} with token labels, '
          f'{plain["eval_top1"]:.2f} without')
    assert token_label['eval_top1'] >= plain['eval_top1'] - 1.0
    assert token_label['eval_top1'] > 95.0


def test_validate_py_scores_the_token_labeled_student_as_training_did(students):
    proc = script('validate', '--data-dir', digits_folder(), '--checkpoint',
                  os.path.join(students['token-label'], 'last.pth.tar'), '--workers', '0', '--device', 'cpu')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logged = read_summary(students['token-label'])[-1]
    assert result['top1'] == logged['eval_top1'] and abs(result['loss'] - logged['eval_loss']) < 1e-6


def test_token_label_run_records_the_aux_head_and_its_settings(students):
    state = load_run_checkpoint(os.path.join(students['token-label'], 'last.pth.tar'))
    assert state['args'].model_kwargs['token_label'] is True and 'aux_head.weight' in state['state_dict']
    assert (state['args'].token_label, state['args'].mixup, state['args'].cutmix) == (True, 0., 0.)
    with open(os.path.join(students['token-label'], 'log.txt')) as f:
        log = f.read()
    assert 'Token labeling: top-5 label maps of 4x4' in log and 'dense targets at 4x4 with released' in log
    assert 'aux_head.weight' not in load_run_checkpoint(os.path.join(students['plain'], 'last.pth.tar'))['state_dict']


def test_killed_token_label_run_resumes_to_the_same_weights_as_an_uninterrupted_one(labels):
    output = session_dir('tl-killed')
    short = ('--token-label', '--token-label-data', labels, '--epochs', '3')
    reference = subprocess.Popen(train_command(*tl_args(output, 'uninterrupted', *short)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=REPO)
    killed = subprocess.Popen(train_command(*tl_args(output, 'killed', *short)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=REPO)
    run_dir = os.path.join(output, 'killed')
    try:  # kill it for real in epoch 1, right after the epoch-0 checkpoint appears
        kill_when_written(killed, os.path.join(run_dir, 'checkpoint-0.pth.tar'))
        assert reference.wait(timeout=PATIENCE) == 0, 'the uninterrupted run failed'
    finally:
        killed.kill()
        reference.kill()
    assert load_run_checkpoint(os.path.join(run_dir, 'last.pth.tar'))['epoch'] < 2

    script('train', *tl_args(output, 'killed', *short), '--resume', os.path.join(run_dir, 'last.pth.tar'))

    assert_resumed_like_uninterrupted(run_dir, os.path.join(output, 'uninterrupted'), epoch=2)


def test_token_label_training_runs_under_torchrun_with_amp(labels, tmp_path):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2']
    args = tl_args(str(tmp_path), 'ddp', '--token-label', '--token-label-data', labels, '--epochs', '2',
                   '--warmup-epochs', '0', '-b', '32', '--amp', '--amp-dtype', 'bfloat16', '--workers', '0')
    # no loader processes: forking them from a process that holds gloo's threads deadlocked once in a CPU run
    proc = subprocess.run([*torchrun, str(SCRIPTS / 'train.py'), *args], capture_output=True, text=True,
                          timeout=PATIENCE, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'process 1 of 2' in proc.stderr and 'Token labeling:' in proc.stderr
    rows = read_summary(str(tmp_path / 'ddp'))
    assert len(rows) == 2 and rows[-1]['eval_top1'] > 30.0  # the two processes learned together


# --- fine-tuning the released-format token-labeling checkpoint ---------------------------------------------

def finetune(tmp_path, experiment: str, *extra: str) -> dict:
    """One epoch at a negligible lr from the released-format _tl fixture (10 classes, as the digits)."""
    script('train', '--data-dir', digits_folder(), '--device', 'cpu', '--output', str(tmp_path),
           '--experiment', experiment, '--model', 'rmt_t', '--official-config', SMALL_CONFIG,
           '--pretrained-path', SMALL_TL_CHECKPOINT, '--img-size', '64', '--epochs', '1', '--opt', 'adamw',
           '--lr', '1e-12', '--warmup-epochs', '0', '--workers', '1', '-b', '64', *extra)
    return load_run_checkpoint(tmp_path / experiment / 'last.pth.tar')


def released_tl_weights() -> dict:
    model = timm.create_model('rmt_t', **small_kwargs(token_label=True))
    return rmt.checkpoint_filter_fn(rmt.load_checkpoint_file(SMALL_TL_CHECKPOINT), model)


def assert_started_from_the_release(trained: dict) -> None:
    released = released_tl_weights()
    kept = [k for k in released if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert 'aux_head.weight' in kept and set(kept) <= set(trained)
    assert all(torch.allclose(trained[k].float(), released[k].float(), atol=1e-5) for k in kept)


def test_released_token_label_checkpoint_finetunes_with_token_labels(labels, tmp_path):
    saved = finetune(tmp_path, 'tl', '--token-label', '--token-label-data', labels)
    assert_started_from_the_release(saved['state_dict'])  # aux head included
    assert read_summary(str(tmp_path / 'tl'))[0]['eval_top1'] >= 0


def test_released_token_label_checkpoint_finetunes_without_token_labels(tmp_path):
    saved = finetune(tmp_path, 'plain', '--model-kwargs', 'token_label=True')  # keeps the aux head, fused logits
    assert_started_from_the_release(saved['state_dict'])
    assert saved['args'].token_label is False and saved['args'].model_kwargs['token_label'] is True


# --- the loader and start-up errors --------------------------------------------------------------------------

def first_token_label_sample(labels, reprob: float):
    """The first (image, packed target) of the token-label loader on the CPU (no prefetcher), seeded."""
    args = train.parse_args_with_config(train.build_parser(), tl_args(
        '', 'x', '--token-label', '--token-label-data', labels, '--reprob', str(reprob), '--workers', '0', '-b', '1'))
    train.setup_token_label_args(args)
    args.prefetcher, args.distributed, args.num_classes = False, False, 10
    dataset = open_dataset(args, 'train', True)
    data_config = timm.data.resolve_data_config(vars(args), model=timm.create_model('rmt_t', num_classes=10))
    loader, _ = train.create_token_label_loader(args, dataset, data_config, 'bilinear', torch.device('cpu'))
    random.seed(0)
    torch.manual_seed(0)
    images, targets = next(iter(loader))
    return images[0], targets[0]


def test_random_erasing_applies_to_token_label_images_without_the_prefetcher(labels):
    erased, target = first_token_label_sample(labels, 1.0)
    plain, same_target = first_token_label_sample(labels, 0.0)
    assert torch.equal(target, same_target)  # the same image, crop and labels
    assert erased.shape == plain.shape == (3, 32, 32)
    changed = (erased != plain).any(0)
    assert 0 < changed.float().mean() < 0.5  # one erased patch (timm's: 2 % to 1/3 of the area)


@pytest.mark.parametrize('extra, message', [
    (['--token-label'], '--token-label needs --token-label-data DIR'),
    (['--token-label-data', '.'], '--token-label-data is given without --token-label'),
    (['--token-label', '--token-label-data', 'no-such-folder'], '--token-label-data no-such-folder: no such folder'),
    (['--token-label', '--token-label-data', '.', '--no-aug'], '--no-aug cannot be combined with --token-label'),
])
def test_token_label_flag_errors_stop_the_run_at_start(tmp_path, extra, message):
    with pytest.raises(ScriptError, match=message):
        train.main(tl_args(str(tmp_path), 'bad', *extra))
    assert not os.listdir(tmp_path)


def test_token_label_size_must_be_the_models_output_grid(tmp_path):
    with pytest.raises(ScriptError, match=r'--token-label-size 7: rmt_t at 32x32 px has a 4x4 output grid'):
        train.main(tl_args(str(tmp_path / 'out'), 'bad', '--token-label', '--token-label-data', str(tmp_path),
                           '--token-label-size', '7'))


def test_label_files_of_other_classes_stop_the_run_at_start(labels, tmp_path):
    other = tmp_path / 'labels'  # the same label files, said to be written for the classes in reverse order
    other.mkdir()
    for name in os.listdir(labels):
        if name != META_FILE:
            os.symlink(os.path.join(labels, name), other / name)
    meta = read_meta(labels)
    (other / META_FILE).write_text(json.dumps(dict(meta, classes=meta['classes'][::-1])))
    with pytest.raises(ScriptError, match='label ids would name other classes'):
        train.main(tl_args(str(tmp_path / 'out'), 'bad', '--token-label', '--token-label-data', str(other)))


@pytest.mark.parametrize('variant, drop_path', [('s', 0.15), ('b', 0.4), ('l', 0.5)])
def test_token_label_configs_are_the_released_recipe(variant, drop_path):
    config = REPO / 'configs' / f'rmt_{variant}_in1k_tl.yaml'
    args = parse_args_with_config(train.build_parser(), ['--config', str(config)])
    assert (args.model, args.drop_path, args.model_ema) == (f'rmt_{variant}.in1k_tl', drop_path, True)
    assert (args.opt, args.weight_decay, args.lr_base, args.lr_base_size, args.lr_base_scale) == \
        ('adamw', 0.05, 5e-4, 512, 'linear')
    assert (args.sched, args.epochs, args.warmup_epochs, args.warmup_lr, args.min_lr, args.cooldown_epochs) == \
        ('cosine', 310, 5, 1e-6, 1e-5, 0)
    assert (args.token_label, args.token_label_size, args.cls_weight, args.dense_weight) == (True, 7, 1.0, 0.5)
    assert (args.aa, args.smoothing, args.reprob, args.crop_pct, args.img_size) == \
        ('rand-m9-mstd0.5-inc1', 0.1, 0.25, 0.96, 224)
    model = timm.create_model(args.model, device='meta')
    assert model.token_label and train.token_label_grid(args, model, (3, 224, 224)) == (7, 7)

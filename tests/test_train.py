"""scripts/train.py end to end on a real image set (scikit-learn's digits), on CPU."""
import os
import subprocess
import sys

import pytest
import timm
import torch

import rmt
from rmt.tools.cli import ScriptError, parse_args_with_config
from tests.helpers import (
    FIXTURES, PATIENCE, REPO, SCRIPTS, SMALL_CONFIG, SMOKE_CONFIG, assert_resumed_like_uninterrupted, digits_folder,
    env, kill_when_written, load_run_checkpoint, load_script, read_summary, script, session_dir, small_kwargs,
    smoke_args, smoke_run, write_digits_folder)

train = load_script('train')
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]


def test_training_reaches_high_accuracy_and_writes_timm_summary():
    rows = read_summary(smoke_run())
    assert [r['epoch'] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'eval_ema_top1', 'lr'}
    assert rows[-1]['eval_top1'] > 85.0  # 10 classes: chance is 10 %
    assert rows[-1]['train_loss'] < rows[0]['train_loss']


def test_training_logs_progress_and_a_final_summary_line():
    with open(os.path.join(smoke_run(), 'log.txt')) as f:
        log = f.read()
    assert 'img/s' in log and 'epoch ETA' in log and 'run ETA' in log
    assert 'Train: 3/3 [' in log and 'Epoch 3/3:' in log  # epochs 0..3 counted alike
    assert 'Done: rmt_t, 4 epochs in' in log and 'best top1' in log


def test_the_odd_last_batch_of_an_epoch_is_dropped_so_mixup_trains_on_even_batches():
    args = parse_args_with_config(train.build_parser(), ['--config', str(SMOKE_CONFIG)])
    assert args.mixup > 0 and 1437 % args.batch_size == 29  # the recipe's 1,437 images leave an odd last batch
    with open(os.path.join(smoke_run(), 'log.txt')) as f:
        assert f'{1437 // args.batch_size} updates each' in f.read()


def test_a_resume_with_a_new_learning_rate_follows_the_schedule_args_yaml_records(tmp_path):
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    data = write_digits_folder(str(tmp_path / 'digits'), limit=300)  # 240 training images: 7 batches of 32
    common = ['--config', SMOKE_CONFIG, '--data-dir', data, '--device', 'cpu', '--output', tmp_path,
              '--experiment', 'run', '-b', '32', '--val-split', '']
    script('train', *common, '--lr', '3e-3', '--epochs', '2')
    run_dir = tmp_path / 'run'
    script('train', *common, '--lr', '1e-2', '--epochs', '4', '--resume', run_dir / 'last.pth.tar')

    recorded = parse_args_with_config(train.build_parser(), ['--config', str(run_dir / 'args.yaml')])
    assert recorded.lr == 1e-2 and recorded.epochs == 4
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recorded.lr)
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(recorded), updates_per_epoch=7)
    expected = []
    for epoch in (2, 3):
        scheduler.step(epoch)
        expected.append(optimizer.param_groups[0]['lr'])
    logged = [row['lr'] for row in read_summary(run_dir)]
    assert logged[2:] == pytest.approx(expected, rel=1e-6)  # 0.005, 0.00146 (--lr 3e-3 would give 0.0015, 0.00044)


def test_checkpoint_holds_everything_needed_to_resume():
    state = load_run_checkpoint(os.path.join(smoke_run(), 'last.pth.tar'))
    assert state['epoch'] == 3
    assert {'state_dict', 'state_dict_ema', 'optimizer', 'lr_scheduler', 'args', 'saver'} <= set(state)
    assert state['optimizer']['state']  # AdamW moments
    assert state['args'].model_kwargs['embed_dims'] == [16, 24, 32, 48]


def test_killed_run_resumes_to_the_same_final_weights_as_an_uninterrupted_one():
    output = session_dir('killed')
    run_dir = os.path.join(output, 'killed')
    proc = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, 'train.py'), *smoke_args(output, 'killed')],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:  # kill it for real early in epoch 2, right after the epoch-1 checkpoint appears
        kill_when_written(proc, os.path.join(run_dir, 'checkpoint-1.pth.tar'))
    finally:
        proc.kill()
    assert load_run_checkpoint(os.path.join(run_dir, 'last.pth.tar'))['epoch'] < 3  # stopped before the end

    script('train', *smoke_args(output, 'killed'), '--resume', os.path.join(run_dir, 'last.pth.tar'))

    assert [r['epoch'] for r in read_summary(run_dir)] == [0, 1, 2, 3]  # no duplicated or torn rows
    assert_resumed_like_uninterrupted(run_dir, smoke_run(), epoch=3)


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    proc = script('train', *smoke_args(str(tmp_path), 'nan'), '--opt', 'sgd', '--lr', '1e30', '--warmup-epochs', '0',
                  '--epochs', '1', check=False)
    assert proc.returncode == 2
    assert 'non-finite loss' in proc.stderr and 'at epoch 0, step' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not os.path.exists(tmp_path / 'nan' / 'last.pth.tar')  # nothing saved from garbage weights


def test_missing_data_dir_fails_at_start_with_a_clear_message(tmp_path):
    missing = tmp_path / 'no-such-folder'
    with pytest.raises(ScriptError, match=f'--data-dir {missing} does not exist'):
        train.main(['--config', str(SMOKE_CONFIG), '--data-dir', str(missing), '--output', str(tmp_path)])
    assert not os.listdir(tmp_path)  # failed before creating anything


def test_data_dir_without_split_folders_fails_at_start_instead_of_mixing_splits(tmp_path):
    class_folders_only = os.path.join(digits_folder(), 'train')  # digit0/ ... digit9/, no train/ or val/
    with pytest.raises(ScriptError, match='has no "train" split: expected a sub-folder named train'):
        train.main(['--config', str(SMOKE_CONFIG), '--data-dir', class_folders_only, '--output', str(tmp_path)])


def test_class_count_mismatch_fails_at_start_with_a_clear_message(tmp_path):
    with pytest.raises(ScriptError, match='class-count mismatch: .* has 10 classes .* but the model has 7 '
                                                  'outputs; pass --num-classes 10'):
        train.main(smoke_args(str(tmp_path), 'mismatch', '--num-classes', '7'))
    assert not os.listdir(tmp_path)


def test_finetune_from_released_checkpoint_of_a_released_config_with_a_new_class_count(tmp_path):
    data = write_digits_folder(str(tmp_path / 'five-digits'), classes=range(5), limit=500)
    fixture = str(FIXTURES / 'official_small_checkpoint.pth')
    script('train', '--config', REPO / 'configs' / 'rmt_s_transfer.yaml',
           '--data-dir', data, '--device', 'cpu', '--output', str(tmp_path), '--experiment', 'ft',
           '--model', 'rmt_t', '--official-config', SMALL_CONFIG, '--pretrained', '--pretrained-path', fixture,
           '--num-classes', '5', '--img-size', '40', '--epochs', '1', '--lr', '1e-12', '--warmup-epochs', '0',
           '--workers', '0', '-b', '50')

    saved = load_run_checkpoint(tmp_path / 'ft' / 'last.pth.tar')
    trained = saved['state_dict']
    released = rmt.checkpoint_filter_fn(rmt.load_checkpoint_file(fixture), timm.create_model('rmt_t', **small_kwargs()))
    assert trained['head.fc.weight'].shape == (5, 128)  # a new 5-class classifier
    backbone = [k for k in trained if not k.startswith('head.fc.')]
    assert backbone and all(torch.allclose(trained[k].float(), released[k].float(), atol=1e-5)
                            for k in backbone if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
    assert read_summary(str(tmp_path / 'ft'))[0]['eval_top1'] >= 0  # trained and evaluated at 40 px
    # the run's arguments name the config's kwargs themselves, not the file they came from
    assert saved['args'].official_config == '' and saved['args'].model_kwargs == small_kwargs()


def test_every_config_is_made_of_train_py_flags():
    configs = REPO / 'configs'
    drop_path = {'rmt_t': 0.1, 'rmt_s': 0.15, 'rmt_b': 0.4, 'rmt_l': 0.5}
    for name in sorted(os.listdir(configs)):
        args = parse_args_with_config(train.build_parser(), ['--config', os.path.join(configs, name)])
        if name.endswith('_in1k.yaml'):  # the paper's recipe
            assert (args.opt, args.lr_base, args.lr_base_size, args.weight_decay, args.epochs, args.warmup_epochs) \
                == ('adamw', 1e-3, 1024, 0.05, 300, 5)
            assert (args.aa, args.mixup, args.cutmix, args.smoothing, args.reprob) \
                == ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25)
            assert args.drop_path == drop_path[args.model]


def test_a_recipe_run_on_the_cpu_autocasts_nothing_and_uses_no_more_workers_than_cores():
    from rmt.tools.cli import autocast_for
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    for name in sorted(os.listdir(REPO / 'configs')):  # "one process (a single GPU, or the CPU)" in the README
        args = parse_args_with_config(train.build_parser(), ['--config', str(REPO / 'configs' / name)])
        autocast, scale = autocast_for(args, torch.device('cpu'))
        with autocast():
            assert not torch.is_autocast_enabled('cpu') and not scale, name
        assert args.workers <= cores, name


def test_unknown_config_key_is_an_error(tmp_path):
    (tmp_path / 'bad.yaml').write_text('batch_sise: 8\n')
    with pytest.raises(ScriptError, match='batch_sise'):
        parse_args_with_config(train.build_parser(), ['--config', str(tmp_path / 'bad.yaml')])


def test_malformed_config_file_is_a_one_line_error_naming_the_file_and_line(tmp_path):
    (tmp_path / 'broken.yaml').write_text('model: rmt_t\nepochs: [1, 2\nlr: 0.1\n')
    with pytest.raises(ScriptError, match=r'--config .*broken\.yaml: not valid YAML at line \d+') as err:
        parse_args_with_config(train.build_parser(), ['--config', str(tmp_path / 'broken.yaml')])
    assert '\n' not in str(err.value)


def test_default_data_workers_do_not_exceed_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    assert 1 <= train.build_parser().parse_args([]).workers == min(4, cores)


def test_paper_randaugment_policy_survives_its_maximum_magnitude():
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    from rmt.tools.train_utils import allow_posterize_to_zero_bits
    augment = rand_augment_transform('rand-n8-m10-mstd0-inc1', {})  # magnitude 10 asks posterize for 0 bits
    image = Image.new('RGB', (16, 16), (200, 120, 40))
    with allow_posterize_to_zero_bits():  # what train.py trains in
        assert all(augment(image).size == (16, 16) for _ in range(40))


def test_torchrun_trains_with_distributed_data_parallel_on_cpu(tmp_path):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2']
    proc = subprocess.run([*torchrun, os.path.join(SCRIPTS, 'train.py'),
                           *smoke_args(str(tmp_path), 'ddp', '--epochs', '1', '--warmup-epochs', '0', '-b', '32',
                                       '--workers', '0')],  # no forked loader processes beside gloo's threads
                          capture_output=True, text=True, timeout=PATIENCE, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'process 1 of 2' in proc.stderr and 'process 0 of 2' in proc.stderr
    assert 'Grad strides do not match bucket view strides' not in proc.stderr
    rows = read_summary(str(tmp_path / 'ddp'))
    assert len(rows) == 1 and rows[0]['eval_top1'] > 30.0  # the two processes learned together

"""rmt.tools.train_utils: the training checkpoint saver (files, ranking, crash safety) and DDP's gradient layout."""
import os
import subprocess
import sys

import pytest
import timm
import torch

from rmt.tools.train_utils import AtomicCheckpointSaver
from tests.helpers import PATIENCE, REPO, env, load_run_checkpoint


def saver_of(folder, max_history=10, decreasing=False, **kwargs) -> AtomicCheckpointSaver:
    model = torch.nn.Linear(2, 2)
    return AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 checkpoint_dir=str(folder), max_history=max_history, decreasing=decreasing, **kwargs)


def test_saver_keeps_last_the_best_and_the_n_best_numbered_checkpoints(tmp_path):
    saver = saver_of(tmp_path, max_history=2)
    results = [saver.save_checkpoint(epoch, metric) for epoch, metric in enumerate([50., 70., 60., 65., 70.])]
    assert results == [(50., 0), (70., 1), (70., 1), (70., 1), (70., 1)]  # a tie keeps the earlier epoch
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-1.pth.tar', 'checkpoint-4.pth.tar', 'last.pth.tar',
                                            'model_best.pth.tar']
    assert load_run_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert load_run_checkpoint(tmp_path / 'last.pth.tar')['epoch'] == 4


def test_saver_ranks_a_loss_lowest_first_and_epochs_without_a_metric_newest_first(tmp_path):
    os.makedirs(tmp_path / 'loss')
    by_loss = saver_of(tmp_path / 'loss', max_history=2, decreasing=True)
    for epoch, loss in enumerate([0.5, 0.3, 0.4]):
        by_loss.save_checkpoint(epoch, loss)
    assert by_loss.history == [(1, 0.3), (2, 0.4)]
    os.makedirs(tmp_path / 'none')
    no_metric = saver_of(tmp_path / 'none', max_history=2)
    assert [no_metric.save_checkpoint(epoch) for epoch in range(3)] == [(None, None)] * 3
    assert sorted(os.listdir(tmp_path / 'none')) == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar']


def test_a_checkpoint_holds_the_run_state_and_a_resumed_saver_continues_its_ranking(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    saver = AtomicCheckpointSaver(model, optimizer, lr_scheduler=scheduler, checkpoint_dir=str(tmp_path),
                                  max_history=2)
    saver.save_checkpoint(0, 60.)
    saver.save_checkpoint(1, 70.)
    state = load_run_checkpoint(tmp_path / 'last.pth.tar')
    assert {'epoch', 'arch', 'state_dict', 'optimizer', 'lr_scheduler', 'metric', 'version', 'saver'} <= set(state)
    assert state['epoch'] == 1 and state['metric'] == 70. and state['arch'] == 'linear'

    resumed = saver_of(tmp_path, max_history=2)
    resumed.load_state_dict(state['saver'])
    assert resumed.save_checkpoint(2, 65.) == (70., 1)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar',
                                            'model_best.pth.tar']


def test_interrupted_checkpoint_write_leaves_the_previous_last_checkpoint_intact(tmp_path, monkeypatch):
    saver = saver_of(tmp_path)
    saver.save_checkpoint(0, metric=1.0)
    before = load_run_checkpoint(tmp_path / 'last.pth.tar')

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # e.g. the job being killed while writing
    monkeypatch.setattr(torch, 'save', crash_midway)
    with torch.no_grad():
        saver.model.weight.add_(1.)
    with pytest.raises(KeyboardInterrupt):
        saver.save_checkpoint(1, metric=2.0)

    after = load_run_checkpoint(tmp_path / 'last.pth.tar')
    assert after['epoch'] == 0 and torch.equal(after['state_dict']['weight'], before['state_dict']['weight'])
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert saver.state_dict() == dict(history=[[0, 1.0]], best_epoch=0, best_metric=1.0)  # as the files have it


def test_checkpoints_are_whole_copies_where_hard_links_are_not_supported(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError('hard links not supported here')
    monkeypatch.setattr(os, 'link', no_links)
    saver_of(tmp_path).save_checkpoint(0, metric=1.0)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    last = (tmp_path / 'last.pth.tar').read_bytes()
    assert (tmp_path / 'checkpoint-0.pth.tar').read_bytes() == last == (tmp_path / 'model_best.pth.tar').read_bytes()


DDP_STEP = '''
import torch, torch.distributed as dist, timm
import rmt
from rmt.tools.train_utils import distributed_data_parallel

dist.init_process_group('gloo')
torch.manual_seed(0)
model = timm.create_model('rmt_t', num_classes=10, embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1),
                          num_heads=(1, 1, 2, 2), projection=64)
ddp = distributed_data_parallel(model, torch.device('cpu'))
torch.manual_seed(1 + dist.get_rank())  # each process its own batch
ddp(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
both = [torch.empty_like(grads) for _ in range(2)]
dist.all_gather(both, grads)
assert torch.equal(both[0], both[1])  # averaged over the two batches
assert all(p.grad.stride() == p.stride() for p in model.parameters())
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_a_ddp_step_hands_depthwise_gradients_over_without_the_stride_warning(tmp_path):
    model = timm.create_model('rmt_t', depths=(1, 1, 1, 1))
    assert any(p.dim() == 4 and p.shape[1] == 1 for p in model.parameters())  # depthwise kernels, (C, 1, k, k)
    (tmp_path / 'ddp_step.py').write_text(DDP_STEP)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
                           str(tmp_path / 'ddp_step.py')], capture_output=True, text=True, timeout=PATIENCE,
                          env=dict(env(), PYTHONPATH=str(REPO)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Grad strides do not match bucket view strides' not in proc.stderr

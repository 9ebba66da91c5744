"""``scripts/bench_kernels.py``: MaSA alone along each path, and one-line errors for what cannot run."""
import pytest
import torch

from rmt.attention import kernels
from tests.helpers import load_script, one_line_error, script

bench_kernels = load_script('bench_kernels')


@pytest.mark.slow
def test_times_every_stage_along_every_path_it_was_asked_for():
    proc = script('bench_kernels', '--model', 'rmt_t', '-b', '1', '--img-size', '32', '--dtype', 'float32',
                  '--device', 'cpu', '--paths', 'sdpa,bmm')
    rows = [line.split('|')[1:-1] for line in proc.stdout.splitlines() if line.startswith('| ') and 'ms' not in line]
    cells = [[c.strip() for c in r] for r in rows if r[0].strip().isdigit()]
    assert [(c[0], c[3]) for c in cells] == [(str(s), p) for s in range(1, 5) for p in ('sdpa', 'bmm')]
    assert all(float(c[4]) > 0 and float(c[5]) > 0 for c in cells)


@pytest.mark.parametrize('args,message', [
    (['--model', 'rmt_x'], "--model 'rmt_x': unknown model, expected one of rmt_t, rmt_s, rmt_b, rmt_l"),
    (['-b', '0'], "argument -b/--batch-size: expected a positive integer, got '0'"),
    (['--img-size', '-4'], "argument --img-size: expected a positive integer, got '-4'"),
    (['--threads', 'two'], "argument --threads: expected a positive integer, got 'two'"),
    (['--paths', 'sdpa,fast'], "--paths 'sdpa,fast': unknown path(s) ['fast'], expected some of triton, bmm, "
                               "sdpa, blocked, reference"),
])
def test_wrong_arguments_end_in_one_line(capsys, args, message):
    assert one_line_error(capsys, bench_kernels.main, ['--device', 'cpu', *args]) == f'PROG: error: {message}'


def test_a_device_that_is_not_here_ends_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    assert one_line_error(capsys, bench_kernels.main, ['--device', 'cuda']) == \
        "PROG: error: argument --device: 'cuda': this machine has no CUDA device; use --device cpu"


@pytest.mark.slow
def test_the_triton_path_on_a_plain_cpu_ends_in_one_line_naming_why(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # the subprocess sees the CPU without the interpreter
    proc = script('bench_kernels', '--device', 'cpu', '--dtype', 'float32', check=False)
    reason = kernels.unsupported_reason(torch.device('cpu'), torch.float32, 16)  # no Triton, or no interpreter
    assert proc.returncode == 2 and reason is not None
    assert proc.stderr.strip().splitlines() == [
        f'bench_kernels.py: error: the triton path cannot run on cpu in float32: {reason}']

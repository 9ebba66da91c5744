"""``scripts/gpu_check.py``, the one command for a new GPU, checked at toy sizes on the CPU."""
import re

import pytest
import torch

from tests.helpers import load_script, one_line_error, script

gpu_check = load_script('gpu_check')


@pytest.mark.slow
def test_smoke_run_writes_a_report_with_every_attention_path_against_float64(tmp_path):
    report = tmp_path / 'report.md'
    proc = script('gpu_check', '--smoke', '--device', 'cpu', '--steps', 'parity', '--budget', '100000',
                  '--out', str(report))
    assert proc.stdout.splitlines()[-1] == f'wrote {report}'
    text = report.read_text()
    assert text.startswith('# GPU check') and '## parity: ok' in text
    rows = re.findall(r'^\| (\w+) \| (\d+x\d+) \| ([0-9.e+-]+) \| ([0-9.e+-]+) \|$', text, re.M)
    assert sorted((path, size) for path, size, _, _ in rows) == sorted(  # one size at smoke sizes
        (p, '64x64') for p in ('reference', 'sdpa', 'bmm', 'blocked', 'triton'))
    assert all(float(to_ref) < 1e-5 and float(to_released) < 1e-4 for _, _, to_ref, to_released in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_without_a_gpu_it_says_so_in_one_line(capsys):
    assert one_line_error(capsys, gpu_check.main, []) == (
        'PROG: error: no CUDA device here: run this on the GPU machine, or pass --smoke --device cpu to check the '
        'command')


def test_unknown_steps_end_in_one_line(capsys):
    assert one_line_error(capsys, gpu_check.main, ['--smoke', '--device', 'cpu', '--steps', 'parity,speed']) == (
        "PROG: error: --steps 'parity,speed': unknown step(s) ['speed'], expected some of selftest, tests, parity, "
        "bench224, compiled, bench1536, sweep")


def test_a_budget_that_is_not_positive_ends_in_one_line(capsys):
    assert one_line_error(capsys, gpu_check.main, ['--smoke', '--budget', '0']) == \
        "PROG: error: argument --budget: expected a finite number > 0, got '0'"

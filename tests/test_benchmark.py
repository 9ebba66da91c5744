"""scripts/benchmark.py and scripts/bench_runtimes.py: what they report (their numbers are never asserted: speed is not tested by timing)."""
import csv
import importlib.util
import re

import pytest

from tests.helpers import SMALL_CONFIG, load_script, one_line_error

benchmark = load_script('benchmark')


def test_resolution_sweep_reports_parts_and_growth_of_decomposed_stages(tmp_path, capsys):
    benchmark.main(['--models', 'rmt_t', '-b', '1', '--resolutions', '64,96x64', '--modes', 'infer',
                    '--rounds', '1', '--warmup', '0', '--no-memory', '--no-flops',
                    '--out', str(tmp_path), '--name', 'sweep'])
    out = capsys.readouterr().out
    assert '| rmt_t | 64 | ' in out and '| rmt_t | 96x64 | ' in out
    assert '| rmt_t | 64 -> 96x64 | 1.50x | ' in out  # token ratio of the two sizes
    with open(tmp_path / 'sweep.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['size'] for r in rows] == ['64', '96x64']
    parts = [float(t) for t in rows[0]['parts'].split(';')]
    assert len(parts) == 6 and all(t > 0 for t in parts)  # stem, four stages, head
    assert rows[0]['decomposed'] == 'True;True;False;False'


def _row(model, mode, img_per_s, total_mib, size='224'):
    return dict(model=model, mode=mode, size=size, img_per_s=img_per_s, ms_per_img=1000 / img_per_s,
                peak_mib=total_mib - 100, total_mib=total_mib)


def test_cpu_targets_compare_rmt_s_with_swin_t(capsys):
    swin = 'swin_tiny_patch4_window7_224'
    benchmark.print_targets([
        _row('rmt_s', 'infer', 12.0, 200.0), _row(swin, 'infer', 10.0, 200.0),
        _row('rmt_s', 'train', 3.0, 1300.0), _row(swin, 'train', 4.0, 1100.0),
    ], 'cpu')
    out = capsys.readouterr().out
    assert '| rmt_s infer images/s vs Swin-T | 1.20x | >= 1.00x | yes |' in out
    assert '| rmt_s train images/s vs Swin-T | 0.75x | >= 1.00x | NO |' in out
    assert '| rmt_s train peak memory vs Swin-T | 1.20x | <= 1.10x | NO |' in out


def test_gpu_targets_compare_with_swin_b_swin_t_and_rmt_t_at_1536(capsys):
    swin_t, swin_b = 'swin_tiny_patch4_window7_224', 'swin_base_patch4_window7_224'
    benchmark.print_targets([
        _row('rmt_s', 'train', 1000.0, 12000.0), _row(swin_b, 'train', 900.0, 19000.0),
        _row(swin_t, 'train', 2000.0, 10000.0),
        _row('rmt_s', 'infer', 20.0, 1000.0, '1536'), _row('rmt_t', 'infer', 15.0, 800.0, '1536'),
    ], 'cuda:0')
    out = capsys.readouterr().out
    assert '| rmt_s train images/s vs Swin-B | 1.11x | >= 1.00x | yes |' in out
    assert '| rmt_s train peak memory vs Swin-T | 1.20x | <= 1.30x | yes |' in out
    assert '| rmt_s train images/s vs Swin-T (equal FLOPs) | 0.50x | >= 1.00x | NO |' in out
    assert '| rmt_t infer time vs rmt_s at 1536 px | 1.33x | <= 1.20x | NO |' in out
    assert 'rmt_s infer images/s vs Swin-B' not in out  # Swin-B inference not measured


def test_targets_are_not_printed_without_both_models(capsys):
    benchmark.print_targets([_row('rmt_s', 'infer', 12.0, 100.0)], 'cuda')
    assert 'Targets' not in capsys.readouterr().out


@pytest.mark.slow
def test_runtime_benchmark_times_each_installed_route_with_parity_to_eager(capsys, one_thread):
    routes = ['eager'] + [r for r, m in (('onnxruntime', 'onnxruntime'), ('openvino', 'openvino'))
                          if importlib.util.find_spec(m)]
    bench = load_script('bench_runtimes')
    bench.main(['--models', 'rmt_t,test_convnext', '--official-config', str(SMALL_CONFIG), '--img-size', '64',
                '--runtimes', ','.join(routes), '--threads', '1', '--warmup', '0', '--rounds', '1', '--blocks', '2',
                '--profile', '3'])
    out = capsys.readouterr().out
    assert '| route | rmt_t | test_convnext | rmt_t / test_convnext speed |' in out
    for route in routes:
        name = bench.ROUTES[route][1]
        latency = re.search(rf'^\| {name} \| (\d+), (\d+) \| (\d+), (\d+) \| [\d.]+(-[\d.]+)?x \|$', out, re.M)
        assert latency, f'{name}: no row of two blocks per model and a ratio'
        diffs = re.search(rf'^\| {name} \| ([\d.e+-]+) \(\d+ s\) \| ([\d.e+-]+) \(\d+ s\) \|$', out, re.M)
        assert diffs and max(float(d) for d in diffs.groups()) < 1e-4, name
    assert 'Eager PyTorch, torch.profiler self CPU time by op' in out
    assert ('ONNX Runtime (classic export), node time by op type' in out) == ('onnxruntime' in routes)
    assert re.search(r'^\| total \| [\d.]+ \| \d+ \| [\d.]+ \| \d+ \| [+-][\d.]+ \|$', out, re.M)


def test_runtime_benchmark_refuses_an_unknown_runtime_in_one_line(capsys):
    error = one_line_error(capsys, load_script('bench_runtimes').main, ['--runtimes', 'eager,tensorrt'])
    assert 'expected runtimes among eager,onnxruntime' in error

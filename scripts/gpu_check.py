#!/usr/bin/env python
"""One command for a new GPU: correctness, accuracy, speed and the kernel sweep, written to one report.

    python scripts/gpu_check.py --out gpu_report.md    # one GPU, about 8 minutes (H100 / H200)

Steps, each a subprocess with a time limit inside the overall budget (``--budget``, seconds); the
report is rewritten after every step, so a step that runs out of time costs only its own section:

0. ``selftest``: ``python -m rmt --self-test``, every kernel configuration of ``rmt_t``..``rmt_l`` at 224 px
   and a detection size against float64 (:func:`rmt.tools.self_test.self_test`), first: if the
   kernels are wrong on this GPU, nothing after it means much.
1. ``tests``: the test files that exercise CUDA (kernels, attention paths, parity), pytest.
2. ``parity``: the released-format fixture through every attention path against the float64
   reference path on the GPU, and the released logits; ``rmt_s`` under bfloat16 autocast against
   float64 (relative error).
3. ``bench224``: ``scripts/benchmark.py``, ``rmt_s`` against Swin-T and Swin-B, bfloat16 autocast,
   inference at batch 256 and a training step at batch 128, with peak memory.
4. ``compiled``: the same three models under ``torch.compile``, without the memory runs.
5. ``bench1536``: ``rmt_t`` against ``rmt_s`` at 1536 px, batch 1, inference and training, with memory.
6. ``sweep``: ``scripts/bench_kernels.py --sweep``, MaSA alone along every path and the kernels' settings.

``--smoke`` runs every step at toy sizes (any device, CPU included), to check the command itself.
Exit code 0 when every step finished, 1 when one failed or ran out of time, 2 on a usage error.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')
TEST_FILES = ['tests/test_kernels.py', 'tests/test_attention.py', 'tests/test_parity.py']
PEERS = 'rmt_s,swin_tiny_patch4_window7_224,swin_base_patch4_window7_224'


def parse_args(argv=None):
    from rmt.tools.cli import ArgumentParser, positive_float
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='gpu_report.md', help='the report (Markdown)')
    p.add_argument('--budget', type=positive_float, default=470, help='seconds for all steps together')
    p.add_argument('--steps', default='selftest,tests,parity,bench224,compiled,bench1536,sweep')
    p.add_argument('--device', default='cuda')
    p.add_argument('--smoke', action='store_true', help='toy sizes, any device: checks the command, not the GPU')
    p.add_argument('--parity-child', action='store_true', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def steps(args):
    """(name, share of the budget, command) of every step."""
    python = sys.executable
    bench = [python, os.path.join(SCRIPTS, 'benchmark.py'), '--device', args.device, '--out',
             os.path.join(os.path.dirname(os.path.abspath(args.out)), 'gpu_check_results')]
    kernel_bench = [python, os.path.join(SCRIPTS, 'bench_kernels.py'), '--device', args.device, '--sweep']
    selftest = [python, '-m', 'rmt', '--self-test', '--device', args.device]
    if args.smoke:
        return [
            ('selftest', 0.1, selftest + ['--models', 'rmt_t', '--sizes', '32']),
            ('tests', 0.3, [python, '-m', 'pytest', '-q', '-x', 'tests/test_attention.py', '-k', 'plan']),
            ('parity', 0.2, [python, os.path.abspath(__file__), '--parity-child', '--device', args.device, '--smoke']),
            ('bench224', 0.1, bench + ['--models', 'rmt_t,resnet18', '-b', '1', '--img-size', '64', '--rounds', '1',
                                       '--warmup', '0', '--no-flops', '--name', 'smoke224']),
            ('compiled', 0.1, bench + ['--models', 'rmt_t', '-b', '1', '--img-size', '64', '--rounds', '1',
                                       '--warmup', '0', '--no-flops', '--no-memory', '--modes', 'infer',
                                       '--name', 'smoke_compiled']),
            ('bench1536', 0.1, bench + ['--models', 'rmt_t', '-b', '1', '--img-size', '96', '--rounds', '1',
                                        '--warmup', '0', '--no-flops', '--no-memory', '--name', 'smoke1536']),
            ('sweep', 0.2, kernel_bench[:-1] + ['--model', 'rmt_t', '-b', '1', '--img-size', '32', '--dtype',
                                                'float32', '--paths', 'sdpa,reference']),
        ]
    return [
        ('selftest', 0.12, selftest),
        ('tests', 0.22, [python, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *TEST_FILES]),
        ('parity', 0.08, [python, os.path.abspath(__file__), '--parity-child', '--device', args.device]),
        ('bench224', 0.17, bench + ['--models', PEERS, '--dtype', 'bfloat16', '-b', '256', '--train-batch-size', '128',
                                    '--rounds', '3', '--name', 'gpu224']),
        ('compiled', 0.28, bench + ['--models', PEERS, '--dtype', 'bfloat16', '-b', '256', '--train-batch-size',
                                    '128', '--rounds', '3', '--compile', '--no-memory', '--name', 'gpu224_compiled']),
        ('bench1536', 0.10, bench + ['--models', 'rmt_t,rmt_s', '--dtype', 'bfloat16', '-b', '1', '--img-size',
                                     '1536', '--rounds', '3', '--name', 'gpu1536']),
        ('sweep', 0.15, kernel_bench + ['--model', 'rmt_s', '-b', '128', '--dtype', 'bfloat16']),
    ]


def parity(args) -> None:
    """Print the parity and bfloat16 tables (runs in its own process)."""
    import torch
    import timm

    sys.path.insert(0, ROOT)
    from tests.helpers import load_small
    from rmt.attention import kernels
    from rmt.attention import ATTN_IMPLS
    device = torch.device(args.device)
    expected = torch.load(os.path.join(ROOT, 'tests', 'fixtures', 'official_small_expected.pt'), weights_only=True)
    model = load_small().to(device)
    print('| path | size | max abs diff vs float64 reference | vs released logits |')
    print('|---|---|---|---|')
    for size, case in list(expected.items())[:1 if args.smoke else None]:
        x = case['input'].to(device)
        model.double().set_attn_impl('reference')
        with torch.no_grad():
            want = model(x.double())
        model.float()
        for impl in [i for i in ATTN_IMPLS if i != 'auto']:
            reason = kernels.unsupported_reason(device, torch.float32, 8) if impl == 'triton' else None
            if reason:
                print(f'| {impl} | {size} | not run: {reason} | |')
                continue
            model.set_attn_impl(impl)
            with torch.no_grad():
                got = model(x)
            print(f'| {impl} | {size} | {(got.double() - want).abs().max().item():.2e} | '
                  f'{(got.cpu() - case["logits"]).abs().max().item():.2e} |', flush=True)
    name, size = ('rmt_t', 64) if args.smoke else ('rmt_s', 224)
    torch.manual_seed(0)
    model = timm.create_model(name).to(device).eval()
    x = torch.randn(2, 3, size, size, device=device)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda'):
        out = model(x)
    model.double().set_attn_impl('reference')
    with torch.no_grad():
        want = model(x.double())
    error = ((out.double() - want).norm() / want.norm()).item()
    print(f'\n{name} at {size} px, {dtype} autocast against float64: relative error {error:.2e} (limit 1.5e-2)')


def write(path: str, header: str, sections) -> None:
    with open(path + '.tmp', 'w') as f:
        f.write(header)
        for name, status, seconds, text in sections:
            f.write(f'\n## {name}: {status} ({seconds:.0f} s)\n\n```\n{text.strip()}\n```\n')
    os.replace(path + '.tmp', path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.parity_child:
        parity(args)
        return 0
    import torch
    from rmt.tools.cli import ScriptError
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ScriptError('no CUDA device here: run this on the GPU machine, or pass --smoke --device cpu to check the command')
    plan = steps(args)
    wanted = [s for s in args.steps.split(',') if s]
    unknown = sorted(set(wanted) - {name for name, _, _ in plan})
    if unknown or not wanted:
        raise ScriptError(f'--steps {args.steps!r}: unknown step(s) {unknown}, expected some of '
             f'{", ".join(name for name, _, _ in plan)}')
    plan = [s for s in plan if s[0] in wanted]
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else args.device
    header = (f'# GPU check\n\n{time.strftime("%Y-%m-%d %H:%M")}, {gpu}, torch {torch.__version__}, '
              f'{_triton_version()}{", smoke sizes" if args.smoke else ""}\n')
    start, sections, ok = time.time(), [], True
    share = sum(s for _, s, _ in plan)
    for name, part, cmd in plan:
        left = args.budget - (time.time() - start)
        limit = max(10.0, min(left, args.budget * part / share + max(0.0, left - args.budget * part / share) / 2))
        t = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            status = 'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'
            text = proc.stdout[-20000:] + ('\n' + proc.stderr[-4000:] if proc.returncode else '')
        except subprocess.TimeoutExpired as e:
            status, text = f'TIMED OUT after {limit:.0f} s', (e.stdout or b'').decode(errors='replace')[-20000:] \
                if isinstance(e.stdout, bytes) else (e.stdout or '')[-20000:]
        ok &= status == 'ok'
        sections.append((name, status, time.time() - t, text))
        write(args.out, header, sections)
        print(f'{name}: {status} ({time.time() - t:.0f} s)', flush=True)
    print(f'wrote {args.out}')
    return 0 if ok else 1


def _triton_version() -> str:
    try:
        import triton
        return f'triton {triton.__version__}'
    except ImportError:
        return 'no triton'


if __name__ == '__main__':
    from rmt.tools.cli import run_main
    sys.exit(run_main(main))

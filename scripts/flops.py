#!/usr/bin/env python3
"""Parameters and FLOPs (fvcore) of RMT variants, beside the released code's and the paper's figures.

    python scripts/flops.py                                  # the four variants at 224 px (table)
    python scripts/flops.py --models rmt_t --size 512 512 --impl reference
    python scripts/flops.py --models rmt_s --per-module      # fvcore's per-module table as well
    python scripts/flops.py --cross-check                    # also trace the explicit-matmul attention

FLOPs are multiply-adds counted by fvcore as for the released code (convs, linears, norms and the
attention matmuls; elementwise ops not counted). Fused attention is counted as the two matmuls it
replaces, so every attention path (``--impl``) gives the same count.
"""
import argparse
import importlib.util
import time
import warnings

import timm

import rmt
from rmt.tools.cli import ArgumentParser, ScriptError, model_name, non_negative_int, positive_int, run_main
from rmt.flops import count_flops

warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)

# fvcore's FlopCountAnalysis on the released code at 224 px (GFLOPs), the paper's table (GFLOPs), params
RELEASED_GFLOPS = {'rmt_t': 2.65, 'rmt_s': 4.80, 'rmt_b': 10.41, 'rmt_l': 19.55}
PAPER_GFLOPS = {'rmt_t': 2.5, 'rmt_s': 4.5, 'rmt_b': 9.7, 'rmt_l': 18.2}
RELEASED_PARAMS = {'rmt_t': 14_334_216, 'rmt_s': 26_967_240, 'rmt_b': 54_154_896, 'rmt_l': 95_464_864}


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', type=model_name, default=list(RELEASED_GFLOPS), help='timm model names')
    parser.add_argument('--size', nargs=2, type=positive_int, default=(224, 224), metavar=('H', 'W'),
                        help='input size')
    parser.add_argument('--impl', default='auto', choices=rmt.ATTN_IMPLS, help='attention path to trace')
    parser.add_argument('--cross-check', action='store_true',
                        help="also count with the 'reference' attention (explicit matmuls, as the released code)")
    parser.add_argument('--per-module', action='store_true', help="also print fvcore's per-module table")
    parser.add_argument('--max-depth', type=non_negative_int, default=2, help='depth of the per-module table')
    args = parser.parse_args(argv)
    if importlib.util.find_spec('fvcore') is None:
        raise ScriptError('counting FLOPs needs fvcore: pip install fvcore')
    if args.impl != 'auto' or args.cross_check:
        other = [m for m in args.models if not isinstance(timm.create_model(m, device='meta'), rmt.RMT)]
        if other:
            flag = f'--impl {args.impl}' if args.impl != 'auto' else '--cross-check'
            raise ScriptError(f'{flag}: {", ".join(other)} has no RMT attention paths to choose; leave the flag out '
                              f'for non-RMT models')

    at_224 = tuple(args.size) == (224, 224)
    print(f'input 3x{args.size[0]}x{args.size[1]}, batch 1, attention path {args.impl!r}; '
          f'fvcore counts one multiply-add as one FLOP\n')
    columns = ['model', 'params']
    if at_224:
        columns.append('released params')
    columns.append('GFLOPs (ours)')
    if args.cross_check:
        columns.append("GFLOPs ('reference' attention)")
    if at_224:
        columns += ['released code, fvcore', 'difference', 'paper']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    tables = []
    for name in args.models:
        model = timm.create_model(name)
        if isinstance(model, rmt.RMT):
            model.set_attn_impl(args.impl)
        start = time.perf_counter()
        params, flops, table = count_flops(model, (3, *args.size), max_depth=args.max_depth)
        elapsed = time.perf_counter() - start
        row = [name, f'{params:,}']
        if at_224:
            row.append(f'{RELEASED_PARAMS[name]:,}' if name in RELEASED_PARAMS else '')
        row.append(f'{flops / 1e9:.3f}')
        if args.cross_check:
            model.set_attn_impl('reference')
            row.append(f'{count_flops(model, (3, *args.size)).flops / 1e9:.3f}')
        if at_224:
            if name in RELEASED_GFLOPS:
                diff = 100 * (flops / 1e9 / RELEASED_GFLOPS[name] - 1)
                row += [f'{RELEASED_GFLOPS[name]:.2f}', f'{diff:+.2f}%', f'{PAPER_GFLOPS[name]:.1f}']
            else:
                row += ['', '', '']
        print('| ' + ' | '.join(row) + ' |', flush=True)
        tables.append((name, table, elapsed))
    if args.per_module:
        for name, table, elapsed in tables:
            print(f'\n{name} (traced in {elapsed:.1f} s)\n{table}')


if __name__ == '__main__':
    run_main(main)

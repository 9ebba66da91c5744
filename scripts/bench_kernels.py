#!/usr/bin/env python
"""MaSA attention alone, path against path, at the shapes of a model's stages.

    python scripts/bench_kernels.py --model rmt_s -b 128 --dtype bfloat16
    python scripts/bench_kernels.py --model rmt_t --img-size 1536 -b 1 --sweep
    python scripts/bench_kernels.py --model rmt_s -b 8 --dtype float32 --device cpu --threads 2 --paths sdpa,bmm,reference
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --model rmt_t --img-size 64 -b 2 --dtype float32 --device cpu \
        --threads 2 --paths triton,sdpa --verify-cost

Times, for every stage, MaSA's pipeline from its raw projections (q, k, v and the LCE output) to the
tensor ``proj`` reads (:func:`rmt.attention.masa_attention`, what the model runs): the theta shift, the
decayed attention and the LCE add, along each path asked for. Forward alone and forward + backward,
medians of CUDA-event timings (``triton.testing.do_bench``) on a GPU, of wall-clock timings on the
CPU. The floor column is the time to move the op's inputs and output through memory once at the
measured copy bandwidth; ``--sweep`` also times the Triton kernels' tile, block and warp settings
(:class:`rmt.attention.kernels.KernelConfig`). ``--verify-cost`` also times the Triton path with every
call checked against the exact path (``RMT_VERIFY_KERNELS=always``): the extra time is what the first
call of each configuration costs once per process (:mod:`rmt.attention.verify`).

A path that cannot run here ends the script with one line and exit code 2 (e.g. ``triton`` on a CPU
without ``TRITON_INTERPRET=1``).
"""
import itertools
import math
import statistics
import sys
import time

import torch

from rmt.attention import kernels
from rmt.attention import ATTN_IMPLS, AttentionPlan, kernel_failures, masa_attention, set_kernel_verification
from rmt.tools.cli import ArgumentParser, ScriptError, available_device, positive_int, run_main
from rmt.model import MODEL_ARGS
from rmt.position import RelPos

PATHS = [p for p in ATTN_IMPLS if p != 'auto']


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='rmt_s', help=f'one of {", ".join(MODEL_ARGS)}')
    p.add_argument('-b', '--batch-size', type=positive_int, default=128)
    p.add_argument('--img-size', type=positive_int, default=224)
    p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--paths', default='triton,sdpa,reference', help=f'comma-separated, from {", ".join(PATHS)}')
    p.add_argument('--sweep', action='store_true', help='also time the Triton tile/block/warp settings')
    p.add_argument('--verify-cost', action='store_true', help='also time the Triton path with its check against the '
                                                              'exact path (the first call\'s extra cost)')
    p.add_argument('--device', type=available_device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=positive_int, default=None, help='torch CPU threads')
    return p.parse_args(argv)


def check_args(args):
    """A :class:`~rmt.tools.cli.ScriptError` (one line, exit 2) for what cannot run as asked."""
    if args.model not in MODEL_ARGS:
        raise ScriptError(f'--model {args.model!r}: unknown model, expected one of {", ".join(MODEL_ARGS)}')
    paths = [p for p in args.paths.split(',') if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ScriptError(f'--paths {args.paths!r}: unknown path(s) {unknown}, expected some of {", ".join(PATHS)}')
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if 'triton' in paths or args.sweep:
        heads = MODEL_ARGS[args.model]
        for dim, n in zip(heads['embed_dims'], heads['num_heads']):
            reason = kernels.unsupported_reason(device, dtype, dim // n)
            if reason:
                raise ScriptError(f'the triton path cannot run on {args.device} in {args.dtype}: {reason}')
    return paths, device, dtype


def bench(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn``."""
    if device.type == 'cuda':
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy, counting bytes read and written."""
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / (bench(lambda: y.copy_(x), device) / 1000)


def stage_shapes(model: str, size: int):
    """(stage, H, W, C, heads, decomposed, decay settings) of every stage of ``model`` at ``size`` px."""
    args = MODEL_ARGS[model]
    side = math.ceil(math.ceil(size / 2) / 2)
    for i, (dim, n, decomposed, heads_range) in enumerate(
            zip(args['embed_dims'], args['num_heads'], args['decomposed'], args['heads_ranges'])):
        side = math.ceil(side / 2) if i else side
        yield i + 1, side, side, dim, n, decomposed, RelPos(dim, n, 2, heads_range)


def timed(path, q, k, v, lce, grad, relpos, n, decomposed, device, config=None):
    """(forward ms, forward + backward ms) of the MaSA pipeline along ``path``."""
    H, W = q.shape[1:3]
    plan = AttentionPlan(path, torch.float32 if path == 'triton' else q.dtype, not decomposed and path != 'blocked'
                         and path != 'triton')
    tables = relpos.build([H, W], q.device, plan.table_dtype, plan.needs_full_bias)

    def step():
        return masa_attention(q, k, v, lce * 1, tables, plan, n, decomposed, kernel_config=config)[0]

    def fwd():
        with torch.no_grad():
            step()

    def fwd_bwd():
        torch.autograd.grad(step(), (q, k, v, lce), grad)
    failures = len(kernel_failures())
    times = bench(fwd, device), bench(fwd_bwd, device)
    if len(kernel_failures()) > failures:  # the op fell back to sdpa: these are not the kernels' times
        raise RuntimeError(list(kernel_failures().values())[-1])
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    paths, device, dtype = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth(device)
    name = f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''
    print(f'{args.model} at {args.img_size} px, batch {args.batch_size}, {args.dtype}, device {device}{name}; '
          f'copy bandwidth {bandwidth / 1e12:.2f} TB/s')
    print('\n| stage | tokens | form | path | fwd ms | fwd+bwd ms | fwd floor ms | fwd vs sdpa |')
    print('|---|---|---|---|---|---|---|---|')
    sweep_rows, verify_rows = [], []
    previous = set_kernel_verification('off')  # the kernels alone (checked below with --verify-cost)
    for stage, H, W, C, n, decomposed, relpos in stage_shapes(args.model, args.img_size):
        g = torch.Generator(device=device).manual_seed(stage)
        q, k, v, lce = [torch.randn(args.batch_size, H, W, C, device=device, generator=g).to(dtype).requires_grad_()
                        for _ in range(4)]
        grad = torch.randn_like(q)
        form = 'decomposed' if decomposed else 'full'
        floor = 5 * q.numel() * q.element_size() / bandwidth * 1000
        times = {}
        for path in paths:
            try:
                times[path] = timed(path, q, k, v, lce, grad, relpos, n, decomposed, device)
            except torch.OutOfMemoryError:  # e.g. the 2-D bias of a large full-attention stage
                print(f'| {stage} | {H}x{W} | {form} | {path} | out of memory |||')
            except RuntimeError as e:  # a kernel failed and the op fell back (warned once)
                print(f'| {stage} | {H}x{W} | {form} | {path} | failed: {str(e)[:80]} |||')
        for path, (fwd_ms, both_ms) in times.items():
            ratio = times['sdpa'][0] / fwd_ms if 'sdpa' in times else float('nan')
            print(f'| {stage} | {H}x{W} | {form} | {path} | {fwd_ms:.3f} | {both_ms:.3f} | {floor:.3f} | '
                  f'{ratio:.2f}x |', flush=True)
        if args.sweep:
            sweep_rows += sweep(q, k, v, lce, grad, relpos, n, decomposed, device)
        if args.verify_cost and 'triton' in times:
            set_kernel_verification('always')
            fwd_ms, both_ms = timed('triton', q, k, v, lce, grad, relpos, n, decomposed, device)
            set_kernel_verification('off')
            verify_rows.append((stage, f'{H}x{W}', form, f'{fwd_ms - times["triton"][0]:.3f}',
                                f'{both_ms - times["triton"][1]:.3f}', f'{both_ms / times["triton"][1]:.2f}x'))
    set_kernel_verification(previous)
    if verify_rows:
        print('\n| stage | tokens | form | check: extra fwd ms | extra fwd+bwd ms | checked / unchecked fwd+bwd |')
        print('|---|---|---|---|---|---|')
        for row in verify_rows:
            print('| ' + ' | '.join(str(c) for c in row) + ' |')
    if sweep_rows:
        print('\n| stage | tile | block_m | block_n | warps | fwd ms | fwd+bwd ms |')
        print('|---|---|---|---|---|---|---|')
        for row in sweep_rows:
            print('| ' + ' | '.join(str(c) for c in row) + ' |')
    return 0


def sweep(q, k, v, lce, grad, relpos, n, decomposed, device):
    """Times of the Triton path over its settings, passed to the pipeline as a KernelConfig."""
    H, W = q.shape[1:3]
    default = kernels.default_config(q.shape[-1] // n, q.dtype, kernels.target_arch(q.device))
    if any(kernels.looped(mode, (1, H, W), default) for mode in kernels.pass_modes(2, decomposed)):
        grid = [default._replace(block_m=m, block_n=nb, num_warps=w, bwd_warps=w)
                for m, nb, w in itertools.product([64, 128], [32, 64], [4, 8])]
    else:
        grid = [default._replace(tile=t, num_warps=w) for t, w in itertools.product([32, 64, 128], [2, 4, 8])]
    rows = []
    for config in grid:
        try:
            fwd, both = [f'{t:.3f}' for t in timed('triton', q, k, v, lce, grad, relpos, n, decomposed, device,
                                                   config)]
        except Exception as e:  # noqa: BLE001 (a setting the compiler rejects, e.g. out of resources)
            fwd = both = f'failed ({type(e).__name__})'
        rows.append((f'{H}x{W}', config.tile, config.block_m, config.block_n, config.num_warps, fwd, both))
        print(f'  sweep {rows[-1]}', flush=True)
    return rows


if __name__ == '__main__':
    sys.exit(run_main(main))

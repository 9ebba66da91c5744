#!/usr/bin/env python
"""MaSA attention alone, path against path, at the shapes of a model's stages.

    python scripts/bench_kernels.py --model rmt_s -b 128 --dtype bfloat16
    python scripts/bench_kernels.py --model rmt_t --img-size 1536 -b 1 --sweep

Times, for every stage, the step from MaSA's raw projections (q, k, v and the LCE output) to the
tensor ``proj`` reads: the theta shift, the decayed attention and the LCE add. ``triton`` is the fused
kernels; the other paths run the reference formula for the shift and their attention kernel. Forward
alone and forward + backward, medians of CUDA-event timings (``triton.testing.do_bench``). The floor
column is the time to move the op's inputs and output through memory once at the measured copy
bandwidth; ``--sweep`` also times the kernels' tile, block and warp settings.
"""
import argparse
import itertools
import statistics
import time

import timm
import torch

from rmt import kernels
from rmt.attention import decomposed_attention, full_attention
from rmt.decay import theta_shift


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='rmt_s')
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--paths', default='triton,sdpa,reference')
    p.add_argument('--sweep', action='store_true', help='also time the Triton tile/block/warp settings')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p.parse_args(argv)


def bench(fn, device: str) -> float:
    """Median milliseconds of ``fn``."""
    if device.startswith('cuda'):
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device copy, counting bytes read and written."""
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / (bench(lambda: y.copy_(x), device) / 1000)


def masa_step(path: str, stage, tables, q, k, v, lce):
    """MaSA from the raw projections to ``proj``'s input along ``path``."""
    attn = stage.blocks[0].attn
    if path == 'triton':
        return kernels.masa_attention(q, k, v, lce, tables.rotation, tables.decay, attn.scale, attn.num_heads,
                                      attn.decomposed)
    B, H, W, C = q.shape
    shape = (B, H, W, attn.num_heads, attn.head_dim)
    qr, kr = theta_shift(q.view(shape), tables), theta_shift(k.view(shape), tables)
    attend = decomposed_attention if attn.decomposed else full_attention
    return lce.view(shape).add(attend(qr, kr, v.view(shape), tables, attn.scale, path)).flatten(-2)


def stage_inputs(model, args):
    """(stage, H, W, C) of every stage at the run's image size."""
    size = args.img_size // 4
    out = []
    for stage in model.stages:
        if not isinstance(stage.downsample, torch.nn.Identity):
            size = (size + 1) // 2
        out.append((stage, size, size, stage.blocks[0].attn.q.in_features))
    return out


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = timm.create_model(args.model).to(args.device)
    bandwidth = copy_bandwidth(args.device)
    print(f'{args.model} at {args.img_size} px, batch {args.batch_size}, {args.dtype}, device {args.device}'
          f'{" (" + torch.cuda.get_device_name() + ")" if args.device.startswith("cuda") else ""}; '
          f'copy bandwidth {bandwidth / 1e12:.2f} TB/s')
    print('\n| stage | tokens | form | path | fwd ms | fwd+bwd ms | fwd floor ms | fwd vs sdpa |')
    print('|---|---|---|---|---|---|---|---|')
    sweep_rows = []
    for i, (stage, H, W, C) in enumerate(stage_inputs(model, args)):
        g = torch.Generator(device=args.device).manual_seed(i)
        q, k, v, lce = [torch.randn(args.batch_size, H, W, C, device=args.device, generator=g).to(dtype)
                        .requires_grad_() for _ in range(4)]
        grad = torch.randn_like(q)
        form = 'decomposed' if stage.decomposed else 'full'
        floor = 5 * q.numel() * q.element_size() / bandwidth * 1000
        times = {}
        for path in args.paths.split(','):
            table_dtype = torch.float32 if path == 'triton' else dtype
            tables = stage.decay.build(H, W, q.device, table_dtype, path != 'triton' and not stage.decomposed)

            def fwd():
                with torch.no_grad():
                    masa_step(path, stage, tables, q, k, v, lce)

            def fwd_bwd():
                torch.autograd.grad(masa_step(path, stage, tables, q, k, v, lce), (q, k, v, lce), grad)
            try:
                times[path] = (bench(fwd, args.device), bench(fwd_bwd, args.device))
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. a mask too large for the device
                print(f'| {i + 1} | {H}x{W} | {form} | {path} | failed: {str(e).splitlines()[0][:80]} |')
        for path, (fwd_ms, both_ms) in times.items():
            ratio = times['sdpa'][0] / fwd_ms if 'sdpa' in times else float('nan')
            print(f'| {i + 1} | {H}x{W} | {form} | {path} | {fwd_ms:.3f} | {both_ms:.3f} | {floor:.3f} | '
                  f'{ratio:.2f}x |', flush=True)
        if args.sweep and 'triton' in args.paths:
            sweep_rows += sweep(stage, H, W, q, k, v, lce, grad, args)
    if sweep_rows:
        print('\n| stage | tile | block_m | block_n | warps | fwd ms | fwd+bwd ms |')
        print('|---|---|---|---|---|---|---|')
        for row in sweep_rows:
            print('| ' + ' | '.join(str(c) for c in row) + ' |')


def sweep(stage, H, W, q, k, v, lce, grad, args):
    """Times of the Triton path over its settings (module constants of rmt.kernels)."""
    tables = stage.decay.build(H, W, q.device, torch.float32, False)
    saved = kernels.TILE, kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS
    looped = (max(H, W) if stage.decomposed else H * W) > kernels.TILE
    grid = itertools.product([64], [64, 128], [32, 64], [4, 8]) if looped else \
        itertools.product([32, 64, 128], [64], [64], [2, 4, 8])
    rows = []
    try:
        for tile, block_m, block_n, warps in grid:
            kernels.TILE, kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS = tile, block_m, block_n, warps
            try:
                fwd = bench(lambda: masa_step('triton', stage, tables, q.detach(), k.detach(), v.detach(),
                                              lce.detach()), args.device)
                both = bench(lambda: torch.autograd.grad(masa_step('triton', stage, tables, q, k, v, lce),
                                                         (q, k, v, lce), grad), args.device)
            except Exception as e:  # noqa: BLE001 (a setting the compiler rejects, e.g. out of resources)
                fwd = both = f'failed ({type(e).__name__})'
            rows.append((f'{H}x{W}', tile, block_m, block_n, warps,
                         f'{fwd:.3f}' if isinstance(fwd, float) else fwd,
                         f'{both:.3f}' if isinstance(both, float) else both))
            print(f'  sweep {rows[-1]}', flush=True)
    finally:
        kernels.TILE, kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS = saved
    return rows


if __name__ == '__main__':
    main()

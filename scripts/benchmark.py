#!/usr/bin/env python
"""Throughput and memory of RMT and timm peers, measured side by side in one run.

    python scripts/benchmark.py --models rmt_s,swin_tiny_patch4_window7_224,convnext_tiny -b 8 --threads 2
    python scripts/benchmark.py --models rmt_t,rmt_s --resolutions 224,512,1024,1536 -b 1 --modes infer

Timing rounds interleave the models (round r times every model once) so slow drift of the machine
hits all of them alike; the table reports medians. Peak memory is measured for each model and mode
in a fresh subprocess (CUDA: max allocated; CPU: peak RSS, VmHWM, minus the RSS before the first
forward, and in total). Achieved GFLOP/s are forward FLOPs counted by ``torch.utils.flop_counter``
(2 per multiply-add, attention included; a training step counts 3x forward) over time, also as a
fraction of the device's measured matmul peak in the dtype the run computes in (bf16/fp16 under
autocast, else fp32). (These are not ``rmt.flops.count_flops``'s fvcore counts, which take one
multiply-add as one FLOP, as the paper's tables do.)

For RMT models in inference, a second table splits the time per image into stem, stages and head
(medians over the same rounds, timed with module hooks), and a sweep over sizes shows how the time of the
decomposed stages grows against their token count. When a target's models are in the run (``rmt_s``
against Swin-T/Swin-B at 224 px, ``rmt_t`` against ``rmt_s`` at 1536 px), it is printed as met or not.

A model given as ``name@impl`` (``rmt_s@sdpa``) runs with that attention path, to compare paths in one run.
``--features-only`` measures RMT models as detection backbones (``features_only=True, feature_norm=True``;
a training step back-propagates the mean of each stage output).
"""
import argparse
import csv
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Dict, List, Tuple

import torch

import timm

import rmt
from rmt.tools.cli import (
    ArgumentParser, available_device, default_device, model_name, non_negative_int, positive_int, run_main)


def model_specs(text: str) -> List[str]:
    """``--models``: comma-separated timm names, an RMT one optionally as ``name@impl`` (an attention path)."""
    specs = [m.strip() for m in text.split(',') if m.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f'expected model names separated by commas, got {text!r}')
    for spec in specs:
        name, at, impl = spec.partition('@')
        model_name(name)
        if at and impl not in rmt.ATTN_IMPLS:
            raise argparse.ArgumentTypeError(f'{spec!r}: attention path {impl!r} is not one of '
                                             f'{", ".join(rmt.ATTN_IMPLS)}')
        if at and not isinstance(timm.create_model(name, device='meta'), rmt.RMT):
            raise argparse.ArgumentTypeError(f'{spec!r}: only RMT models have attention paths to choose')
    return specs


def mode_list(text: str) -> List[str]:
    modes = [m.strip() for m in text.split(',') if m.strip()]
    if not modes or any(m not in ('infer', 'train') for m in modes):
        raise argparse.ArgumentTypeError(f'expected infer, train or infer,train, got {text!r}')
    return modes


def size_list(text: str) -> List[Tuple[int, int]]:
    """Comma-separated sizes, each N (N x N) or HxW."""
    try:
        sizes = [parse_size(s.strip()) for s in str(text).split(',') if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(min(s) for s in sizes) < 1:
        raise argparse.ArgumentTypeError(f'expected sizes N or HxW (positive, comma-separated, e.g. 224,800x1344), '
                                         f'got {text!r}')
    return sizes


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', type=model_specs, default='rmt_s,swin_tiny_patch4_window7_224,convnext_tiny',
                   help='comma list of timm model names; name@impl runs an RMT model on that attention path')
    p.add_argument('--modes', type=mode_list, default='infer,train', help='comma list of infer, train')
    p.add_argument('-b', '--batch-size', type=positive_int, default=8)
    p.add_argument('--train-batch-size', type=positive_int, default=None,
                   help='batch of training steps (default: -b)')
    p.add_argument('--img-size', type=size_list, default='224', help='N for N x N, or HxW')
    p.add_argument('--resolutions', type=size_list, default=None,
                   help='comma list of sizes (N or HxW); overrides --img-size')
    p.add_argument('--device', type=available_device, default=default_device())
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'],
                   help='autocast dtype (float32: no autocast)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile each model')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--features-only', action='store_true',
                   help='RMT models as detection backbones (features_only, feature_norm=True)')
    p.add_argument('--threads', type=positive_int, default=None, help='torch CPU threads')
    p.add_argument('--warmup', type=non_negative_int, default=2)
    p.add_argument('--rounds', type=positive_int, default=5)
    p.add_argument('--no-memory', action='store_true', help='skip the per-model memory subprocesses')
    p.add_argument('--no-flops', action='store_true')
    p.add_argument('--profile', type=non_negative_int, default=0, metavar='N',
                   help='after timing, profile one step of each model and print its N costliest operators')
    p.add_argument('--out', default='output/benchmarks', help='folder for the CSV and JSON')
    p.add_argument('--name', default=None, help='file stem for the CSV/JSON (default: a timestamp)')
    p.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_size(text: str):
    h, _, w = str(text).partition('x')
    return int(h), int(w or h)


def size_name(size) -> str:
    return str(size[0]) if size[0] == size[1] else f'{size[0]}x{size[1]}'


def build(spec: str, args, size):
    name, _, impl = spec.partition('@')
    features = dict(features_only=True, feature_norm=True) if args.features_only else {}
    try:  # fixed-size peers (Swin, ViT) must be told the size they run at
        model = timm.create_model(name, img_size=size) if not name.startswith('rmt_') else \
            timm.create_model(name, **features)
    except TypeError:
        model = timm.create_model(name)
    if impl:
        model.set_attn_impl(impl)
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def model_and_input(spec: str, args, mode: str, size):
    """The model of ``spec`` (seeded, on the device) and a random batch for ``mode`` at ``size``."""
    torch.manual_seed(0)
    model = build(spec, args, size)
    x = torch.randn(batch_size(args, mode), 3, *size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def make_step(model, args, mode: str, x: torch.Tensor):
    autocast = torch.autocast(args.device.split(':')[0], dtype=getattr(torch, args.dtype)) \
        if args.dtype != 'float32' else nullcontext()
    fn = torch.compile(model) if args.compile else model
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                fn(x)
        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step():
        with autocast:
            out = fn(x)
            loss = sum(f.float().mean() for f in out) if isinstance(out, list) else \
                torch.nn.functional.cross_entropy(out, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def batch_size(args, mode: str) -> int:
    return args.train_batch_size or args.batch_size if mode == 'train' else args.batch_size


def sync(device: str):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def rss_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def memory_child(spec: str, args) -> None:
    """Run a few steps of one model in this fresh process and print its peak memory as JSON."""
    name, mode, size = spec.split('|')
    size = parse_size(size)
    model, x = model_and_input(name, args, mode, size)
    step = make_step(model, args, mode, x)
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2 if mode == 'train' else 1):
            step()
        sync(args.device)
        peak, total = torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_allocated()
    else:
        base = rss_kib('VmRSS')
        for _ in range(2 if mode == 'train' else 1):  # a training step's second pass has the optimizer state
            step()
        total = rss_kib('VmHWM') * 1024
        peak = total - base * 1024
    print(json.dumps(dict(peak=peak, total=total)))


def measure_memory(name: str, mode: str, size, args) -> Dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', f'{name}|{mode}|{size_name(size)}',
           '--device', args.device, '--dtype', args.dtype, '-b', str(args.batch_size),
           '--train-batch-size', str(batch_size(args, 'train'))]
    for flag in ('channels_last', 'compile', 'grad_checkpointing', 'features_only'):
        if getattr(args, flag):
            cmd.append('--' + flag.replace('_', '-'))
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f'  memory run of {name} {mode} {size}px failed:\n{out.stderr[-2000:]}', file=sys.stderr)
        return dict(peak=float('nan'), total=float('nan'))
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_flops(model, args, mode: str, size) -> float:
    """FLOPs of one step by ``torch.utils.flop_counter`` (2 per multiply-add): the forward of one batch, or
    3x that for a training step (forward, and backward at twice that).

    (torch's counter overstates depthwise-conv backward, so the backward is not counted directly.)
    """
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, *size, device=args.device)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() * batch_size(args, mode) * (3 if mode == 'train' else 1)


class PartTimer:
    """Times an RMT model's stem, each stage and its head with module hooks, during the timed rounds."""

    def __init__(self, model, device: str):
        self.parts = [model.stem, *model.stages, model.head]
        self.times: List[List[float]] = [[] for _ in self.parts]
        self.device = device
        self._start: Dict[int, float] = {}
        self.handles = []

    def attach(self) -> None:
        for i, part in enumerate(self.parts):
            self.handles += [part.register_forward_pre_hook(functools.partial(self._pre, i)),
                             part.register_forward_hook(functools.partial(self._post, i))]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, i: int, _module, _inputs) -> None:
        sync(self.device)
        self._start[i] = time.perf_counter()

    def _post(self, i: int, _module, _inputs, _output) -> None:
        sync(self.device)
        self.times[i].append(time.perf_counter() - self._start[i])

    def medians(self) -> List[float]:
        return [statistics.median(t) for t in self.times]


def print_parts(rows: List[Dict]) -> None:
    rows = [r for r in rows if r.get('parts')]
    if not rows:
        return
    stages = len(rows[0]['parts']) - 2
    print('\nTime per image by part (ms; d = decomposed stage, f = full attention):\n')
    print('| model | size | stem | ' + ' | '.join(f'stage {i + 1}' for i in range(stages)) + ' | head |')
    print('|---|---|---|' + '---|' * stages + '---|')
    for r in rows:
        kinds = r['decomposed']
        cells = [f"{t:.1f}" for t in r['parts']]
        cells[1:-1] = [f"{c} ({'d' if kinds[i] else 'f'})" for i, c in enumerate(cells[1:-1])]
        print(f"| {r['model']} | {r['size']} | " + ' | '.join(cells) + ' |')
    by_model: Dict[str, List[Dict]] = {}
    for r in rows:
        by_model.setdefault(r['model'], []).append(r)
    growth = [(m, a, b) for m, rs in by_model.items() for a, b in zip(rs, rs[1:])]
    if not growth:
        return
    print('\nGrowth between sizes (time per image; the decomposed stages against their token count):\n')
    print('| model | sizes | tokens | decomposed stages time | full-attention stages time | whole model time |')
    print('|---|---|---|---|---|---|')
    for m, a, b in growth:
        tokens = b['pixels'] / a['pixels']
        dec = [sum(t for t, d in zip(r['parts'][1:-1], r['decomposed']) if d) for r in (a, b)]
        full = [sum(t for t, d in zip(r['parts'][1:-1], r['decomposed']) if not d) for r in (a, b)]
        verdict = 'within' if dec[1] / dec[0] <= tokens else 'faster than tokens'
        print(f"| {m} | {a['size']} -> {b['size']} | {tokens:.2f}x | {dec[1] / dec[0]:.2f}x ({verdict}) | "
              f"{full[1] / full[0]:.2f}x | {b['ms_per_img'] / a['ms_per_img']:.2f}x |")


SWIN_T, SWIN_B = 'swin_tiny_patch4_window7_224', 'swin_base_patch4_window7_224'
# (what, model, peer, mode, size, metric, bound) per device type: the ratio model / peer of ``metric``
# must reach the bound for images/s and stay within it for time and memory.
TARGETS = {
    'cpu': [  # fp32, batch 8, 2 threads
        ('rmt_s infer images/s vs Swin-T', 'rmt_s', SWIN_T, 'infer', '224', 'img_per_s', 1.0),
        ('rmt_s train images/s vs Swin-T', 'rmt_s', SWIN_T, 'train', '224', 'img_per_s', 1.0),
        ('rmt_s train peak memory vs Swin-T', 'rmt_s', SWIN_T, 'train', '224', 'peak_mib', 1.1),
    ],
    'cuda': [  # bf16 autocast, batch 256 inference and 128 training at 224 px; batch 1 at 1536 px
        ('rmt_s infer images/s vs Swin-B', 'rmt_s', SWIN_B, 'infer', '224', 'img_per_s', 1.0),
        ('rmt_s train images/s vs Swin-B', 'rmt_s', SWIN_B, 'train', '224', 'img_per_s', 1.0),
        ('rmt_s train peak memory vs Swin-T', 'rmt_s', SWIN_T, 'train', '224', 'total_mib', 1.3),
        ('rmt_t infer time vs rmt_s at 1536 px', 'rmt_t', 'rmt_s', 'infer', '1536', 'ms_per_img', 1.2),
        ('rmt_t train peak memory vs rmt_s at 1536 px', 'rmt_t', 'rmt_s', 'train', '1536', 'total_mib', 1.5),
        ('rmt_s infer images/s vs Swin-T (equal FLOPs)', 'rmt_s', SWIN_T, 'infer', '224', 'img_per_s', 1.0),
        ('rmt_s train images/s vs Swin-T (equal FLOPs)', 'rmt_s', SWIN_T, 'train', '224', 'img_per_s', 1.0),
    ],
}


def print_targets(rows: List[Dict], device: str = 'cpu') -> None:
    """The targets whose two models were both measured, as met or not."""
    found = {(r['model'], r['mode'], r['size']): r for r in rows}
    checks = []
    for what, model, peer, mode, size, metric, bound in TARGETS.get(device.split(':')[0], []):
        ours, theirs = found.get((model, mode, size)), found.get((peer, mode, size))
        if not ours or not theirs or not ours[metric] == ours[metric] or not theirs[metric] == theirs[metric]:
            continue  # a model missing, or its memory not measured (NaN)
        ratio = ours[metric] / theirs[metric]
        faster = metric == 'img_per_s'
        checks.append((what, f'{ratio:.2f}x', f"{'>=' if faster else '<='} {bound:.2f}x",
                       ratio >= bound if faster else ratio <= bound))
    if checks:
        print('\nTargets:\n')
        print('| target | measured | wanted | met |')
        print('|---|---|---|---|')
        for what, measured, wanted, met in checks:
            print(f"| {what} | {measured} | {wanted} | {'yes' if met else 'NO'} |")


def print_profile(name: str, mode: str, step, device: str, top: int) -> None:
    """The ``top`` operators of one step by self time on the device (CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = 'self_cuda_time_total' if device.startswith('cuda') else 'self_cpu_time_total'
    print(f'\nProfile of one {mode} step of {name}:')
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def matmul_peak(device: str, dtype=torch.float32, n: int = 2048, reps: int = 5) -> float:
    """Best GEMM GFLOP/s of this device in ``dtype``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float('inf')
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    models, modes, sizes = args.models, args.modes, args.resolutions or args.img_size
    peak = matmul_peak(args.device, getattr(torch, args.dtype), n=8192 if args.device.startswith('cuda') else 2048)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'cpu'
    print(f'device {args.device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, '
          f'dtype {args.dtype}, batch {args.batch_size}, train batch {batch_size(args, "train")}, channels_last {args.channels_last}, compile {args.compile}; '
          f'{args.dtype} matmul peak {peak:.1f} GFLOP/s',
          flush=True)

    rows: List[Dict] = []
    for size in sizes:
        for mode in modes:
            entries = []
            for name in models:
                model, x = model_and_input(name, args, mode, size)
                flops = float('nan') if args.no_flops else step_flops(model, args, mode, size)
                step = make_step(model, args, mode, x)
                for _ in range(args.warmup):
                    step()
                # (not under --compile: hooks added after compiling do not run inside the compiled graph)
                timed_parts = mode == 'infer' and isinstance(model, rmt.RMT) and not args.compile
                timer = PartTimer(model, args.device) if timed_parts else None
                entries.append(dict(name=name, step=step, model=model, flops=flops, times=[], timer=timer))
                print(f'  [{size_name(size)} {mode}] built and warmed up {name}', flush=True)
            for e in entries:
                if e['timer']:
                    e['timer'].attach()  # a few perf_counter calls per forward
            for r in range(args.rounds):
                for e in entries:
                    sync(args.device)
                    t = time.perf_counter()
                    e['step']()
                    sync(args.device)
                    e['times'].append(time.perf_counter() - t)
                print(f'  [{size_name(size)} {mode}] round {r + 1}/{args.rounds}: ' + ', '.join(
                    f"{e['name']} {e['times'][-1] * 1000:.0f} ms" for e in entries), flush=True)
            for e in entries:
                if args.profile:
                    print_profile(e['name'], mode, e['step'], args.device, args.profile)
                e['parts'] = None
                if e['timer']:
                    e['timer'].detach()
                    e['parts'] = e['timer'].medians()
            for e in entries:
                t = statistics.median(e['times'])
                mem = dict(peak=float('nan'), total=float('nan')) if args.no_memory else \
                    measure_memory(e['name'], mode, size, args)
                rows.append(dict(
                    model=e['name'], mode=mode, size=size_name(size), batch=batch_size(args, mode),
                    img_per_s=batch_size(args, mode) / t, ms_per_img=1000 * t / batch_size(args, mode),
                    gflops_per_s=e['flops'] / t / 1e9, peak_fraction=e['flops'] / t / 1e9 / peak,
                    peak_mib=mem['peak'] / 2 ** 20, total_mib=mem['total'] / 2 ** 20, pixels=size[0] * size[1],
                    parts=e['parts'] and [1000 * t / batch_size(args, mode) for t in e['parts']],
                    decomposed=[stage.decomposed for stage in e['model'].stages] if e['parts'] else None,
                ))
            del entries

    base = {(r['mode'], r['size']): r for r in rows if r['model'] == models[0]}
    print('\n| model | mode | size | img/s | ms/img | vs ' + models[0] + ' | GFLOP/s | of peak '
          '| peak MiB (over model) | peak MiB (process) |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        ref = base[(r['mode'], r['size'])]
        print(f"| {r['model']} | {r['mode']} | {r['size']} | {r['img_per_s']:.2f} | {r['ms_per_img']:.1f} | "
              f"{r['img_per_s'] / ref['img_per_s']:.2f}x | {r['gflops_per_s']:.1f} | {100 * r['peak_fraction']:.0f}% | "
              f"{r['peak_mib']:.0f} | {r['total_mib']:.0f} |")
    print_parts(rows)
    print_targets(rows, args.device)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or time.strftime('bench_%Y%m%d_%H%M%S'))
    with open(stem + '.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: ';'.join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()}
                          for r in rows])
    with open(stem + '.json', 'w') as f:
        json.dump(dict(args=vars(args), matmul_peak_gflops=peak, rows=rows), f, indent=1)
    print(f'\nwrote {stem}.csv and {stem}.json')


if __name__ == '__main__':
    run_main(main)

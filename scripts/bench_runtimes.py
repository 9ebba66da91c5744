#!/usr/bin/env python
"""Latency of RMT and timm peers on the CPU deployment runtimes, side by side in one run.

    python scripts/bench_runtimes.py                      # rmt_s, Swin-T, ConvNeXt-T; batch 1, 224 px, 2 threads
    python scripts/bench_runtimes.py -b 8 --runtimes eager,onnxruntime,openvino
    python scripts/bench_runtimes.py --runtimes eager,onnxruntime --profile 15   # per-op profiles

Each model (random weights, seeded) is exported with ``rmt.export`` for each runtime, loaded, checked
against eager PyTorch on the timed input (max abs difference) and timed. Routes (``--runtimes``;
default: every one whose runtime is installed):

* ``eager``: PyTorch, ``torch.inference_mode``;
* ``onnxruntime``: ONNX Runtime on the classic (tracing) exporter's file, opset 17;
* ``onnxruntime-dynamo``: ONNX Runtime on torch's default (dynamo) exporter's file, opset 18;
* ``openvino``: OpenVINO (CPU, float32) on the classic exporter's ONNX file;
* ``openvino-module``: OpenVINO converted from the ``torch.export`` program;
* ``executorch``: ExecuTorch with XNNPACK, exported at the timed shape.

RMT models are exported with dynamic batch, height and width, as ``rmt.export`` and
``scripts/export.py`` give them to users; fixed-size peers (Swin) with a dynamic batch only.
``--static-shape`` exports every model at the timed shape (batch, height and width fixed: the size
arithmetic and position tables become constants the runtimes fold). ExecuTorch programs are always
fixed to the timed shape.

Timing: ``--blocks`` blocks; in each, every route in turn runs ``--warmup`` untimed and ``--rounds``
timed rounds, a round timing every model once (interleaved), so drift of a shared machine hits the
models alike. A cell of the table is the median latency of each block, and the ratio column is the
first model's speed over the second's, per block (the range over blocks).

``--profile N`` then prints per-op profiles of the first two models at the timed shape: eager
PyTorch (``torch.profiler``, self CPU time grouped by op), ONNX Runtime (its profiler, node time
grouped by op type, on the classic export), the N costliest ops each with ms and calls per forward;
and, for ExecuTorch, the ops left out of the XNNPACK delegate.
"""
import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import timm

from rmt.tools.cli import (
    ArgumentParser, ScriptError, add_model_args, model_kwargs_from_args, model_name, non_negative_int, positive_int,
    run_main)
from rmt.export import (
    compile_openvino, export_executorch, export_onnx, export_onnx_traced, export_openvino, export_program,
    load_executorch, max_abs_diff, xnnpack_delegation)

ROUTES = {  # name: (module it needs, what the table calls it)
    'eager': ('torch', 'eager PyTorch'),
    'onnxruntime': ('onnxruntime', 'ONNX Runtime, classic export'),
    'onnxruntime-dynamo': ('onnxruntime', 'ONNX Runtime, dynamo export'),
    'openvino': ('openvino', 'OpenVINO, from the classic ONNX'),
    'openvino-module': ('openvino', 'OpenVINO, from torch.export'),
    'executorch': ('executorch', 'ExecuTorch XNNPACK, fixed shape'),
}
DEFAULT_MODELS = 'rmt_s,swin_tiny_patch4_window7_224,convnext_tiny'


def installed(route: str) -> bool:
    return importlib.util.find_spec(ROUTES[route][0]) is not None


def route_list(text: str) -> List[str]:
    routes = [r.strip() for r in text.split(',') if r.strip()]
    unknown = [r for r in routes if r not in ROUTES]
    if not routes or unknown:
        raise argparse.ArgumentTypeError(f'expected runtimes among {",".join(ROUTES)}, got {text!r}')
    missing = [r for r in routes if not installed(r)]
    if missing:
        raise argparse.ArgumentTypeError(', '.join(f'{r} needs {ROUTES[r][0]}' for r in missing)
                                         + ': pip install it, or leave it out of --runtimes')
    return routes


def model_list(text: str) -> List[str]:
    models = [model_name(m.strip()) for m in text.split(',') if m.strip()]
    if not models:
        raise argparse.ArgumentTypeError(f'expected model names separated by commas, got {text!r}')
    return models


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', type=model_list, default=model_list(DEFAULT_MODELS),
                   help=f'comma list of timm model names (default: {DEFAULT_MODELS}); the ratio compares the first two')
    p.add_argument('--runtimes', type=route_list, default=None,
                   help=f'comma list of {", ".join(ROUTES)} (default: those installed)')
    add_model_args(p)  # applied to RMT models only
    p.add_argument('-b', '--batch-size', type=positive_int, default=1)
    p.add_argument('--img-size', type=positive_int, default=224)
    p.add_argument('--threads', type=positive_int, default=2, help='threads of every runtime')
    p.add_argument('--static-shape', action='store_true', help='export every model at the timed shape')
    p.add_argument('--warmup', type=non_negative_int, default=2)
    p.add_argument('--rounds', type=positive_int, default=5)
    p.add_argument('--blocks', type=positive_int, default=2)
    p.add_argument('--profile', type=non_negative_int, default=0, metavar='N',
                   help='print per-op profiles of the first two models (the N costliest ops)')
    p.add_argument('--work-dir', default='', help='where exported files go (default: a temporary folder)')
    p.add_argument('--json', default='', help='also write the results to this JSON file')
    args = p.parse_args(argv)
    if args.runtimes is None:
        args.runtimes = [r for r in ROUTES if installed(r)]
    if args.img_size < 33:
        raise ScriptError(f'--img-size {args.img_size}: exported RMT takes sides of at least 33 px')
    return args


def build(name: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith('rmt_'):
        return timm.create_model(name, **model_kwargs_from_args(args)).eval()
    try:  # fixed-size peers (Swin, ViT) must be told the size they run at
        return timm.create_model(name, img_size=args.img_size).eval()
    except TypeError:
        return timm.create_model(name).eval()


def _outputs(out) -> List[torch.Tensor]:
    items = out if isinstance(out, (list, tuple)) else [out]
    return [torch.as_tensor(o) for o in items]


class Exports:
    """The exported files of one model, made once and shared by the routes that read them."""

    def __init__(self, model: torch.nn.Module, name: str, x: torch.Tensor, args, folder: str):
        self.model, self.x, self.threads = model, x, args.threads
        self.stem = os.path.join(folder, name)
        self.dynamic_batch = not args.static_shape
        self.dynamic_size = name.startswith('rmt_') and not args.static_shape
        # a dynamic batch is traced at >= 2 (export specialises 1)
        self.example = x if args.static_shape else torch.randn(max(2, x.shape[0]), *x.shape[1:])
        self._classic: Optional[str] = None
        self._program = None
        self.lowered = None  # ExecuTorch's lowered program, for the delegation report

    def program(self):
        if self._program is None:
            self._program = export_program(self.model, self.example, dynamic_batch=self.dynamic_batch,
                                           dynamic_size=self.dynamic_size)
        return self._program

    def classic_onnx(self) -> str:
        if self._classic is None:
            self._classic = self.stem + '.onnx'
            export_onnx_traced(self.model, self._classic, example=self.example, dynamic_batch=self.dynamic_batch,
                               dynamic_size=self.dynamic_size)
        return self._classic

    def dynamo_onnx(self) -> str:
        path = self.stem + '_dynamo.onnx'
        export_onnx(self.program(), path, dynamic_batch=self.dynamic_batch, dynamic_size=self.dynamic_size)
        return path


def ort_session(path: str, threads: int, profile: bool = False):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.splitext(path)[0] + '_ort_profile'
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def load_route(route: str, ex: Exports) -> Callable[[], List[torch.Tensor]]:
    """Export (or reuse) ``ex``'s model for ``route`` and return a call running it on ``ex.x``."""
    x = ex.x
    if route == 'eager':
        def run():
            with torch.inference_mode():
                return _outputs(ex.model(x))
        return run
    if route in ('onnxruntime', 'onnxruntime-dynamo'):
        session = ort_session(ex.classic_onnx() if route == 'onnxruntime' else ex.dynamo_onnx(), ex.threads)
        feed = {'x': x.numpy()}
        return lambda: _outputs(session.run(None, feed))
    if route in ('openvino', 'openvino-module'):
        compiled = compile_openvino(ex.classic_onnx() if route == 'openvino' else export_openvino(ex.program()),
                                    ex.threads)
        request, array = compiled.create_infer_request(), x.numpy()
        return lambda: _outputs(request.infer(array).to_tuple())
    if route == 'executorch':
        ex.lowered = export_executorch(ex.model, ex.stem + '.pte', example=x)
        method = load_executorch(ex.stem + '.pte', ex.threads)
        return lambda: _outputs(method.execute([x]))
    raise ValueError(route)


def _cell_ratio(ours: List[float], theirs: List[float]) -> str:
    ratios = sorted(t / o for o, t in zip(ours, theirs))
    low, high = f'{ratios[0]:.2f}', f'{ratios[-1]:.2f}'
    return f'{low}x' if low == high else f'{low}-{high}x'


def print_tables(args, results: Dict[Tuple[str, str], Dict]) -> None:
    models, routes = args.models, args.runtimes
    ratio = len(models) > 1
    print(f'\nLatency in ms (median of {args.rounds} rounds, per block), batch {args.batch_size}, '
          f'{args.img_size} px, {args.threads} threads' + (', exported at that shape' if args.static_shape else '') + ':\n')
    head = '| route | ' + ' | '.join(models) + ' |' + (f' {models[0]} / {models[1]} speed |' if ratio else '')
    print(head)
    print('|---|' + '---|' * (len(models) + ratio))
    for route in routes:
        cells, ok = [], True
        for m in models:
            r = results[(route, m)]
            if r.get('error'):
                cells.append('failed')
                ok = False if m in models[:2] else ok
            else:
                cells.append(', '.join(f'{1000 * t:.0f}' for t in r['blocks']))
        line = f'| {ROUTES[route][1]} | ' + ' | '.join(cells) + ' |'
        if ratio:
            line += (' ' + _cell_ratio(results[(route, models[0])]['blocks'], results[(route, models[1])]['blocks'])
                     if ok else ' - ') + ' |'
        print(line)
    print('\nMax abs difference from eager on the timed input; export and load time in s:\n')
    print('| route | ' + ' | '.join(models) + ' |')
    print('|---|' + '---|' * len(models))
    for route in routes:
        cells = []
        for m in models:
            r = results[(route, m)]
            cells.append(f"failed: {r['error']}" if r.get('error') else f"{r['diff']:.1e} ({r['load_s']:.0f} s)")
        print(f'| {ROUTES[route][1]} | ' + ' | '.join(cells) + ' |')
    failed = [(route, m) for (route, m), r in results.items() if r.get('error')]
    for route, m in failed:
        print(f'{route} {m}: {results[(route, m)]["error"]}')


def _op_table(title: str, names: List[str], per_model: List[Dict[str, Tuple[float, float]]], top: int) -> None:
    """``per_model``: op -> (ms per forward, calls per forward), one dict per model."""
    ops = sorted(set().union(*per_model), key=lambda op: -max(d.get(op, (0, 0))[0] for d in per_model))
    print(f'\n{title} (ms and calls per forward; the {top} costliest ops):\n')
    print('| op | ' + ' | '.join(f'{n} ms | calls' for n in names) + ' |' +
          (f' {names[0]} - {names[1]} ms |' if len(names) > 1 else ''))
    print('|---|' + '---|---|' * len(names) + ('---|' if len(names) > 1 else ''))
    for op in ops[:top]:
        cells = [f'{d.get(op, (0, 0))[0]:.2f} | {d.get(op, (0, 0))[1]:g}' for d in per_model]
        extra = f' {per_model[0].get(op, (0, 0))[0] - per_model[1].get(op, (0, 0))[0]:+.2f} |' if len(names) > 1 else ''
        print(f'| {op} | ' + ' | '.join(cells) + ' |' + extra)
    totals = [sum(v[0] for v in d.values()) for d in per_model]
    print('| total | ' + ' | '.join(f'{t:.2f} | {sum(v[1] for v in d.values()):g}'
                                   for t, d in zip(totals, per_model)) + ' |' +
          (f' {totals[0] - totals[1]:+.2f} |' if len(names) > 1 else ''))


def torch_op_profiles(runs: List[Callable], reps: int) -> List[Dict[str, Tuple[float, float]]]:
    """Self CPU time and calls of each aten op per forward, by ``torch.profiler``; the models' forwards
    alternate (one profiled forward each per round), so a busy machine weighs on them alike."""
    from torch.profiler import ProfilerActivity, profile
    tables: List[Dict[str, List[float]]] = [defaultdict(lambda: [0., 0.]) for _ in runs]
    for _ in range(reps):
        for run, table in zip(runs, tables):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            for e in prof.key_averages():
                table[e.key][0] += e.self_cpu_time_total / 1000 / reps
                table[e.key][1] += e.count / reps
    return [{k: tuple(v) for k, v in t.items() if v[0] > 0} for t in tables]


def ort_op_profiles(paths: List[str], x: torch.Tensor, threads: int, reps: int) -> List[Dict[str, Tuple[float, float]]]:
    """Node time and calls of each ONNX op type per forward, from ONNX Runtime's profiler; the models'
    runs alternate, the first run of each left out (its nodes' times include first-use costs)."""
    sessions = [ort_session(path, threads, profile=True) for path in paths]
    feed = {'x': x.numpy()}
    for _ in range(reps + 1):
        for session in sessions:
            session.run(None, feed)
    tables = []
    for session in sessions:
        with open(session.end_profiling()) as f:
            events = json.load(f)
        second = sorted(e['ts'] for e in events if e.get('name') == 'model_run')[1]
        table: Dict[str, List[float]] = defaultdict(lambda: [0., 0.])
        for e in events:
            if e['ts'] >= second and e.get('cat') == 'Node' and e['name'].endswith('_kernel_time'):
                table[e['args']['op_name']][0] += e['dur'] / 1000 / reps
                table[e['args']['op_name']][1] += 1 / reps
        tables.append({k: tuple(v) for k, v in table.items()})
    return tables


def print_profiles(args, exports: Dict[str, Exports], runs: Dict[Tuple[str, str], Callable]) -> None:
    names = args.models[:2]
    reps = max(3, args.rounds)
    if ('eager', names[0]) in runs:
        _op_table('Eager PyTorch, torch.profiler self CPU time by op', names,
                  torch_op_profiles([runs[('eager', n)] for n in names], reps), args.profile)
    if 'onnxruntime' in args.runtimes and all(('onnxruntime', n) in runs for n in names):
        _op_table('ONNX Runtime (classic export), node time by op type', names,
                  ort_op_profiles([exports[n].classic_onnx() for n in names], exports[names[0]].x, args.threads,
                                  reps), args.profile)
    for n in args.models:
        lowered = exports[n].lowered
        if lowered is None:
            continue
        ops = xnnpack_delegation(lowered)
        subgraphs = sum(1 for node in lowered.exported_program().graph.nodes
                        if node.op == 'call_function' and 'call_delegate' in str(node.target))
        left = sorted(((op, out) for op, (_, out) in ops.items() if out), key=lambda t: -t[1])
        print(f'\nExecuTorch {n}: {subgraphs} XNNPACK subgraphs; '
              f'{sum(d for d, _ in ops.values())} nodes delegated, {sum(o for _, o in ops.values())} left out: '
              + (', '.join(f'{op} x{k}' for op, k in left) or 'none'))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore')  # tracer and exporter warnings about values that do not change with size
    folder = args.work_dir or tempfile.mkdtemp(prefix='rmt-bench-runtimes-')
    os.makedirs(folder, exist_ok=True)
    print(f'torch {torch.__version__}, threads {args.threads}, batch {args.batch_size}, {args.img_size} px, '
          f'runtimes {",".join(args.runtimes)}; exports in {folder}', flush=True)
    torch.manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    exports = {n: Exports(build(n, args), n, x, args, folder) for n in args.models}
    eager = {n: _outputs(exports[n].model(x)) for n in args.models}

    runs: Dict[Tuple[str, str], Callable] = {}
    results: Dict[Tuple[str, str], Dict] = {}
    for route in args.runtimes:
        for n in args.models:
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    run = load_route(route, exports[n])
                    diff = max_abs_diff(run(), eager[n])
            except Exception as e:  # a route that cannot take a model is a result, not the end of the run
                message = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                results[(route, n)] = dict(error=f'{type(e).__name__}: {message}')
                print(f'  {route} {n}: failed ({results[(route, n)]["error"]})', flush=True)
                continue
            runs[(route, n)] = run
            results[(route, n)] = dict(diff=diff, load_s=time.perf_counter() - start, times=[], blocks=[])
            print(f'  {route} {n}: exported and loaded in {time.perf_counter() - start:.1f} s, '
                  f'max abs diff {diff:.1e}', flush=True)

    for block in range(args.blocks):
        for route in args.runtimes:
            timed = [(n, runs[(route, n)]) for n in args.models if (route, n) in runs]
            for _ in range(args.warmup):
                for _, run in timed:
                    run()
            times: Dict[str, List[float]] = defaultdict(list)
            for _ in range(args.rounds):
                for n, run in timed:
                    start = time.perf_counter()
                    run()
                    times[n].append(time.perf_counter() - start)
            for n, t in times.items():
                results[(route, n)]['blocks'].append(statistics.median(t))
                results[(route, n)]['times'].append(t)
            print(f'  block {block + 1} {route}: ' + ', '.join(
                f'{n} {1000 * statistics.median(t):.0f} ms' for n, t in times.items()), flush=True)

    print_tables(args, results)
    if args.profile:
        print_profiles(args, exports, runs)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args={k: v for k, v in vars(args).items()},
                           results={f'{r}|{m}': v for (r, m), v in results.items()}), f, indent=1)


if __name__ == '__main__':
    run_main(main)

#!/usr/bin/env python3
"""Export an RMT model with torch.export (.pt2) and to ONNX, with dynamic batch, height and width,
then check both against the eager model at sizes not used for the export.

    python scripts/export.py --model rmt_t --out-dir exported                 # rmt_t.pt2 + rmt_t.onnx
    python scripts/export.py --model rmt_s --checkpoint RMT-S.pth --out-dir exported
    python scripts/export.py --model rmt_t --features-only --feature-norm --out-dir exported   # backbone
    python scripts/export.py --model rmt_t --official-config tests/fixtures/official_small_config.json \\
        --checkpoint tests/fixtures/official_small_checkpoint.pth --out-dir /tmp/rmt_small  # tiny, fast
    python scripts/export.py --model rmt_t --opset 17 --out-dir exported     # classic (tracing) ONNX exporter
    python scripts/export.py --model rmt_t --formats onnx,openvino,executorch,coreml --out-dir exported

Exported programs accept any batch and any height and width from 33 px (see ``rmt.export``). Load
them with ``torch.export.load('rmt_t.pt2').module()`` or ``onnxruntime.InferenceSession('rmt_t.onnx')``
(input ``x``: batch x 3 x height x width, float32, normalised like the eager model's input).
``--formats`` (beside the ``.pt2``, always written) adds OpenVINO (``rmt_t.xml`` + ``.bin``, converted from the exported program, same
dynamic dims), ExecuTorch for XNNPACK (``rmt_t.pte``) and Core ML (``rmt_t.mlpackage``, an ML program);
these two take the fixed shape ``--fixed-batch`` x 3 x ``--export-size``. Every format but Core ML
(which runs on macOS only) is run and compared with eager.
Opset 18 and later are written by torch's dynamo exporter from the exported program, opset 17 by
the classic exporter (``torch.onnx.export(..., dynamo=False)``); the opset printed is the one read
back from the file. Exits with status 1 when an output differs from eager by more than ``--tol``.
"""
import argparse
import importlib.util
import os
import sys
import time
import warnings

import torch

from rmt.tools.cli import (
    ArgumentParser, ScriptError, add_model_args, build_model, model_name, non_negative_float, non_negative_int,
    positive_int, run_main)
from rmt.export import (
    DEFAULT_OPSET, DYNAMO_MIN_OPSET, MIN_SIZE, compile_openvino, export_coreml, export_executorch, export_onnx,
    export_onnx_traced, export_openvino, export_program, load_executorch, max_abs_diff, onnx_opset)

warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)


def _size(text):
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected HxW, e.g. 224x224, got {text!r}') from None
    if min(h, w) < MIN_SIZE:
        raise argparse.ArgumentTypeError(f'exported RMT takes sides of at least {MIN_SIZE} px, got {text}')
    return h, w


def build(args):
    args.pretrained_path = args.checkpoint
    model = build_model(args, args.num_classes, default_model='rmt_t', weights_flag='--checkpoint',
                        features_only=args.features_only or None, feature_norm=args.feature_norm or None)
    return model.eval()


def _opset(text):
    opset = positive_int(text)
    if opset < 17:
        raise argparse.ArgumentTypeError(f'opset {opset} is too old: use 17 or later')
    return opset


FORMATS = ('onnx', 'openvino', 'executorch', 'coreml')
NEEDS = {'onnx': ('onnx', 'onnxruntime', 'onnxscript'), 'openvino': ('openvino',), 'executorch': ('executorch',),
         'coreml': ('coremltools',)}


def format_list(text):
    formats = [f.strip() for f in text.split(',') if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise argparse.ArgumentTypeError(f'expected formats among {",".join(FORMATS)}, got {text!r}')
    return formats


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', type=model_name, default=None,
                        help='timm model name (rmt_t, rmt_s, rmt_b, rmt_l; default: a converted --checkpoint\'s, '
                             'else rmt_t)')
    parser.add_argument('--checkpoint', default='', help='weights: a released RMT checkpoint or one of ours')
    add_model_args(parser)
    parser.add_argument('--num-classes', type=non_negative_int, default=None)
    parser.add_argument('--features-only', action='store_true', help='export the backbone: stage features')
    parser.add_argument('--feature-norm', action='store_true', help='per-stage LayerNorm on the features')
    parser.add_argument('--out-dir', default='.', help='where MODEL.pt2 and MODEL.onnx go')
    parser.add_argument('--name', default='', help='file name stem (default: the model name)')
    parser.add_argument('--formats', type=format_list, default=['onnx'],
                        help=f'comma list of {", ".join(FORMATS)}, written beside the .pt2 (default: onnx)')
    parser.add_argument('--no-onnx', action='store_true', help='leave onnx out of --formats')
    parser.add_argument('--opset', type=_opset, default=DEFAULT_OPSET,
                        help=f'ONNX opset: {DYNAMO_MIN_OPSET} or later (dynamo exporter), or 17 (classic exporter)')
    parser.add_argument('--static-batch', action='store_true', help='fix the batch size to --batch')
    parser.add_argument('--export-size', type=_size, default=(224, 224), metavar='HxW',
                        help='example input size traced for the export')
    parser.add_argument('--batch', type=positive_int, default=2, help='example batch size (>= 2 for a dynamic batch)')
    parser.add_argument('--fixed-batch', type=positive_int, default=1,
                        help='batch of the fixed-shape formats (executorch, coreml)')
    parser.add_argument('--check-sizes', type=_size, nargs='*', metavar='HxW',
                        default=[(224, 224), (97, 161), (320, 256)],
                        help='sizes at which outputs are compared with the eager model')
    parser.add_argument('--tol', type=non_negative_float, default=1e-4, help='largest allowed max abs difference')
    args = parser.parse_args(argv)
    if args.batch < 2 and not args.static_batch:
        raise ScriptError(f'--batch {args.batch}: a dynamic batch is traced with an example batch of at least 2 '
                          f'(export specialises size 1); or add --static-batch')
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ScriptError(f'--out-dir {args.out_dir}: a file, expected a folder')
    if args.no_onnx:
        args.formats = [f for f in args.formats if f != 'onnx']
    for fmt in args.formats:
        missing = [m for m in NEEDS.get(fmt, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise ScriptError(f'--formats {fmt} needs {", ".join(missing)}: pip install it, or leave {fmt} out'
                              + (' (--no-onnx)' if fmt == 'onnx' else ''))

    model = build(args)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise ScriptError(f'--out-dir {args.out_dir}: cannot create it ({e.strerror})') from None
    architecture = model.pretrained_cfg['architecture']  # --model, or the one a converted --checkpoint names
    stem = os.path.join(args.out_dir, args.name or architecture + ('_features' if args.features_only else ''))
    torch.manual_seed(0)
    example = torch.randn(args.batch, 3, *args.export_size)

    start = time.perf_counter()
    program = export_program(model, example, dynamic_batch=not args.static_batch)
    torch.export.save(program, stem + '.pt2')
    print(f'torch.export: {stem}.pt2 ({time.perf_counter() - start:.1f} s), '
          f'traced at {args.batch}x3x{args.export_size[0]}x{args.export_size[1]}')
    session = compiled = None
    if 'onnx' in args.formats:
        import onnxruntime as ort

        start = time.perf_counter()
        if args.opset >= DYNAMO_MIN_OPSET:
            exporter = 'dynamo'
            export_onnx(program, stem + '.onnx', opset=args.opset, dynamic_batch=not args.static_batch)
        else:
            exporter = 'classic'
            export_onnx_traced(model, stem + '.onnx', opset=args.opset, example=example,
                               dynamic_batch=not args.static_batch)
        written = onnx_opset(stem + '.onnx')
        if written != args.opset:
            raise ScriptError(f'{stem}.onnx was written for opset {written}, not the requested {args.opset}')
        session = ort.InferenceSession(stem + '.onnx', providers=['CPUExecutionProvider'])
        shape = session.get_inputs()[0].shape
        print(f'ONNX (opset {written}, {exporter} exporter): {stem}.onnx ({time.perf_counter() - start:.1f} s), '
              f'input x {shape}')

    if 'openvino' in args.formats:
        start = time.perf_counter()
        export_openvino(program, stem + '.xml')
        compiled = compile_openvino(stem + '.xml')
        print(f'OpenVINO: {stem}.xml and .bin ({time.perf_counter() - start:.1f} s), input x {compiled.inputs[0].partial_shape}')
    fixed = []  # formats of fixed input shape: checked at the export shape
    if {'executorch', 'coreml'} & set(args.formats):
        fixed_example = torch.randn(args.fixed_batch, 3, *args.export_size)
    if 'executorch' in args.formats:
        start = time.perf_counter()
        export_executorch(model, stem + '.pte', example=fixed_example)
        method = load_executorch(stem + '.pte')
        print(f'ExecuTorch (XNNPACK): {stem}.pte ({time.perf_counter() - start:.1f} s), '
              f'input x fixed at {"x".join(map(str, fixed_example.shape))}')
        fixed.append(('ExecuTorch', lambda x: method.execute([x])))
    if 'coreml' in args.formats:
        start = time.perf_counter()
        try:
            export_coreml(model, stem + '.mlpackage', example=fixed_example)
        except Exception as e:  # coremltools' conversion errors have no common type
            raise ScriptError(f'Core ML conversion failed: {str(e).strip().splitlines()[0]}') from None
        print(f'Core ML (ML program): {stem}.mlpackage ({time.perf_counter() - start:.1f} s), input x fixed at '
              f'{"x".join(map(str, fixed_example.shape))}; not run (Core ML runs on macOS)')

    run = torch.export.load(stem + '.pt2').module()
    batches = [args.batch] if args.static_batch else [1, 3]
    names = ['torch.export'] + (['ONNX Runtime'] if session is not None else []) + \
        (['OpenVINO'] if compiled is not None else [])
    print('\n| input | eager output | ' + ' | '.join(f'max abs diff, {n}' for n in names) + ' |')
    print('|---|---|' + '---|' * len(names))
    worst = 0.
    for i, (h, w) in enumerate(args.check_sizes):
        b = batches[i % len(batches)]
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            eager = model(x)
            exported = run(x)
        diffs = [max_abs_diff(exported, eager)]
        if session is not None:
            diffs.append(max_abs_diff(session.run(None, {'x': x.numpy()}), eager))
        if compiled is not None:
            diffs.append(max_abs_diff(compiled(x.numpy()).to_tuple(), eager))
        worst = max([worst] + diffs)
        shapes = ', '.join('x'.join(map(str, t.shape)) for t in (eager if isinstance(eager, list) else [eager]))
        print(f'| {b}x3x{h}x{w} | {shapes} | ' + ' | '.join(f'{d:.2e}' for d in diffs) + ' |', flush=True)
    for name, call in fixed:
        x = torch.randn_like(fixed_example)
        with torch.no_grad():
            diff = max_abs_diff(call(x), model(x))
        worst = max(worst, diff)
        print(f'{name} at {"x".join(map(str, x.shape))}: max abs diff {diff:.2e}')
    if worst > args.tol:
        print(f'\nFAILED: largest difference {worst:.2e} exceeds --tol {args.tol:g}')
        sys.exit(1)
    print(f'\nall outputs within {args.tol:g} of eager')


if __name__ == '__main__':
    run_main(main)

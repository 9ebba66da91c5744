#!/usr/bin/env python
"""Compile the Triton MaSA kernels for a CUDA target without a GPU, and report what the hardware would run.

    python scripts/check_kernels.py --arch 90 --dtype bfloat16
    python scripts/check_kernels.py --arch 80 --dtype float16 --cases t224

For every kernel configuration that the chosen cases launch (by default ``rmt_t`` and ``rmt_s`` at
224 px, batch 8, and ``rmt_t`` at 1536 px, batch 1; padded head dims; 1-D sequences, 3-D grids
decomposed (with the depth pass) and full, and 2-D grids without the theta shift, each in tiles and
looped; forward with and without saved statistics, and backward), the launches come from
:func:`rmt.attention.kernels.masa_forward` / :func:`rmt.attention.kernels.masa_backward` as the op would issue them, and
are compiled with Triton's own ``warmup`` against a stand-in driver that reports the target. Triton's
bundled ``cuobjdump`` reads each cubin. Printed per kernel: registers per thread, spill stack bytes,
shared memory bytes, SASS instructions per warp. A kernel's pass is ``w``, ``h``, ``d`` (along W, H,
D) or ``full``; its flags: ``+res``, the pass that adds the residual (the LCE output: the forward adds
it as it stores, the dq kernel subtracts it from the output for ``delta``); ``+lse``, the forward
keeps the log-sum-exp for backward; ``+acc``, the backward adds into the gradient an earlier pass
wrote; ``-rot``, no theta shift.

Exits 1 when a kernel fails to compile, spills registers, or needs more shared memory than the
target has; 2 on a usage error (e.g. no Triton, or no ``cuobjdump`` in its nvidia backend).
"""
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, NamedTuple, Tuple

if __name__ == '__main__':  # before Triton decorates the kernels: compile for real, whatever the environment
    os.environ.pop('TRITON_INTERPRET', None)

import torch  # noqa: E402

from rmt.attention import kernels  # noqa: E402
from rmt.tools.cli import ArgumentParser, ScriptError, run_main  # noqa: E402
from rmt.model import MODEL_ARGS  # noqa: E402
from rmt.position import RelPos  # noqa: E402

MODELS = {'t224': ('rmt_t', 224, 8), 's224': ('rmt_s', 224, 8), 't1536': ('rmt_t', 1536, 1)}
# head dims beyond the released ones (16, 32): padded (8, 24, 48) and the largest (64), in both forms,
# with sequences that fit a tile and sequences that loop
HEAD_DIMS = (8, 24, 48, 64)
# the grids beyond the models' 2-D ones, at every padded head dim (16, 32, 64), in tiles and looped
GRID_CASES = {'1d': '1-D sequences, with and without a residual', '3d': '3-D grids, decomposed and full',
              'norot': '2-D grids without the theta shift'}
CASES = list(MODELS) + ['dims'] + list(GRID_CASES)
# shared memory per block (opt-in maximum, bytes) by compute capability
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                100: 227 * 1024, 120: 99 * 1024}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', type=int, default=90, choices=sorted(SHARED_LIMIT),
                   help='compute capability as major * 10 + minor (default 90: H100/H200)')
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    p.add_argument('--fp32-precision', default='highest', choices=['highest', 'high'],
                   help="torch.get_float32_matmul_precision() to compile float32 for ('high': tf32 dots)")
    p.add_argument('--config', default='', metavar='KEY=VALUE,...',
                   help='kernel settings instead of the defaults, e.g. tile=32,num_warps=8 (rmt.attention.kernels.KernelConfig)')
    p.add_argument('--shape', default=None, metavar='B,[D,]H,W,C,HEADS,FORM',
                   help='one layer shape instead of the cases (FORM: decomposed or full; a 3-D grid with D), '
                        'e.g. 2,7,7,64,2,full or 1,3,5,7,64,2,full')
    models = [f'{k} ({m} at {s} px, batch {b})' for k, (m, s, b) in MODELS.items()]
    grids = [f'{k} ({text})' for k, text in GRID_CASES.items()]
    p.add_argument('--cases', default=','.join(CASES), help='comma-separated, from ' + ', '.join(
        models + [f'dims (head dims {HEAD_DIMS})'] + grids))
    return p.parse_args(argv)


class Layer(NamedTuple):
    """One MaSA layer's shape: batch, a label, the (D, H, W) grid, channels, heads, passes, whether it
    applies the theta shift and whether its last pass adds a residual."""
    batch: int
    stage: Any
    grid: Tuple[int, int, int]
    channels: int
    heads: int
    passes: Tuple[str, ...]
    rotate: bool = True
    residual: bool = True


def parse_shape(text: str):
    """``--shape B,[D,]H,W,C,HEADS,FORM`` as a :class:`Layer` (a 2-D grid without D)."""
    *numbers, form = text.split(',')
    if len(numbers) not in (5, 6) or not all(n.isdigit() and int(n) > 0 for n in numbers) or \
            form not in ('decomposed', 'full'):
        raise ScriptError(f'--shape {text!r}: expected B,[D,]H,W,C,HEADS,FORM with positive integers and FORM '
                          f'decomposed or full')
    B, *grid, C, heads = map(int, numbers)
    if C % heads or (C // heads) % 2 or C // heads > kernels.MAX_HEAD_DIM:
        raise ScriptError(f'--shape {text!r}: {C} channels do not split into {heads} heads of an even size up to '
                          f'{kernels.MAX_HEAD_DIM}')
    return Layer(B, 'shape', tuple([1] * (3 - len(grid)) + grid), C, heads,
                 kernels.pass_modes(len(grid), form == 'decomposed'))


def grid_layers(case: str, dtype: torch.dtype, arch: int, overrides):
    """The layers of a case of :data:`GRID_CASES`: at head dims 16, 32 and 64, sequences of ``tile / 2 - 1``
    tokens (in tiles) and of ``tile + 6`` (looped, ragged last block) under that head dim's settings."""
    for d in (16, 32, 64):
        tile = kernels.default_config(d, dtype, arch)._replace(**overrides).tile
        short, long = tile // 2 - 1, tile + 6
        if case == '1d':
            for label, W in (('tile', short), ('loop', long)):
                for residual in (True, False):
                    yield Layer(2, f'd{d} {label} W={W}', (1, 1, W), 2 * d, 2, ('w',), True, residual)
        elif case == '3d':
            for label, grid, decomposed in (('tile', (3, 5, 7), True), ('loop', (long,) * 3, True),
                                            ('tile', (2, 3, 5), False), ('loop', (3, 5, 7), False)):
                yield Layer(1, f'd{d} {label} {"x".join(map(str, grid))}', grid, 2 * d, 2,
                            kernels.pass_modes(3, decomposed))
        else:  # norot
            for label, grid, decomposed in (('tile', (1, short, short), True), ('loop', (1, long, long), True),
                                            ('tile', (1, 5, 6), False), ('loop', (1, 9, 10), False)):
                yield Layer(2, f'd{d} {label} {grid[1]}x{grid[2]}', grid, 2 * d, 2,
                            kernels.pass_modes(2, decomposed), False, not decomposed)


def stage_shapes(case: str, dtype: torch.dtype = torch.bfloat16, arch: int = 90, overrides=None):
    """The :class:`Layer` of every MaSA stage shape of a case."""
    if ',' in case:
        yield parse_shape(case)
        return
    if case in GRID_CASES:
        yield from grid_layers(case, dtype, arch, overrides or {})
        return
    if case == 'dims':
        for d in HEAD_DIMS:
            for label, H, W, decomposed in (('tile', 20, 20, True), ('loop', 72, 72, True), ('tile', 6, 6, False),
                                            ('loop', 12, 12, False)):
                yield Layer(2, f'd{d} {label}', (1, H, W), 2 * d, 2, kernels.pass_modes(2, decomposed))
        return
    model, size, batch = MODELS[case]
    args = MODEL_ARGS[model]
    side = math.ceil(math.ceil(size / 2) / 2)
    for i, (dim, heads, decomposed) in enumerate(zip(args['embed_dims'], args['num_heads'], args['decomposed'])):
        if i:
            side = math.ceil(side / 2)
        yield Layer(batch, i + 1, (1, side, side), dim, heads, kernels.pass_modes(2, decomposed))


def stage_launches(layer: Layer, dtype: torch.dtype, ieee: bool, arch: int, overrides=None):
    """Every launch of one MaSA layer on ``sm_<arch>``: forward for inference, forward for training, backward.
    The tensors are allocated, never written (compiling reads only their dtypes and alignment)."""
    B, _, (D, H, W), C, heads, passes, rotate, residual = layer
    q, k, v, res = [torch.empty(B, D, H, W, C, dtype=dtype) for _ in range(4)]
    res = res if residual else None
    if D == 1:  # the model's own tables
        tables = RelPos(C, heads, 2, 4).build([H, W], torch.device('cpu'), torch.float32, False)
        rotation, decay = tables.rotation.unsqueeze(0), tables.decay
    else:
        rotation, decay = torch.empty(D, H, W, 1, C // heads // 2, 2), torch.full((heads,), -0.5)
    rotation = rotation if rotate else None
    config = kernels.default_config(C // heads, dtype, arch)._replace(**(overrides or {}))
    common = (rotation, decay, (C // heads) ** -0.5, heads, passes)
    _, _, inference = kernels.masa_forward(q, k, v, res, *common, False, ieee, config)
    out, stats, training = kernels.masa_forward(q, k, v, res, *common, True, ieee, config)
    *_, backward = kernels.masa_backward(out, q, k, v, out, res, stats, *common, ieee, config)
    return inference + training + backward


class _TargetDriver:
    """What Triton's runtime asks of a driver to compile (not launch) for one target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True

    def __getattr__(self, name):
        return lambda *args, **kwargs: 0


def kernel_label(launch) -> str:
    """The kernel's name, its pass and flags, e.g. ``fwd_loop d +res +lse``."""
    cx = launch.constexprs
    flags = [('+res', cx.get('HAS_RES')), ('+lse', cx.get('STORE_LSE')), ('+acc', cx.get('ACCUMULATE')),
             ('-rot', not cx['ROTATE'])]
    flags = ''.join(f' {flag}' for flag, on in flags if on)
    name = launch.kernel.fn.__name__.strip('_').replace('_kernel', '')
    return f'{name} {"w h d full".split()[cx["MODE"]]}{flags}'


def compile_only(launch, arch: int):
    """The CompiledKernel of ``launch`` for ``sm_<arch>``."""
    return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.constexprs)


def measure(compiled, tools: str):
    """(registers, spill bytes, shared bytes, SASS instructions per warp) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(compiled.asm['cubin'])
        f.flush()
        usage = subprocess.run([os.path.join(tools, 'cuobjdump'), '-res-usage', f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, 'cuobjdump'), '-sass', f.name],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(r'REG:(\d+) STACK:(\d+) SHARED:(\d+)', usage)
    instructions = sum(1 for line in sass.splitlines()
                       if re.match(r'^\s+/\*[0-9a-f]{4}\*/', line) and ' NOP' not in line)
    shared = max(int(m.group(3)), int(compiled.metadata.shared))
    return int(m.group(1)), int(m.group(2)), shared, instructions


def main(argv=None) -> int:
    args = parse_args(argv)
    if not kernels.available():
        raise ScriptError('Triton is not installed')
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    tools = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
    if not os.path.isfile(os.path.join(tools, 'cuobjdump')):
        raise ScriptError(f'no cuobjdump in {tools} (Triton {triton.__version__}): its nvidia backend tools are needed')
    cases = [args.shape] if args.shape else [c for c in args.cases.split(',') if c]
    unknown = [c for c in cases if c not in CASES and c != args.shape]
    if args.shape:
        parse_shape(args.shape)
    if unknown or not cases:
        raise ScriptError(f'--cases {args.cases!r}: unknown case(s) {unknown}, expected some of {", ".join(CASES)}')
    overrides = {}
    for item in [i for i in args.config.split(',') if i]:
        key, _, value = item.partition('=')
        if key not in kernels.KernelConfig._fields or not value.isdigit() or int(value) < 1:
            raise ScriptError(f'--config {item!r}: expected KEY=N with N a positive integer and KEY one of '
                 f'{", ".join(kernels.KernelConfig._fields)}')
        overrides[key] = int(value)
    dtype = getattr(torch, args.dtype)
    ieee = dtype == torch.float32 and args.fp32_precision == 'highest'
    driver.set_active(_TargetDriver(GPUTarget('cuda', args.arch, 32)))

    seen, errors, spills, oversized = set(), 0, 0, 0
    limit = SHARED_LIMIT[args.arch]
    print(f'Triton {triton.__version__}, sm_{args.arch}, {args.dtype}'
          f'{" (IEEE dots)" if ieee else " (tf32 dots)" if dtype == torch.float32 else ""}'
          f'{", settings " + args.config if overrides else ""}\n')
    print('| case | stage | kernel | L | head dim | regs | spill B | shared B | instr/warp |')
    print('|---|---|---|---|---|---|---|---|---|')
    for case in cases:
        for layer in stage_shapes(case, dtype, args.arch, overrides):
            for launch in stage_launches(layer, dtype, ieee, args.arch, overrides):
                name = launch.kernel.fn.__name__.strip('_').replace('_kernel', '')
                key = (name, tuple(sorted(launch.constexprs.items())))
                if key in seen:
                    continue
                seen.add(key)
                label = f'| {"shape" if case == args.shape else case} | {layer.stage} | {kernel_label(launch)} | ' \
                        f'{launch.constexprs["L"]} | {launch.constexprs["HD"]} |'
                try:
                    regs, spill, shared, instr = measure(compile_only(launch, args.arch), tools)
                except Exception as e:  # noqa: BLE001 (any compile failure is reported, then the exit code says it)
                    errors += 1
                    print(f'{label} compile error: {type(e).__name__}: {str(e).strip().splitlines()[-1][:120]} |||||',
                          flush=True)
                    continue
                spills += spill > 0
                oversized += shared > limit
                print(f'{label} {regs} | {spill} | {shared}{" (over " + str(limit) + ")" if shared > limit else ""} | '
                      f'{instr} |', flush=True)
    print(f'\nSUMMARY triton={triton.__version__} arch=sm_{args.arch} dtype={args.dtype} kernels={len(seen)} '
          f'errors={errors} spills={spills} over_shared={oversized}')
    return 1 if errors or spills or oversized else 0


if __name__ == '__main__':
    sys.exit(run_main(main))

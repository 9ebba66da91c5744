"""The kernels' self-test for a user's GPU (``python -m rmt --self-test``, ``scripts/gpu_check.py``' first step).

Every kernel configuration (stage shape, dtype) of the RMT variants at the given image sizes runs forward
and backward on the Triton kernels alone (the op's own check switched off) and is compared with the float64
reference path, with the tolerances of :mod:`rmt.attention.verify`; the report is a table a user can paste
into an issue.
"""
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..attention import AttentionPlan, kernels, masa_attention
from ..attention.backends import _ieee
from ..attention.triton_op import kernel_failures
from ..attention.verify import compare, set_kernel_verification, tolerance
from ..model import MODEL_ARGS
from ..position import RelPos

__all__ = ['DETECTION_SIZE', 'stage_shapes', 'self_test']

DETECTION_SIZE = (800, 1344)  # a COCO image resized to 1333x800 and padded to a multiple of 32


def stage_shapes(model: str, height: int, width: int):
    """(stage, H, W, C, heads, decomposed, heads_range) of the four stages of ``model`` (a name in
    :data:`rmt.model.MODEL_ARGS`) for a ``height`` x ``width`` px image: the stem divides by 4, each
    later stage by 2 (rounding up)."""
    args = MODEL_ARGS[model]
    h, w = -(-height // 4), -(-width // 4)
    for i, (dim, n, decomposed, heads_range) in enumerate(
            zip(args['embed_dims'], args['num_heads'], args['decomposed'], args['heads_ranges'])):
        if i:
            h, w = -(-h // 2), -(-w // 2)
        yield i + 1, h, w, dim, n, decomposed, heads_range


def _self_test_case(H: int, W: int, C: int, n: int, decomposed: bool, heads_range: float, dtype: torch.dtype,
                    device: torch.device, batch: int):
    """(largest error of the output and the gradients against float64, the failure reason or '') of one
    configuration on the kernels alone."""
    relpos = RelPos(C, n, 2, heads_range)
    g = torch.Generator(device='cpu').manual_seed(H * 1000 + W)
    q, k, v, lce, grad = [torch.randn(batch, H, W, C, generator=g).to(device) for _ in range(5)]
    failures = len(kernel_failures())
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, lce)]
    out = masa_attention(*inputs[:3], inputs[3] * 1, relpos.build([H, W], device, torch.float32, False),
                         AttentionPlan('triton', torch.float32, False), n, decomposed)[0]
    got = (out,) + torch.autograd.grad(out, inputs[:3], grad.to(dtype))
    if len(kernel_failures()) > failures:
        return float('nan'), list(kernel_failures().values())[-1]
    ref = [t.double().requires_grad_() for t in (q, k, v, lce)]
    want = masa_attention(*ref[:3], ref[3] * 1, relpos.build([H, W], device, torch.float64, not decomposed),
                          AttentionPlan('reference', torch.float64, not decomposed), n, decomposed)[0]
    want = (want,) + torch.autograd.grad(want, ref[:3], grad.double())
    error, mismatch = compare(dict(zip(('output', 'dq', 'dk', 'dv'), zip(got, want))), tolerance(dtype, _ieee(dtype)),
                              n)
    return error, str(mismatch) if mismatch else ''


def self_test(models: Sequence[str] = ('rmt_t', 'rmt_s', 'rmt_b', 'rmt_l'),
              sizes: Sequence[Tuple[int, int]] = ((224, 224), DETECTION_SIZE),
              dtypes: Optional[Sequence[torch.dtype]] = None, device: str = 'cuda', batch: int = 2,
              out=None) -> int:
    """Run every kernel configuration (stage shape) of ``models`` at ``sizes`` (height, width) px in
    ``dtypes`` (default: bfloat16, float16 and float32 on CUDA; float32 in Triton's CPU interpreter,
    whose bfloat16 dots are wrong), forward and backward on the kernels alone, against the float64
    reference path; print a report to ``out`` (stdout). Returns the exit status: 0 when every
    configuration passed or nothing can run here (one line says why), 1 when one failed."""
    out = out or sys.stdout
    device = torch.device(device)
    if device.type == 'cpu' and not kernels.interpreting():
        print('rmt self-test: no GPU here (and TRITON_INTERPRET is not set): the Triton kernels do not run on '
              'this machine, nothing to test', file=out)
        return 0
    reason = kernels.unsupported_reason(device, torch.float32, 16)
    if device.type == 'cuda' and not torch.cuda.is_available():
        reason = 'no CUDA device'
    if reason:
        print(f'rmt self-test: the Triton kernels do not run on {device} ({reason}): nothing to test', file=out)
        return 0
    if dtypes is None:
        dtypes = [torch.bfloat16, torch.float16, torch.float32] if device.type == 'cuda' else [torch.float32]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'Triton CPU interpreter'
    capability = '{}.{}'.format(*torch.cuda.get_device_capability(device)) if device.type == 'cuda' else '-'
    import triton  # importable wherever the kernels run
    print(f'rmt self-test: {name} ({device}), capability {capability}, torch {torch.__version__}, '
          f'triton {triton.__version__}', file=out)
    print('| stage shape | form | C | heads | dtype | models | max error | tolerance | result |', file=out)
    print('|---|---|---|---|---|---|---|---|---|', file=out)
    cases: Dict[Tuple, List[str]] = {}
    for model in models:
        for height, width in sizes:
            for _, H, W, C, n, decomposed, heads_range in stage_shapes(model, height, width):
                for dtype in dtypes:
                    cases.setdefault((H, W, C, n, decomposed, heads_range, dtype), []).append(model)
    previous = set_kernel_verification('off')  # the kernels alone: a checked op would return exact results
    failed = ran = 0
    try:
        for (H, W, C, n, decomposed, heads_range, dtype), names in cases.items():
            if kernels.unsupported_reason(device, dtype, C // n):
                continue
            ran += 1
            error, problem = _self_test_case(H, W, C, n, decomposed, heads_range, dtype, device, batch)
            failed += bool(problem)
            print(f'| {H}x{W} | {"decomposed" if decomposed else "full"} | {C} | {n} | '
                  f'{str(dtype).replace("torch.", "")} | {",".join(sorted(set(names)))} | {error:.1e} | '
                  f'{tolerance(dtype, _ieee(dtype)):.0e} | {"FAIL: " + problem if problem else "pass"} |',
                  file=out, flush=True)
    finally:
        set_kernel_verification(previous)
    print(f'rmt self-test: {ran - failed} of {ran} configurations passed'
          f'{"" if not failed else "; " + str(failed) + " FAILED"}', file=out)
    return 1 if failed else 0

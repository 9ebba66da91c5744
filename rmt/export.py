"""torch.export and ONNX export of RMT with dynamic batch, height and width.

The graph has no size-dependent branches when exported: the decay and rotary tables are computed
from the symbolic feature sizes (the per-size cache is bypassed under export) and every stage uses
``scaled_dot_product_attention`` with a materialised decay mask (``select_attn_impl`` picks 'sdpa'
while exporting). One exported program therefore serves every input size in its range.

Smallest input: 33 px per side. The stem and the three downsampling convs (stride 2, padding 1)
take a side of s pixels to ceil(s / 32) tokens in the last stage; export specialises any dimension
that equals 1, so every stage must stay at least 2 tokens wide, which is s >= 33. Eager models
accept any size.

Example::

    import timm, torch, rmt
    from rmt.export import export_program, export_onnx
    model = timm.create_model('rmt_t').eval()
    program = export_program(model)                      # torch.export.ExportedProgram
    program.module()(torch.randn(2, 3, 320, 256))        # any batch, any size >= 33 px
    export_onnx(program, 'rmt_t.onnx')                   # inputs named (batch, 3, height, width)
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

__all__ = ['MIN_SIZE', 'MAX_SIZE', 'DEFAULT_OPSET', 'dynamic_shapes', 'export_program', 'export_onnx',
           'max_abs_diff']

MIN_SIZE = 33
MAX_SIZE = 8192
DEFAULT_OPSET = 18


def dynamic_shapes(
        dynamic_batch: bool = True,
        min_size: int = MIN_SIZE,
        max_size: int = MAX_SIZE,
        max_batch: int = 1024,
) -> Dict[str, Dict[int, Any]]:
    """``dynamic_shapes`` for the model's input ``x`` (B, C, H, W): batch (optional), height and width."""
    if min_size < MIN_SIZE:
        raise ValueError(f'exported RMT needs inputs of at least {MIN_SIZE} px per side (see rmt.export), '
                         f'got min_size={min_size}')
    dims: Dict[int, Any] = {2: Dim('height', min=min_size, max=max_size), 3: Dim('width', min=min_size, max=max_size)}
    if dynamic_batch:
        dims[0] = Dim('batch', min=1, max=max_batch)
    return {'x': dims}


def _example(model: nn.Module, size: Sequence[int], batch: int) -> torch.Tensor:
    ref = next(model.parameters())
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return torch.randn(batch, first_conv.in_channels, *size, device=ref.device, dtype=ref.dtype)


def export_program(
        model: nn.Module,
        example: Optional[torch.Tensor] = None,
        dynamic_batch: bool = True,
        min_size: int = MIN_SIZE,
        max_size: int = MAX_SIZE,
) -> ExportedProgram:
    """``torch.export.export`` of ``model`` (put in eval mode) with dynamic batch, height and width.

    ``example`` is the input traced with (default: batch 2, 3 x 224 x 224 random; batch and sides must
    not be 1, which export would specialise). Works for classifiers and for ``features_only`` backbones
    (the program then returns the list of stage features).
    """
    model.eval()
    if example is None:
        example = _example(model, (224, 224), 2)
    if dynamic_batch and example.shape[0] == 1:
        raise ValueError('trace a dynamic batch with an example batch of at least 2 (export specialises size 1)')
    with torch.no_grad():
        return torch.export.export(model, (example,),
                                   dynamic_shapes=dynamic_shapes(dynamic_batch, min_size, max_size))


def export_onnx(
        program: Union[ExportedProgram, nn.Module],
        path: Optional[str] = None,
        opset: int = DEFAULT_OPSET,
        dynamic_batch: bool = True,
        optimize: bool = True,
):
    """ONNX export (dynamo exporter) of an exported program, or of a model via :func:`export_program`.

    The input is named ``x`` with dims (batch, C, height, width); outputs are ``logits`` for a classifier,
    ``features.0`` ... for a features_only backbone. Saves to ``path`` when given; returns the
    ``torch.onnx.ONNXProgram``.
    """
    if opset < 17:
        raise ValueError(f'opset {opset} is too old: use 17 or later')
    if not isinstance(program, ExportedProgram):
        program = export_program(program, dynamic_batch=dynamic_batch)
    num_outputs = len(program.graph_signature.user_outputs)
    output_names = ['logits'] if num_outputs == 1 else [f'features.{i}' for i in range(num_outputs)]
    onnx_program = torch.onnx.export(
        program, dynamo=True, opset_version=opset, input_names=['x'], output_names=output_names,
        optimize=optimize, verbose=False)
    shape = onnx_program.model.graph.inputs[0].shape
    names = {2: 'height', 3: 'width'}
    if dynamic_batch:
        names[0] = 'batch'
    onnx_program.rename_axes({shape[i]: name for i, name in names.items() if not isinstance(shape[i], int)})
    if path is not None:
        onnx_program.save(path)
    return onnx_program


def _as_list(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [torch.as_tensor(o) for o in out]


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (tensors, arrays, or lists of them)."""
    a, b = _as_list(a), _as_list(b)
    if len(a) != len(b):
        raise ValueError(f'{len(a)} outputs vs {len(b)}')
    diffs = []
    for x, y in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f'shape {tuple(x.shape)} vs {tuple(y.shape)}')
        diffs.append((x.detach().float().cpu() - y.detach().float().cpu()).abs().max().item())
    return max(diffs)

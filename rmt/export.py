"""torch.export and ONNX export of RMT with dynamic batch, height and width.

The graph has no size-dependent branches when exported or traced: the decay and rotary tables are
computed from the symbolic (or traced) feature sizes, the per-size cache is bypassed, the rotary
shift is real-valued, and every stage uses ``scaled_dot_product_attention`` with a materialised
decay bias (:func:`rmt.plan_attention` picks 'sdpa' while exporting or tracing). One exported program
therefore serves every input size in its range.

Two ONNX exporters: :func:`export_onnx` (torch's dynamo exporter, from an exported program, opset
18 or later) and :func:`export_onnx_traced` (the classic TorchScript-tracing exporter, opset 17 or
later, as ``torch.onnx.export(..., dynamo=False)`` and ``timm.utils.onnx.onnx_export`` use it).

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
    export_onnx_traced(model, 'rmt_t_opset17.onnx', opset=17)
"""
import contextlib
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from timm.layers import get_device_dtype

from .blocks import fold_residual_kernels

__all__ = ['MIN_SIZE', 'MAX_SIZE', 'DEFAULT_OPSET', 'DYNAMO_MIN_OPSET', 'dynamic_shapes', 'export_program',
           'export_onnx', 'export_onnx_traced', 'export_openvino', 'compile_openvino', 'export_executorch',
           'explicit_attention', 'xnnpack_delegation', 'load_executorch', 'export_coreml', 'onnx_opset', 'max_abs_diff']

MIN_SIZE = 33
MAX_SIZE = 8192
DEFAULT_OPSET = 18
# torch's dynamo exporter writes opset 18; its conversion to 17 fails on RMT's graph (and keeps 18)
DYNAMO_MIN_OPSET = 18


def dynamic_shapes(
        dynamic_batch: bool = True,
        min_size: int = MIN_SIZE,
        max_size: int = MAX_SIZE,
        max_batch: int = 1024,
        dynamic_size: bool = True,
) -> Dict[str, Dict[int, Any]]:
    """``dynamic_shapes`` for the model's input ``x`` (B, C, H, W): batch and height and width (each optional)."""
    if min_size < MIN_SIZE:
        raise ValueError(f'exported RMT needs inputs of at least {MIN_SIZE} px per side (see rmt.export), '
                         f'got min_size={min_size}')
    dims: Dict[int, Any] = {}
    if dynamic_size:
        dims.update({2: Dim('height', min=min_size, max=max_size), 3: Dim('width', min=min_size, max=max_size)})
    if dynamic_batch:
        dims[0] = Dim('batch', min=1, max=max_batch)
    return {'x': dims}


def _example(model: nn.Module, size: Sequence[int], batch: int) -> torch.Tensor:
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return torch.randn(batch, first_conv.in_channels, *size, **get_device_dtype(model))


def _output_names(num_outputs: int) -> List[str]:
    return ['logits'] if num_outputs == 1 else [f'features.{i}' for i in range(num_outputs)]


def export_program(
        model: nn.Module,
        example: Optional[torch.Tensor] = None,
        dynamic_batch: bool = True,
        min_size: int = MIN_SIZE,
        max_size: int = MAX_SIZE,
        dynamic_size: bool = True,
        max_batch: int = 1024,
) -> ExportedProgram:
    """``torch.export.export`` of ``model`` (put in eval mode) with dynamic batch, height and width.

    ``example`` is the input traced with (default: batch 2, 3 x 224 x 224 random; a dynamic batch and the
    sides must not be 1, which export would specialise). Works for classifiers and for ``features_only``
    backbones (the program then returns the list of stage features). ``dynamic_batch=False`` fixes the
    batch to the example's and ``dynamic_size=False`` height and width (what fixed-size models such as
    Swin need, and ExecuTorch and Core ML); any combination exports.

    Checks that torch.export cannot prove for every size in the range (divisibility of sizes such as
    ``20 * ((h - 1) // 4 + 1)`` by ``(h - 1) // 4 + 1`` when a static dimension meets a dynamic one,
    pytorch#124507) are kept as run-time assertions (``prefer_deferred_runtime_asserts_over_guards``),
    which hold for every size; without that flag, ``torch.export.export`` refuses a static batch or a
    static side next to a dynamic one.
    """
    model.eval()
    fold_residual_kernels(model)
    if example is None:
        example = _example(model, (224, 224), 2 if dynamic_batch else 1)
    if dynamic_batch and example.shape[0] == 1:
        raise ValueError('trace a dynamic batch with an example batch of at least 2 (export specialises size 1)')
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(
            dynamic_batch, min_size, max_size, max_batch, dynamic_size),
            prefer_deferred_runtime_asserts_over_guards=True)


def export_onnx(
        program: Union[ExportedProgram, nn.Module],
        path: Optional[str] = None,
        opset: int = DEFAULT_OPSET,
        dynamic_batch: bool = True,
        optimize: bool = False,
        dynamic_size: bool = True,
):
    """ONNX export (dynamo exporter) of an exported program, or of a model via :func:`export_program`.

    The input is named ``x`` with dims (batch, C, height, width); outputs are ``logits`` for a classifier,
    ``features.0`` ... for a features_only backbone. Saves to ``path`` when given; returns the
    ``torch.onnx.ONNXProgram``. Opset 18 or later; :func:`export_onnx_traced` writes opset 17.

    ``optimize`` runs onnxscript's graph optimizer on the file. It is off by default: for ``rmt_s`` it
    took 67 of the export's 121 s, and ONNX Runtime, which optimizes the graph itself when it loads it,
    ran the unoptimized file at the same speed (131 vs 136 ms at batch 1, 2 threads, one run).
    """
    if opset < DYNAMO_MIN_OPSET:
        raise ValueError(f'the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later, not {opset}: use '
                         f'export_onnx_traced for opset 17')
    if not isinstance(program, ExportedProgram):
        program = export_program(program, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
    output_names = _output_names(len(program.graph_signature.user_outputs))
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


def export_onnx_traced(
        model: nn.Module,
        path: str,
        opset: int = 17,
        example: Optional[torch.Tensor] = None,
        dynamic_batch: bool = True,
        dynamic_size: bool = True,
) -> None:
    """ONNX export with torch's classic exporter (``torch.onnx.export(..., dynamo=False)``, TorchScript tracing).

    Same input and output names and dynamic dims as :func:`export_onnx`; ``example`` (default 2 x C x
    224 x 224) is the input traced. For opset 17, which the dynamo exporter cannot write for RMT.
    """
    if opset < 17:
        raise ValueError(f'opset {opset} is too old: use 17 or later')
    model.eval()
    fold_residual_kernels(model)
    if example is None:
        example = _example(model, (224, 224), 2)
    with torch.no_grad():
        out = model(example)
    output_names = _output_names(len(out) if isinstance(out, (list, tuple)) else 1)
    axes: Dict[str, Dict[int, str]] = {'x': {2: 'height', 3: 'width'} if dynamic_size else {}}
    if dynamic_batch:
        axes['x'][0] = 'batch'
        axes.update({name: {0: 'batch'} for name in output_names})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings about Python values that are the same at every size
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset, input_names=['x'],
                          output_names=output_names, dynamic_axes=axes)


def export_openvino(source: Union[str, ExportedProgram, nn.Module], path: Optional[str] = None,
                    example: Optional[torch.Tensor] = None):
    """OpenVINO model (``openvino.Model``) from an ONNX file, an exported program or a module.

    An ONNX file or a program keeps its dynamic dims; a module is converted through
    :func:`export_program` (dynamic batch, height and width; ``example`` as there). Saves
    ``path`` (``.xml`` plus ``.bin``) with float32 weights when given. Run it with
    :func:`compile_openvino`.
    """
    import openvino as ov
    if isinstance(source, nn.Module):
        source = export_program(source, example)
    ov_model = ov.convert_model(source)
    if path is not None:
        ov.save_model(ov_model, path, compress_to_fp16=False)  # OpenVINO halves the saved weights by default
    return ov_model


def compile_openvino(source, threads: Optional[int] = None, shape: Optional[Sequence[int]] = None):
    """An OpenVINO model or ``.xml`` / ``.onnx`` file compiled for the CPU in float32.

    OpenVINO computes in bfloat16 by default on CPUs that have it (5e-3 off eager's float32 logits
    on the tests' small model); float32 keeps the outputs within 1e-5 of eager. ``threads``: inference threads
    (default: OpenVINO's). ``shape`` (B, C, H, W) fixes the input shape of a dynamic model before
    compiling: the size arithmetic and position tables then fold into constants (``rmt_s`` at
    1x3x224x224 ran 1.7x faster than the dynamic model, measured side by side). Call the result with a
    NumPy batch: ``compiled(x)[0]``.
    """
    import openvino as ov
    core = ov.Core()
    if shape is not None:
        source = core.read_model(str(source)) if isinstance(source, (str, os.PathLike)) else source.clone()
        source.reshape(list(shape))
    config: Dict[str, Any] = {'INFERENCE_PRECISION_HINT': 'f32'}
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    return core.compile_model(source, 'CPU', config)


def export_executorch(
        source: Union[ExportedProgram, nn.Module],
        path: Optional[str] = None,
        example: Optional[torch.Tensor] = None,
):
    """ExecuTorch program lowered to XNNPACK (CPU), for the fixed batch and size of ``example``.

    ``source``: a model (exported here at the shape of ``example``, default 1 x C x 224 x 224) or an
    exported program. Sizes are fixed because XNNPACK reshapes take one dynamic dimension and RMT's
    reshapes span height and width; a dynamic batch lowers, but ExecuTorch 1.5's runtime then
    refuses inputs above batch 3 whatever the bound. Ops XNNPACK does not take run in ExecuTorch's
    portable kernels. Saves the ``.pte`` to ``path`` when given; returns the lowered
    ``EdgeProgramManager`` (see :func:`xnnpack_delegation`). Run the file with :func:`load_executorch`.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    if isinstance(source, nn.Module):
        if example is None:
            example = _example(source, (224, 224), 1)
        with explicit_attention(source):
            source = export_program(source, example, dynamic_batch=False, dynamic_size=False)
    lowered = to_edge_transform_and_lower(source, partitioner=[XnnpackPartitioner()])
    if path is not None:
        with open(path, 'wb') as f:
            f.write(lowered.to_executorch().buffer)
    return lowered


@contextlib.contextmanager
def explicit_attention(model: nn.Module):
    """Within the block, every MaSA layer of ``model`` takes the ``reference`` path: ``softmax(q k^T * scale +
    bias) v`` as matmul, add, softmax and matmul, ops XNNPACK delegates, where ``scaled_dot_product_attention``
    lowers to a masked softmax (eq, any, where, full_like) that runs in ExecuTorch's portable kernels."""
    from .attention import MaSA
    layers = [m for m in model.modules() if isinstance(m, MaSA)]
    saved = [m.attn_impl for m in layers]
    for m in layers:
        m.attn_impl = 'reference'
    try:
        yield
    finally:
        for m, impl in zip(layers, saved):
            m.attn_impl = impl


def xnnpack_delegation(lowered) -> Dict[str, Tuple[int, int]]:
    """Per edge op of a lowered program (:func:`export_executorch`): (nodes in XNNPACK, nodes left out).

    Ops left out run in ExecuTorch's portable kernels, between delegated subgraphs.
    """
    from executorch.devtools.backend_debug import get_delegation_info
    frame = get_delegation_info(lowered.exported_program().graph_module).get_operator_delegation_dataframe()
    return {row.op_type: (int(row.occurrences_in_delegated_graphs), int(row.occurrences_in_non_delegated_graphs))
            for row in frame.itertuples() if row.op_type not in ('Total', 'getitem', 'alloc')}


def load_executorch(path: str, threads: Optional[int] = None):
    """The ``forward`` method of a ``.pte`` file, run with ``method.execute([x])`` (a list of outputs).

    ``threads`` sets the XNNPACK thread pool of this process (shared by every loaded program).
    """
    from executorch.runtime import Runtime
    if threads:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        _unsafe_reset_threadpool(threads)
    return Runtime.get().load_program(path).load_method('forward')


def export_coreml(model: nn.Module, path: Optional[str] = None, example: Optional[torch.Tensor] = None):
    """Core ML ML program (``coremltools.models.MLModel``) of ``model`` at the fixed size of ``example``.

    Converted from :func:`export_program` (batch and size fixed; default example 1 x C x 224 x 224)
    with float32 compute, for iOS 17 / macOS 14 and later. Conversion runs anywhere coremltools
    installs; running the model needs macOS. Saves the ``.mlpackage`` to ``path`` when given. Raises
    coremltools' error where an op cannot be converted.
    """
    import coremltools as ct
    if example is None:
        example = _example(model, (224, 224), 1)
    program = export_program(model, example, dynamic_batch=False, dynamic_size=False).run_decompositions({})
    _drop_aliases(program)
    mlmodel = ct.convert(program, convert_to='mlprogram', compute_precision=ct.precision.FLOAT32,
                         minimum_deployment_target=ct.target.iOS17)
    if path is not None:
        mlmodel.save(path)
    return mlmodel


def _drop_aliases(program) -> None:
    """Replace ``aten.alias`` nodes (identity views left where a reshape keeps the shape at fixed sizes) by
    their input: coremltools converts no ``alias``, and an inference graph never writes through one."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == 'call_function' and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()


def onnx_opset(path: str) -> int:
    """The default-domain opset an ONNX file was written for."""
    import onnx
    proto = onnx.load(path, load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))


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

"""Deployment runtimes beyond ONNX Runtime: OpenVINO (CPU), ExecuTorch (XNNPACK) and Core ML conversion.

Each test skips where its runtime is not installed. The small released-format configuration (decomposed
and full-attention stages, with and without LayerScale) is exported once and must reproduce the
released code's logits (the fixtures) and the eager model within 1e-4 at sizes and batches it was not
exported at; ExecuTorch programs have a fixed shape, so each shape is its own export.
"""
import pytest
import timm
import torch

from rmt.export import (
    compile_openvino, export_coreml, export_executorch, export_onnx_traced, export_openvino, export_program,
    load_executorch, max_abs_diff, xnnpack_delegation)
from tests.helpers import SMALL_CHECKPOINT, SMALL_CONFIG, load_small, script

pytestmark = pytest.mark.slow  # exports take seconds to a minute each

EXPORT_EXAMPLE = (2, 3, 128, 96)
UNSEEN = [(1, 3, 97, 161), (3, 3, 320, 256)]


@pytest.fixture(scope='module')
def small():
    return load_small()


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _assert_reproduces(run, small, expected):
    """``run(x)`` gives the released logits at the fixture sizes and eager's at unseen batches and sizes."""
    for size, ref in expected.items():  # 64x64, 96x80, 70x50, batch 2
        assert max_abs_diff(run(ref['input']), ref['logits']) < 1e-4, size
    torch.manual_seed(3)
    for shape in UNSEEN:
        x = torch.randn(*shape)
        assert max_abs_diff(run(x), _eager(small, x)) < 1e-4, shape


def test_openvino_from_exported_program_reproduces_released_logits_at_any_batch_and_size(small, expected, tmp_path):
    pytest.importorskip('openvino')
    torch.manual_seed(0)
    program = export_program(small, torch.randn(*EXPORT_EXAMPLE))
    export_openvino(program, str(tmp_path / 'small.xml'))  # saved with float32 weights, compiled from the file
    compiled = compile_openvino(str(tmp_path / 'small.xml'), threads=1)
    assert str(compiled.inputs[0].partial_shape) == '[?,3,?,?]'
    _assert_reproduces(lambda x: compiled(x.numpy()).to_tuple(), small, expected)


def test_openvino_from_classic_onnx_reproduces_released_logits_at_any_batch_and_size(small, expected, tmp_path):
    pytest.importorskip('openvino')
    path = str(tmp_path / 'small.onnx')
    export_onnx_traced(small, path, example=torch.randn(*EXPORT_EXAMPLE))
    compiled = compile_openvino(path, threads=1)
    _assert_reproduces(lambda x: compiled(x.numpy()).to_tuple(), small, expected)


def test_openvino_compiled_at_a_fixed_shape_reproduces_released_logits(small, expected, tmp_path):
    pytest.importorskip('openvino')
    path = str(tmp_path / 'small.onnx')
    export_onnx_traced(small, path, example=torch.randn(*EXPORT_EXAMPLE))
    ref = expected['70x50']
    compiled = compile_openvino(path, threads=1, shape=ref['input'].shape)
    assert str(compiled.inputs[0].partial_shape) == '[2,3,70,50]'
    assert max_abs_diff(compiled(ref['input'].numpy()).to_tuple(), ref['logits']) < 1e-4


def test_executorch_xnnpack_reproduces_released_logits(small, expected, tmp_path):
    pytest.importorskip('executorch')
    ref = expected['70x50']
    lowered = export_executorch(small, str(tmp_path / 'small.pte'), example=ref['input'])
    method = load_executorch(str(tmp_path / 'small.pte'), threads=1)
    assert max_abs_diff(method.execute([ref['input']]), ref['logits']) < 1e-4
    torch.manual_seed(4)
    x = torch.randn_like(ref['input'])
    assert max_abs_diff(method.execute([x]), _eager(small, x)) < 1e-4
    delegated = xnnpack_delegation(lowered)
    left_out = {op: counts[1] for op, counts in delegated.items() if counts[1]}
    # the projections, the attention (matmul, add, softmax: no masked softmax of sdpa's) and every
    # depthwise conv (their kernels constants) run in XNNPACK
    for op in ('aten_linear_default', 'aten_bmm_default', 'aten_convolution_default', 'aten__softmax_default',
               'aten_any_dim', 'aten_eq_scalar', 'aten_full_like_default', 'aten_logical_not_default'):
        assert op not in left_out, left_out
    assert delegated['aten_convolution_default'][0] == 3 * 6 + 4 + 3  # CPE, LCE, FFN of 6 blocks; stem; downsampling


def test_coreml_converts_a_timm_convnet_to_an_ml_program():
    pytest.importorskip('coremltools')
    torch.manual_seed(0)
    mlmodel = export_coreml(timm.create_model('test_convnext').eval(), example=torch.randn(1, 3, 64, 64))
    assert mlmodel.get_spec().WhichOneof('Type') == 'mlProgram'


def test_coreml_converts_rmt_to_an_ml_program(small):
    pytest.importorskip('coremltools')
    mlmodel = export_coreml(small, example=torch.randn(1, 3, 64, 64))
    assert mlmodel.get_spec().WhichOneof('Type') == 'mlProgram'


def test_export_script_checks_openvino_against_eager(tmp_path):
    pytest.importorskip('openvino')
    proc = script('export', '--official-config', SMALL_CONFIG, '--checkpoint', SMALL_CHECKPOINT, '--out-dir', tmp_path,
                  '--formats', 'openvino', '--export-size', '64x64', '--check-sizes', '70x50')
    assert '| max abs diff, torch.export | max abs diff, OpenVINO |' in proc.stdout
    assert (tmp_path / 'rmt_t.xml').is_file() and (tmp_path / 'rmt_t.bin').is_file()
    assert 'all outputs within 0.0001 of eager' in proc.stdout


"""torch.export and ONNX (onnxruntime, CPU) round trips with dynamic batch, height and width.

Programs are exported once from a 2 x 3 x 128 x 96 example and then run at other batch sizes and at
sizes never seen at export time; they must reproduce the released code's outputs (the fixtures) and
the eager model within 1e-4. The small configuration has decomposed and full-attention stages, with
and without LayerScale, like the released variants; ``scripts/export.py --model rmt_X``
checks the full variants the same way (minutes each, so not in the suite). The classic
(TorchScript-tracing) ONNX exporter is tested on the full ``rmt_t``: it takes seconds.
"""
import warnings

import numpy as np
import pytest
import timm
import torch

from rmt.export import MIN_SIZE, export_onnx, export_onnx_traced, export_program, max_abs_diff, onnx_opset
from tests.helpers import SMALL_CHECKPOINT, SMALL_CONFIG, assert_close, load_small, script, small_kwargs

pytestmark = pytest.mark.slow  # end-to-end runs and subprocesses


EXPORT_EXAMPLE = (2, 3, 128, 96)
UNSEEN = [(1, 3, 97, 161), (3, 3, 320, 256)]


@pytest.fixture(scope='module')
def small():
    return load_small()


@pytest.fixture(scope='module')
def rmt_t():
    torch.manual_seed(0)
    return timm.create_model('rmt_t').eval()


@pytest.fixture(scope='module')
def small_program(small):
    torch.manual_seed(0)
    return export_program(small, torch.randn(*EXPORT_EXAMPLE))


def _eager(model, x, impl='auto'):
    model.set_attn_impl(impl)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.set_attn_impl('auto')


def test_exported_program_reproduces_released_logits_at_unseen_sizes(small, small_program, expected):
    run = small_program.module()
    for size, ref in expected.items():  # 64x64, 96x80, 70x50: none is the export size
        with torch.no_grad():
            got = run(ref['input'])
        assert max_abs_diff(got, ref['logits']) < 1e-4, size
        assert max_abs_diff(got, _eager(small, ref['input'])) < 1e-4, size


def test_exported_program_has_dynamic_batch_height_width_down_to_33px(small, small_program):
    shape = [n for n in small_program.graph.nodes if n.op == 'placeholder' and n.name == 'x'][0].meta['val'].shape
    assert [isinstance(d, int) for d in shape] == [False, True, False, False]
    run = small_program.module()
    torch.manual_seed(1)
    for b, h, w in ((1, MIN_SIZE, 200), (3, 161, 97), (5, 40, 40)):
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            got = run(x)
        assert got.shape == (b, 10)
        # against the released computation spelled out (explicit matmuls and softmax)
        assert max_abs_diff(got, _eager(small, x, 'reference')) < 1e-4, (b, h, w)
    with pytest.raises(AssertionError, match='>= 33'):
        run(torch.randn(1, 3, 32, 64))


def test_onnx_onnxruntime_reproduces_eager_at_unseen_sizes(small, small_program, expected, tmp_path):
    import onnxruntime as ort

    path = tmp_path / 'rmt_small.onnx'
    export_onnx(small_program, str(path), opset=18)
    assert onnx_opset(str(path)) == 18
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    for size, ref in expected.items():
        got = session.run(None, {'x': ref['input'].numpy()})[0]
        assert max_abs_diff(torch.from_numpy(got), ref['logits']) < 1e-4, size
    torch.manual_seed(2)
    x = torch.randn(1, 3, 161, 97)
    got = session.run(None, {'x': x.numpy()})[0]
    assert np.isfinite(got).all()
    assert max_abs_diff(torch.from_numpy(got), _eager(small, x)) < 1e-4



def _onnxruntime(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def _assert_matches_eager_at_unseen_sizes(session, model):
    torch.manual_seed(3)
    for shape in UNSEEN:
        x = torch.randn(*shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == (shape[0], model.num_classes)
        assert max_abs_diff(torch.from_numpy(got), _eager(model, x)) < 1e-4, shape


def test_classic_onnx_exporter_takes_rmt_t_with_dynamic_batch_height_width(rmt_t, tmp_path):
    path = tmp_path / 'rmt_t.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings
        torch.onnx.export(rmt_t, (torch.randn(2, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=['x'], output_names=['logits'],
                          dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch'}})
    session = _onnxruntime(path)
    assert session.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    _assert_matches_eager_at_unseen_sizes(session, rmt_t)


def test_timm_onnx_export_takes_rmt_t_with_dynamic_size(rmt_t, tmp_path):
    from timm.utils.onnx import onnx_export
    path = tmp_path / 'rmt_t.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        onnx_export(rmt_t, str(path), example_input=torch.randn(2, 3, 224, 224), dynamic_size=True, opset=17,
                    check=True)  # check: onnx's full model checker
    session = _onnxruntime(path)
    assert session.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    _assert_matches_eager_at_unseen_sizes(session, rmt_t)


def test_exportable_model_uses_explicit_matmul_attention():
    model = timm.create_model('rmt_t', depths=(1, 1, 1, 1), exportable=True).eval()
    assert all(stage.attn_impl == 'reference' for stage in model.stages)  # timm's use_fused_attn() is off


def test_exported_depthwise_convs_take_their_kernels_as_constants(small_program):
    """The CPE and FFN convs' residual-folded kernels are stored tensors, not graph values (XNNPACK delegates
    only convs with constant weights)."""
    graph = small_program.graph
    convs = [n for n in graph.nodes if n.op == 'call_function' and n.target == torch.ops.aten.conv2d.default]
    depthwise = [n for n in convs if len(n.args) == 7 and n.args[6] > 1]
    assert len(depthwise) == 3 * 6  # CPE, LCE and FFN conv of each of the small config's 6 blocks
    computed = [n.name for n in convs if n.args[1].op != 'placeholder']
    assert computed == [], computed


def test_eager_ignores_a_stale_folded_kernel():
    from rmt.blocks import CPE
    torch.manual_seed(0)
    cpe = CPE(8)
    cpe.fold()
    with torch.no_grad():
        cpe.conv.weight.mul_(2)  # after folding: eager (training, fine-tuning) must follow the weights
    x = torch.randn(1, 5, 6, 8)
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), cpe.conv.weight, cpe.conv.bias, padding=1, groups=8)
    assert torch.allclose(cpe(x), want.permute(0, 2, 3, 1) + x, atol=1e-6)


def test_traced_graph_holds_no_complex_numbers(rmt_t):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(rmt_t, torch.randn(1, 3, 64, 64), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not {k for k in kinds if 'complex' in k}, kinds


def test_classic_exporter_reproduces_released_logits_at_opset_17(small, expected, tmp_path):
    path = tmp_path / 'small.onnx'
    export_onnx_traced(small, str(path), opset=17, example=torch.randn(*EXPORT_EXAMPLE))
    assert onnx_opset(str(path)) == 17
    session = _onnxruntime(path)
    for size, ref in expected.items():
        got = session.run(None, {'x': ref['input'].numpy()})[0]
        assert max_abs_diff(torch.from_numpy(got), ref['logits']) < 1e-4, size


def test_dynamo_onnx_export_refuses_opsets_it_cannot_write(small_program):
    with pytest.raises(ValueError, match='export_onnx_traced for opset 17'):
        export_onnx(small_program, opset=17)


def test_export_script_writes_and_reports_the_opset_asked_for(tmp_path):
    proc = script('export', '--official-config', SMALL_CONFIG, '--checkpoint', SMALL_CHECKPOINT, '--out-dir', tmp_path,
                  '--opset', '17', '--export-size', '64x64', '--check-sizes', '64x64', '70x50')
    assert 'ONNX (opset 17, classic exporter)' in proc.stdout and 'Traceback' not in proc.stderr
    assert onnx_opset(str(tmp_path / 'rmt_t.onnx')) == 17
    assert 'all outputs within 0.0001 of eager' in proc.stdout


@pytest.mark.parametrize('dynamic_batch,dynamic_size', [(False, True), (True, False), (False, False)],
                         ids=['static-batch', 'static-size', 'static'])
def test_every_combination_of_static_and_dynamic_batch_and_size_exports_and_matches_eager(
        small, dynamic_batch, dynamic_size):
    torch.manual_seed(0)
    example = torch.randn(2 if dynamic_batch else 1, 3, 96, 80)
    run = export_program(small, example, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size).module()
    batches = [1, 3] if dynamic_batch else [1]
    sizes = [(70, 90), (128, 64)] if dynamic_size else [(96, 80)]
    for b in batches:
        for h, w in sizes:
            x = torch.randn(b, 3, h, w)
            with torch.no_grad():
                assert max_abs_diff(run(x), _eager(small, x)) < 1e-4, (b, h, w)


def test_static_batch_with_a_dynamic_height_exports_through_torch_export_with_deferred_checks(small):
    """pytorch#124507: torch.export cannot prove that 20 * ((h - 1) // 4 + 1) divides by (h - 1) // 4 + 1;
    with the checks deferred to run time it exports, and they hold at every height."""
    x = torch.randn(1, 3, 96, 80)
    program = torch.export.export(small, (x,), dynamic_shapes=({2: torch.export.Dim('height', min=64, max=512)},),
                                  prefer_deferred_runtime_asserts_over_guards=True)
    for h in (64, 130, 257):
        y = torch.randn(1, 3, h, 80)
        with torch.no_grad():
            assert max_abs_diff(program.module()(y), _eager(small, y)) < 1e-4, h


def test_default_onnx_exporter_from_a_batch_of_one_runs_every_batch(tmp_path):
    """timm#1844: torch.onnx.export with dynamic_axes from a batch-1 example; no view may keep the batch of 1.
    One block per stage (decomposed and full attention), the small configuration's widths."""
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    model = timm.create_model('rmt_t', **small_kwargs(depths=[1, 1, 1, 1])).eval()
    path = str(tmp_path / 'one_block.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (torch.randn(1, 3, 96, 80),), path, input_names=['x'], optimize=False,
                          dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}})  # the optimizer: half the time
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for size in [(1, 3, 96, 80), (2, 3, 96, 80), (3, 3, 70, 90)]:
        x = torch.randn(size)
        assert_close(session.run(None, {'x': x.numpy()})[0], _eager(model, x), atol=1e-4, name=str(size))


def test_export_script_fixes_the_batch_with_static_batch(tmp_path):
    proc = script('export', '--model', 'rmt_t', '--official-config', SMALL_CONFIG, '--static-batch', '--batch', '1',
                  '--out-dir', tmp_path, '--no-onnx', '--check-sizes', '70x90')
    assert 'traced at 1x3x224x224' in proc.stdout
    assert 'all outputs within 0.0001 of eager' in proc.stdout

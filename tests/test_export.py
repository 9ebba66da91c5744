"""torch.export and ONNX (onnxruntime, CPU) round trips with dynamic batch, height and width.

Programs are exported once from a 2 x 3 x 128 x 96 example and then run at other batch sizes and at
sizes never seen at export time; they must reproduce the released code's outputs (the fixtures) and
the eager model within 1e-4. The small configuration has decomposed and full-attention stages, with
and without LayerScale, like the released variants; ``scripts/export.py --model rmt_X``
checks the full variants the same way (minutes each, so not in the suite).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import rmt
from rmt.export import MIN_SIZE, export_onnx, export_program, max_abs_diff

FIXTURES = Path(__file__).parent / 'fixtures'
EXPORT_EXAMPLE = (2, 3, 128, 96)


@pytest.fixture(scope='module')
def expected():
    return torch.load(FIXTURES / 'official_small_expected.pt', weights_only=True)


@pytest.fixture(scope='module')
def small():
    cfg = rmt.official_config_to_kwargs(json.loads((FIXTURES / 'official_small_config.json').read_text()))
    return timm.create_model(
        'rmt_t', pretrained=True, **cfg,
        pretrained_cfg_overlay=dict(file=str(FIXTURES / 'official_small_checkpoint.pth'), num_classes=10)).eval()


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
    import onnx
    import onnxruntime as ort

    path = tmp_path / 'rmt_small.onnx'
    export_onnx(small_program, str(path), opset=18)
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')) >= 17
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


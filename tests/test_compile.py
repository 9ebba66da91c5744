"""torch.compile with fullgraph=True: no graph breaks, same numbers as eager.

Graph breaks are found by dynamo's capture whatever the backend, so the tests use 'aot_eager' and
skip inductor's code generation. The two configs cover both stage patterns (decomposed stages 1-2
as RMT-T, 1-3 as RMT-S/B/L) with layer scale in stages 3-4 (as RMT-B/L).
"""
import pytest
import timm
import torch

import rmt  # noqa: F401
from tests.helpers import small_kwargs

pytestmark = pytest.mark.slow  # end-to-end runs and subprocesses


@pytest.mark.parametrize('decomposed', [(True, True, False, False), (True, True, True, False)])
def test_compile_fullgraph_matches_eager(decomposed):
    model = timm.create_model('rmt_t', **small_kwargs(decomposed=decomposed)).eval()
    x = torch.randn(2, 3, 64, 48)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_keeps_masks_finite(dtype):
    model = timm.create_model('rmt_t', **small_kwargs()).eval()
    x = torch.randn(1, 3, 256, 192)  # decay distances up to 100 tokens in stage 1
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out = model(x)
    reference = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()

"""torch.compile with fullgraph=True: no graph breaks, same numbers as eager.

Graph breaks are found by dynamo's capture whatever the backend, so the tests use 'aot_eager' and
skip inductor's code generation. The two configs cover both stage patterns (decomposed stages 1-2
as RMT-T, 1-3 as RMT-S/B/L) with layer scale in stages 3-4 (as RMT-B/L).
"""
import pytest
import timm
import torch

import rmt  # noqa: F401
from tests.helpers import assert_close, small_kwargs

pytestmark = pytest.mark.slow  # end-to-end runs and subprocesses


@pytest.mark.parametrize('decomposed', [(True, True, False, False), (True, True, True, False)])
def test_compile_fullgraph_matches_eager(decomposed):
    model = timm.create_model('rmt_t', **small_kwargs(depths=(1, 1, 1, 1), decomposed=decomposed)).eval()
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


def compiled_graphs(fn, inputs):
    """How many graphs ``fn`` compiled while it ran on each of ``inputs`` (dynamo's count, whatever the backend)."""
    import torch._dynamo
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    for x in inputs:
        fn(x)
    return counters['stats']['unique_graphs']


# non-square first size: with a square one, dynamo's duck sizing makes H == W a guard (one more graph)
SIZES = [(96, 80), (128, 96), (112, 144)]


def test_one_dynamic_graph_trains_decomposed_and_full_stages_at_every_size():
    model = timm.create_model('rmt_t', **small_kwargs(depths=(1, 1, 1, 1), decomposed=(True, True, False, False)))
    compiled = torch.compile(model, dynamic=True, backend='aot_eager', fullgraph=True)
    losses = []

    def step(x):
        out = compiled(x)
        out.square().mean().backward()
        losses.append((out - model(x)).abs().max().item())

    assert compiled_graphs(step, [torch.randn(2, 3, h, w) for h, w in SIZES]) == 1
    assert max(losses) < 1e-4
    assert all(p.grad is not None for p in model.parameters())


def test_a_backbone_compiled_once_takes_detection_heights_in_two_graphs():
    """pytorch#121504: multi-scale inputs. The first size compiles a static graph, the second a dynamic one
    for every later size (PyTorch's conv backend choice adds one more where the stem's output crosses its
    size threshold, below these sizes)."""
    backbone = timm.create_model('rmt_t', features_only=True, **small_kwargs(depths=(1, 1, 1, 1))).eval()
    compiled = torch.compile(backbone, backend='aot_eager')
    with torch.no_grad():
        graphs = compiled_graphs(compiled, [torch.randn(1, 3, h, 96) for h in range(512, 801, 96)])
    assert graphs == 2


@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('decomposed', [False, True], ids=['full', 'decomposed'])
def test_masa_layers_compile_once_for_every_size(ndim, decomposed):
    layer = rmt.attention.MaSA(16, 2, ndim=ndim, decomposed=decomposed)
    compiled = torch.compile(layer, dynamic=True, backend='aot_eager', fullgraph=True)
    sizes = {1: [(9,), (14,), (20,)], 2: [(5, 7), (9, 6), (11, 13)], 3: [(3, 4, 5), (4, 6, 3), (5, 3, 7)]}[ndim]

    def step(x):
        out = compiled(x)
        out.sum().backward()
        assert_close(out, layer(x), atol=1e-5)

    assert compiled_graphs(step, [torch.randn((2,) + s + (16,)) for s in sizes]) == 1

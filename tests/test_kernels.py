"""The Triton MaSA kernels against the reference path: outputs, gradients, dispatch and compile.

Without a GPU they run in Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``); with one,
the same tests run the compiled kernels on CUDA, and the CUDA-only tests check half precision.
"""
import pytest
import timm
import torch

from rmt import kernels
from rmt.attention import decomposed_attention, full_attention, select_attn_impl
from rmt.decay import SpatialDecay, theta_shift
from tests.helpers import load_small

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
needs_kernels = pytest.mark.skipif(not kernels.supports(torch.empty(0, device=DEVICE), 16),
                                   reason='needs Triton, on CUDA or in its CPU interpreter')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available(),
                                reason='needs CUDA and Triton')


def tables_for(H, W, n, d, device=DEVICE, dtype=torch.float32):
    return SpatialDecay(n * d, n, 2., 4.).build(H, W, torch.device(device), dtype, True)


def reference(q, k, v, lce, tables, num_heads, decomposed):
    """MaSA's attention plus LCE on the reference path, from (B, H, W, C) projections."""
    B, H, W, C = q.shape
    shape = (B, H, W, num_heads, C // num_heads)
    scale = (C // num_heads) ** -0.5
    q, k = theta_shift(q.view(shape), tables), theta_shift(k.view(shape), tables)
    attend = decomposed_attention if decomposed else full_attention
    return (attend(q, k, v.view(shape), tables, scale, 'reference') + lce.view(shape)).flatten(-2)


def fused(q, k, v, lce, tables, num_heads, decomposed):
    d = q.shape[-1] // num_heads
    return kernels.masa_attention(q, k, v, lce, tables.rotation, tables.decay, d ** -0.5, num_heads, decomposed)


def inputs(B, H, W, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, C, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(4)]


# (B, H, W, heads, head_dim): several sequences packed in a tile, one sequence per tile, rows and
# columns longer than a tile (looped kernels), and head sizes padded inside the kernels (8, 12)
DECOMPOSED = [(2, 5, 7, 2, 16), (3, 14, 14, 2, 32), (1, 6, 56, 1, 16), (1, 70, 3, 2, 8), (1, 3, 66, 1, 12)]
FULL = [(2, 4, 6, 2, 16), (1, 7, 7, 2, 32), (1, 9, 10, 2, 8), (1, 5, 30, 1, 12)]


@needs_kernels
@pytest.mark.parametrize('decomposed,B,H,W,n,d', [(True, *s) for s in DECOMPOSED] + [(False, *s) for s in FULL])
def test_masa_matches_reference(decomposed, B, H, W, n, d):
    q, k, v, lce = inputs(B, H, W, n * d)
    tables = tables_for(H, W, n, d)
    with torch.no_grad():
        torch.testing.assert_close(fused(q, k, v, lce, tables, n, decomposed),
                                   reference(q, k, v, lce, tables, n, decomposed), rtol=1e-5, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize('decomposed,B,H,W,n,d', [(True, *s) for s in DECOMPOSED] + [(False, *s) for s in FULL])
def test_masa_gradients_match_reference(decomposed, B, H, W, n, d):
    q, k, v, lce = inputs(B, H, W, n * d)
    tables = tables_for(H, W, n, d)
    out = fused(q, k, v, lce, tables, n, decomposed)
    expected = reference(q, k, v, lce, tables, n, decomposed)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v, lce), grad),
                         torch.autograd.grad(expected, (q, k, v, lce), grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


@needs_kernels
def test_inference_keeps_no_softmax_statistics():
    q, k, v, lce = [t.detach() for t in inputs(1, 3, 70, 16)]
    tables = tables_for(3, 70, 1, 16)
    out, lse = torch.ops.rmt.masa(q, k, v, lce, tables.rotation, tables.decay, 0.25, 1, True, False)
    assert out.shape == q.shape and lse.numel() == 0
    with torch.enable_grad():
        q.requires_grad_()
        assert fused(q, k, v, lce, tables, 1, True).grad_fn is not None


@needs_kernels
@pytest.mark.parametrize('size', ['64x64', '96x80', '70x50'])
def test_released_logits_through_the_triton_path(expected, size, monkeypatch):
    calls = []
    masa_attention = kernels.masa_attention
    monkeypatch.setattr(kernels, 'masa_attention', lambda *args: calls.append(args[-1]) or masa_attention(*args))
    model = load_small().to(DEVICE)
    model.set_attn_impl('triton')
    with torch.no_grad():
        logits = model(expected[size]['input'].to(DEVICE))
    assert calls == [True, True, True, False, False, False]  # every block of the 1-2-2-1 config, both forms
    torch.testing.assert_close(logits.cpu(), expected[size]['logits'], rtol=0, atol=1e-4)


@needs_kernels
def test_compiled_model_with_the_triton_path_matches_eager_and_trains():
    model = load_small().to(DEVICE)
    model.set_attn_impl('triton')
    x = torch.randn(2, 3, 64, 48, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_auto_keeps_the_cpu_paths():
    assert select_attn_impl('auto', True, 4, torch.empty(1, 56, 56, 64)) == 'sdpa'
    assert select_attn_impl('auto', True, 4, torch.empty(1, 14, 14, 64)) == 'bmm'
    assert select_attn_impl('auto', False, 4, torch.empty(1, 5, 5, 64)) == 'bmm'


@needs_kernels
def test_forced_triton_runs_where_supported_and_falls_back_elsewhere():
    x = torch.empty(1, 14, 14, 64, device=DEVICE)
    assert select_attn_impl('triton', True, 4, x) == 'triton'
    assert select_attn_impl('triton', True, 4, x.double()) != 'triton'  # no float64 kernels
    assert select_attn_impl('triton', True, 1, x) == 'triton'  # heads of 64 channels fit, of 128 not
    assert select_attn_impl('triton', True, 1, torch.empty(1, 14, 14, 128, device=DEVICE)) != 'triton'
    assert select_attn_impl('triton', True, 16, torch.empty(1, 14, 14, 48, device=DEVICE)) != 'triton'  # odd


def test_without_triton_nothing_picks_it(monkeypatch):
    monkeypatch.setattr(kernels, 'triton', None)
    x = torch.empty(1, 14, 14, 64, device=DEVICE)
    assert not kernels.available()
    for decomposed in (True, False):
        assert select_attn_impl('triton', decomposed, 4, x) == select_attn_impl('auto', decomposed, 4, x) != 'triton'


@needs_kernels
def test_tracing_keeps_standard_operators():
    model = timm.create_model('rmt_t', embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                              num_classes=5).eval().to(DEVICE)
    model.set_attn_impl('triton')
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    assert 'rmt::masa' not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


@needs_kernels
def test_lce_alone_gets_its_gradient():
    q, k, v, lce = inputs(1, 3, 70, 16)
    q, k, v = q.detach(), k.detach(), v.detach()
    out = fused(q, k, v, lce, tables_for(3, 70, 1, 16), 1, True)
    (grad,) = torch.autograd.grad(out, lce, torch.ones_like(out))
    torch.testing.assert_close(grad, torch.ones_like(lce))


@needs_kernels
def test_torchscript_and_export_of_a_triton_model_take_the_standard_paths():
    model = load_small().to(DEVICE)
    model.set_attn_impl('triton')
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=1e-4, atol=1e-5)
        exported = torch.export.export(model, (x,))
    assert 'rmt.masa' not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-4, atol=1e-5)


def test_flex_with_heads_under_16_channels_takes_the_blocked_path():
    assert select_attn_impl('flex', False, 4, torch.empty(1, 8, 8, 48)) == 'blocked'
    assert select_attn_impl('flex', False, 2, torch.empty(1, 8, 8, 48)) == 'flex'


# --- half precision (bfloat16 at full size on CUDA) --------------------------------------------------

def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check_half_precision(dtype, decomposed, B, H, W, n, d):
    q, k, v, lce = inputs(B, H, W, n * d, dtype)
    out = fused(q, k, v, lce, tables_for(H, W, n, d), n, decomposed)
    q64, k64, v64, lce64 = [t.detach().double().requires_grad_() for t in (q, k, v, lce)]
    want = reference(q64, k64, v64, lce64, tables_for(H, W, n, d, dtype=torch.float64), n, decomposed)
    assert out.dtype == dtype and relative_error(out, want) < 1e-2
    grad = torch.randn_like(want)
    for got, ref in zip(torch.autograd.grad(out, (q, k, v), grad.to(dtype)),
                        torch.autograd.grad(want, (q64, k64, v64), grad)):
        assert got.dtype == dtype and relative_error(got, ref) < 2e-2


# Triton's CPU interpreter multiplies bfloat16 matrices wrongly (tl.dot on its bf16 emulation), so
# bfloat16 runs on CUDA only; float16 checks the same half-precision code in the interpreter too.
@needs_kernels
@pytest.mark.parametrize('dtype', [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
@pytest.mark.parametrize('decomposed,B,H,W,n,d', [(True, 2, 14, 14, 2, 32), (True, 1, 3, 70, 1, 16),
                                                  (False, 1, 9, 10, 2, 16), (False, 2, 7, 7, 2, 32)])
def test_half_precision_kernels_are_close_to_the_float64_reference(dtype, decomposed, B, H, W, n, d):
    check_half_precision(dtype, decomposed, B, H, W, n, d)


@needs_cuda
@pytest.mark.parametrize('decomposed,B,H,W,n,d', [(True, 8, 56, 56, 4, 16), (True, 8, 14, 14, 8, 32),
                                                  (False, 8, 7, 7, 16, 32), (False, 2, 24, 24, 8, 32)])
def test_bfloat16_kernels_at_rmt_s_stage_shapes_are_close_to_the_float64_reference(decomposed, B, H, W, n, d):
    check_half_precision(torch.bfloat16, decomposed, B, H, W, n, d)


@needs_cuda
def test_rmt_s_bfloat16_output_is_close_to_float64():
    torch.manual_seed(0)
    model = timm.create_model('rmt_s').cuda().eval()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        out = model(x)
    model.double().set_attn_impl('reference')
    with torch.no_grad():
        want = model(x.double())
    assert relative_error(out, want) < 1.5e-2

"""Building blocks: CPE, the FFN's GELU + conv and what it keeps for backward, LayerNorm under autocast."""
import torch
import torch.nn.functional as F

import pytest

from rmt.blocks import CPE, AutocastLayerNorm, GeluDWConv, gelu_dwconv


def test_gelu_dwconv_matches_gelu_then_conv_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 7, 9, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(12, 1, 3, 3, generator=g, requires_grad=True)
    bias = torch.randn(12, generator=g, requires_grad=True)
    got = gelu_dwconv(x, weight, bias, 1)
    want = F.conv2d(F.gelu(x), weight, bias, padding=1, groups=12)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    pairs = zip(torch.autograd.grad(got, (x, weight, bias), grad), torch.autograd.grad(want, (x, weight, bias), grad),
                strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ffn_dwconv_keeps_its_input_not_the_gelu_output_for_backward():
    conv = GeluDWConv(16)
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(x)
    activations = [t for t in saved if t.numel() == x.numel()]
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()


def test_ffn_conv_is_gelu_plus_its_depthwise_conv():
    conv = GeluDWConv(16)
    x = torch.randn(2, 5, 6, 16)
    h = F.gelu(x)
    conv_h = F.conv2d(h.permute(0, 3, 1, 2), conv.conv.weight, conv.conv.bias, padding=1, groups=16)
    want = h + conv_h.permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)  # the autograd path


def test_layer_norm_under_autocast_reads_and_writes_the_autocast_dtype():
    norm = AutocastLayerNorm(32, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 32).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.layer_norm(x.float(), (32,), norm.weight, norm.bias, 1e-6),
                               rtol=2e-2, atol=2e-2)


def test_cpe_adds_its_depthwise_conv_to_the_input():
    cpe = CPE(8)
    x = torch.randn(2, 5, 6, 8)
    conv = F.conv2d(x.permute(0, 3, 1, 2), cpe.conv.weight, cpe.conv.bias, padding=1, groups=8)
    with torch.no_grad():
        torch.testing.assert_close(cpe(x), x + conv.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_traced_ffn_conv_takes_plain_ops_so_the_trace_saves_and_loads(tmp_path):
    conv = GeluDWConv(16)
    x = torch.randn(1, 5, 6, 16)
    traced = torch.jit.trace(conv, x)  # gradients on: no Python autograd function in the graph
    traced.save(str(tmp_path / 'ffn_conv.pt'))
    loaded = torch.jit.load(str(tmp_path / 'ffn_conv.pt'))
    y = torch.randn(2, 7, 3, 16)
    torch.testing.assert_close(loaded(y), conv(y), rtol=1e-5, atol=1e-5)

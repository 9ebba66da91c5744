"""Building blocks: what the FFN keeps for backward and how LayerNorm behaves under autocast."""
import torch
import torch.nn.functional as F

from rmt.blocks import LayerNorm, ResidualDWConv, gelu_dwconv


def test_gelu_dwconv_matches_gelu_then_conv_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 7, 9, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(12, 1, 3, 3, generator=g, requires_grad=True)
    bias = torch.randn(12, generator=g, requires_grad=True)
    got = gelu_dwconv(x, weight, bias, 1)
    want = F.conv2d(F.gelu(x), weight, bias, padding=1, groups=12)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    pairs = zip(torch.autograd.grad(got, (x, weight, bias), grad), torch.autograd.grad(want, (x, weight, bias), grad))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ffn_dwconv_keeps_its_input_not_the_gelu_output_for_backward():
    conv = ResidualDWConv(16, gelu_first=True)
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(x)
    activations = [t for t in saved if t.numel() == x.numel()]
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()


def test_gelu_first_dwconv_is_gelu_plus_its_depthwise_conv():
    conv = ResidualDWConv(16, gelu_first=True)
    x = torch.randn(2, 5, 6, 16)
    h = F.gelu(x)
    conv_h = F.conv2d(h.permute(0, 3, 1, 2), conv.conv.weight, conv.conv.bias, padding=1, groups=16)
    want = h + conv_h.permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)  # the autograd path


def test_layer_norm_under_autocast_reads_and_writes_the_autocast_dtype():
    norm = LayerNorm(32, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 32).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.layer_norm(x.float(), (32,), norm.weight, norm.bias, 1e-6),
                               rtol=2e-2, atol=2e-2)

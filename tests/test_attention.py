"""MaSA's torch paths and the plan that picks one: every fast path against the reference, the dispatch rules."""
import pytest
import timm
import torch

from rmt.attention import (
    ATTN_IMPLS, AttentionPlan, _softmax, decomposed_attention, dispatch_thresholds, full_attention, masa_attention,
    plan_attention)
from rmt.position import RelPos2d, theta_shift_reference
from tests.helpers import small_kwargs


def make_qkv(B=2, H=5, W=7, n=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, n, d, generator=g) for _ in range(3)]


def tables_for(H, W, n=3, d=8, with_2d=True):
    return RelPos2d(n * d, n, 2., 4.).build(H, W, torch.device('cpu'), torch.float32, with_2d)


@pytest.mark.parametrize('impl', ['sdpa', 'bmm', 'blocked'])
@pytest.mark.parametrize('H,W', [(5, 7), (1, 9), (8, 3)])
def test_full_attention_paths_match_reference(impl, H, W, thresholds):
    thresholds(block_bytes=1)  # blocks of one image row
    q, k, v = make_qkv(H=H, W=W)
    tables = tables_for(H, W)
    ref = full_attention(q, k, v, tables, 8 ** -0.5, 'reference')
    out = full_attention(q, k, v, tables, 8 ** -0.5, impl)
    assert out.shape == (2, H, W, 3, 8)
    assert (out - ref).abs().max().item() < 1e-5


def test_blocked_attention_with_several_rows_per_block_matches_reference(thresholds):
    H, W, n = 9, 4, 3
    thresholds(block_bytes=2 * n * W * H * W * 4)  # two rows per block, ragged end
    q, k, v = make_qkv(H=H, W=W, n=n)
    tables = tables_for(H, W, n=n)
    ref = full_attention(q, k, v, tables, 0.3, 'reference')
    assert (full_attention(q, k, v, tables, 0.3, 'blocked') - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize('impl', ['sdpa', 'bmm'])
@pytest.mark.parametrize('H,W', [(5, 7), (1, 6), (6, 1)])
def test_decomposed_fast_paths_match_reference(impl, H, W):
    q, k, v = make_qkv(H=H, W=W)
    tables = tables_for(H, W, with_2d=False)
    ref = decomposed_attention(q, k, v, tables, 8 ** -0.5, 'reference')
    out = decomposed_attention(q, k, v, tables, 8 ** -0.5, impl)
    assert out.shape == (2, H, W, 3, 8)
    assert (out - ref).abs().max().item() < 1e-5


def test_decomposed_reference_is_row_then_column_attention():
    B, H, W, n, d = 1, 3, 4, 2, 4
    q, k, v = make_qkv(B, H, W, n, d)
    tables = tables_for(H, W, n=n, d=d, with_2d=False)
    bias_h, bias_w = tables.bias_h, tables.bias_w
    out = decomposed_attention(q, k, v, tables, 1.0, 'reference')
    # explicit loops over one head
    h = 1
    v1 = torch.empty(H, W, d)
    for i in range(H):
        a = (q[0, i, :, h] @ k[0, i, :, h].T + bias_w[h]).softmax(-1)
        v1[i] = a @ v[0, i, :, h]
    expected = torch.empty(H, W, d)
    for j in range(W):
        a = (q[0, :, j, h] @ k[0, :, j, h].T + bias_h[h]).softmax(-1)
        expected[:, j] = a @ v1[:, j]
    assert torch.allclose(out[0, :, :, h], expected, atol=1e-5)


def impl_of(requested, decomposed, num_heads, x):
    return plan_attention(requested, decomposed, num_heads, x).impl


def test_auto_dispatch_picks_sdpa_for_small_and_blocked_for_large_full_stages(thresholds):
    thresholds(bias_bytes=4 * 16 * 16 * 4, bmm_max_tokens=0)
    assert impl_of('auto', False, 4, torch.empty(1, 4, 4, 8)) == 'sdpa'     # 16 tokens: fits
    assert impl_of('auto', False, 4, torch.empty(1, 4, 5, 8)) == 'blocked'  # 20 tokens: too big
    assert impl_of('auto', True, 4, torch.empty(1, 64, 64, 8)) == 'sdpa'    # decomposed: no 2-D bias
    assert impl_of('reference', True, 4, torch.empty(1, 4, 4, 8)) == 'reference'


def test_default_bias_budget_is_64_mib_of_the_compute_dtype():
    assert impl_of('auto', False, 8, torch.empty(1, 33, 33, 64)) == 'sdpa'     # 8 * 1089^2 * 4 B = 36 MiB
    assert impl_of('auto', False, 8, torch.empty(1, 40, 40, 64)) == 'blocked'  # 78 MiB
    assert impl_of('auto', False, 8, torch.empty(1, 40, 40, 64, dtype=torch.bfloat16)) == 'sdpa'  # 39 MiB


def test_auto_dispatch_picks_bmm_for_short_float_sequences_on_cpu():
    assert impl_of('auto', True, 4, torch.empty(1, 28, 14, 8)) == 'bmm'    # rows 14, columns 28
    assert impl_of('auto', True, 4, torch.empty(1, 56, 14, 8)) == 'sdpa'   # columns of 56
    assert impl_of('auto', False, 4, torch.empty(1, 4, 8, 8)) == 'bmm'     # 32 tokens in all
    assert impl_of('auto', False, 4, torch.empty(1, 7, 7, 8)) == 'sdpa'    # 49 tokens
    assert impl_of('auto', True, 4, torch.empty(1, 14, 14, 8, dtype=torch.bfloat16)) == 'sdpa'
    assert impl_of('auto', True, 4, torch.empty(1, 14, 14, 8, device='meta')) == 'sdpa'
    assert impl_of('bmm', True, 4, torch.empty(1, 56, 56, 8)) == 'bmm'    # asked for: always
    with torch.autocast('cpu', dtype=torch.bfloat16):  # q, k, v in bf16 although the input is float32
        assert impl_of('auto', True, 4, torch.empty(1, 14, 14, 8)) == 'sdpa'


def test_blocked_means_sdpa_for_decomposed_stages():
    assert impl_of('blocked', True, 4, torch.empty(1, 56, 56, 64)) == 'sdpa'
    assert impl_of('blocked', False, 4, torch.empty(1, 7, 7, 64)) == 'blocked'


def test_plan_gives_table_dtype_and_2d_bias_with_the_path():
    x = torch.empty(1, 7, 7, 64)
    assert plan_attention('sdpa', False, 4, x) == AttentionPlan('sdpa', torch.float32, True)
    assert plan_attention('blocked', False, 4, x) == AttentionPlan('blocked', torch.float32, False)
    assert plan_attention('sdpa', True, 4, x) == AttentionPlan('sdpa', torch.float32, False)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert plan_attention('sdpa', False, 4, x) == AttentionPlan('sdpa', torch.bfloat16, True)


def test_triton_is_not_planned_where_the_kernels_cannot_run(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # the CPU without Triton's interpreter
    x = torch.empty(1, 14, 14, 64)
    assert impl_of('triton', True, 4, x) == impl_of('auto', True, 4, x) == 'bmm'
    assert impl_of('triton', False, 4, torch.empty(1, 7, 7, 64)) == 'sdpa'


def test_dispatch_thresholds_setter_returns_the_previous_values_and_refuses_negatives(thresholds):
    before = dispatch_thresholds()
    assert thresholds(bmm_max_tokens=7) == before
    assert dispatch_thresholds() == before._replace(bmm_max_tokens=7)
    with pytest.raises(ValueError, match='>= 0'):
        thresholds(block_bytes=-1)
    assert dispatch_thresholds().block_bytes == before.block_bytes


def test_unknown_attention_impl_is_rejected():
    model = timm.create_model('rmt_t', **small_kwargs())
    with pytest.raises(ValueError, match="unknown attention implementation 'fastest'"):
        model.set_attn_impl('fastest')


def test_rmt_attn_impl_environment_variable_forces_the_path_of_auto(monkeypatch):
    monkeypatch.setenv('RMT_ATTN_IMPL', 'reference')
    model = timm.create_model('rmt_t', **small_kwargs())
    assert [stage.attn_impl for stage in model.stages] == ['reference'] * 4
    model.set_attn_impl('sdpa')  # an explicit choice wins
    assert [stage.attn_impl for stage in model.stages] == ['sdpa'] * 4
    monkeypatch.setenv('RMT_ATTN_IMPL', 'fast')
    with pytest.raises(ValueError, match="unknown RMT_ATTN_IMPL 'fast'"):
        timm.create_model('rmt_t', **small_kwargs())


def test_former_flex_path_means_auto_with_a_warning():
    model = timm.create_model('rmt_t', **small_kwargs())
    with pytest.warns(FutureWarning, match="'flex' was removed"):
        model.set_attn_impl('flex')
    assert [stage.attn_impl for stage in model.stages] == ['auto'] * 4
    assert 'flex' not in ATTN_IMPLS


@pytest.mark.parametrize('impl', ['bmm', 'blocked'])
def test_full_attention_gradients_match_reference(impl, thresholds):
    thresholds(block_bytes=1)  # every image row checkpointed on its own
    H, W = 4, 5
    tables = tables_for(H, W)
    grads = []
    for path in ('reference', impl):
        q, k, v = [t.requires_grad_() for t in make_qkv(H=H, W=W)]
        full_attention(q, k, v, tables, 0.3, path).pow(2).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for ref, out in zip(*grads, strict=True):
        assert (ref - out).abs().max().item() < 1e-5


def test_decomposed_bmm_gradients_match_reference():
    H, W = 4, 5
    tables = tables_for(H, W, with_2d=False)
    grads = []
    for impl in ('reference', 'bmm'):
        q, k, v = [t.requires_grad_() for t in make_qkv(H=H, W=W)]
        decomposed_attention(q, k, v, tables, 0.3, impl).pow(2).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for ref, out in zip(*grads, strict=True):
        assert (ref - out).abs().max().item() < 1e-5


@pytest.mark.parametrize('length', [7, 14, 28])
def test_short_row_softmax_matches_torch_softmax_with_and_without_autograd(length):
    scores = torch.randn(6, 3, 5, length) * 20
    expected = scores.softmax(-1)
    assert torch.allclose(_softmax(scores.clone()), expected, atol=1e-6)
    leaf = scores.clone().requires_grad_()
    probs = _softmax(leaf)
    assert torch.allclose(probs, expected, atol=1e-6)
    weights = torch.randn_like(scores)
    (probs * weights).sum().backward()
    leaf_ref = scores.clone().requires_grad_()
    (leaf_ref.softmax(-1) * weights).sum().backward()
    assert torch.allclose(leaf.grad, leaf_ref.grad, atol=1e-6)


@pytest.mark.parametrize('impl,decomposed', [('sdpa', True), ('bmm', True), ('sdpa', False), ('blocked', False)])
def test_masa_pipeline_is_lce_plus_attention_of_the_shifted_projections(impl, decomposed):
    B, H, W, n, d = 2, 5, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v, lce = [torch.randn(B, H, W, n * d, generator=g) for _ in range(4)]
    tables = tables_for(H, W, n=n, d=d, with_2d=not decomposed)
    plan = AttentionPlan(impl, torch.float32, not decomposed and impl != 'blocked')
    got = masa_attention(q, k, v, lce.clone(), tables, plan, n, decomposed)
    shape = (B, H, W, n, d)
    qr, kr = [theta_shift_reference(t.view(shape), tables.sin, tables.cos) for t in (q, k)]
    attend = decomposed_attention if decomposed else full_attention
    want = lce + attend(qr, kr, v.view(shape), tables, d ** -0.5, 'reference').flatten(-2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

"""MaSA kernels and position tables: every fast path against the reference path, tables against the spec."""
import math

import pytest
import torch

import rmt.attention as attention
from rmt.attention import decomposed_attention, full_attention, select_attn_impl
from rmt.checkpoint import load_checkpoint_file
from rmt.decay import SpatialDecay, decay_rates, manhattan_mask, rotary_angles, theta_shift, theta_shift_reference
from tests.helpers import SMALL_CHECKPOINT, small_kwargs


def make_qkv(B=2, H=5, W=7, n=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, n, d, generator=g) for _ in range(3)]


def tables_for(H, W, n=3, d=8, with_2d=True, decay_exponent=2., heads_range=4.):
    decay = SpatialDecay(n * d, n, decay_exponent, heads_range)
    return decay.build(H, W, torch.device('cpu'), torch.float32, with_2d)


def test_decay_rates_follow_the_formula():
    expected = [math.log(1 - 2 ** (-2 - 6 * h / 8)) for h in range(8)]
    assert torch.allclose(decay_rates(8, 2, 6), torch.tensor(expected), atol=1e-7)


def test_position_buffers_equal_the_released_ones():
    state = load_checkpoint_file(SMALL_CHECKPOINT)['model']
    # fixture config: stage 2 has 48 channels in 4 heads, heads_range 6
    # the last bit differs between CPUs and torch builds (e.g. -0.28768209 and -0.28768206)
    torch.testing.assert_close(rotary_angles(12), state['layers.2.Relpos.angle'], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(decay_rates(4, 2, 6), state['layers.2.Relpos.decay'], rtol=1e-6, atol=1e-7)


def test_rotary_angles_repeat_each_frequency_twice():
    a = rotary_angles(8)
    assert torch.allclose(a[0::2], a[1::2])
    assert torch.allclose(a[0::2], 1 / 10000 ** torch.linspace(0, 1, 4))


def test_theta_shift_rotates_consecutive_pairs():
    H, W, d = 3, 4, 8
    tables = tables_for(H, W, n=1, d=d)
    x = torch.randn(2, H, W, 1, d)
    pos = torch.arange(H * W, dtype=torch.float32).reshape(H, W, 1, 1) * rotary_angles(d)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    assert torch.allclose(theta_shift_reference(x, tables.sin, tables.cos), x * pos.cos() + rotated * pos.sin(),
                          atol=1e-6)


def test_rotation_table_holds_cos_sin_pairs_of_each_frequency():
    H, W, d = 3, 4, 8
    tables = tables_for(H, W, n=1, d=d)
    phase = torch.arange(H * W, dtype=torch.float32).reshape(H, W, 1, 1) * rotary_angles(d)[0::2]
    assert tables.rotation.shape == (H, W, 1, d // 2, 2)
    assert torch.allclose(tables.rotation, torch.stack((phase.cos(), phase.sin()), -1), atol=1e-6)


def test_complex_theta_shift_matches_reference():
    tables = tables_for(5, 6, n=2, d=8)
    x = torch.randn(2, 5, 6, 2, 8)
    assert torch.allclose(theta_shift(x, tables), theta_shift_reference(x, tables.sin, tables.cos), atol=1e-6)


def test_theta_shift_without_complex_table_uses_the_reference_formula():
    decay = SpatialDecay(16, 2, 2, 4)
    tables = decay.build(3, 4, torch.device('cpu'), torch.bfloat16, False)
    x = torch.randn(1, 3, 4, 2, 8, dtype=torch.bfloat16)
    assert tables.rotation.numel() == 0
    assert torch.equal(theta_shift(x, tables), theta_shift_reference(x, tables.sin, tables.cos))


def test_manhattan_mask_is_decay_times_city_block_distance():
    H, W = 3, 5
    tables = tables_for(H, W, with_2d=False)
    decay, mask = tables.decay, manhattan_mask(tables.mask_h, tables.mask_w)
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    ij = torch.stack([i.flatten(), j.flatten()], -1).float()
    distance = (ij[:, None] - ij[None]).abs().sum(-1)
    assert torch.allclose(mask, decay[:, None, None] * distance, atol=1e-6)


def test_decomposed_tables_hold_no_hw_by_hw_mask():
    assert tables_for(6, 6, with_2d=False).mask_2d.numel() == 0


@pytest.mark.parametrize('impl', ['sdpa', 'bmm', 'blocked', 'flex'])
@pytest.mark.parametrize('H,W', [(5, 7), (1, 9), (8, 3)])
def test_full_attention_paths_match_reference(impl, H, W, monkeypatch):
    monkeypatch.setattr(attention, '_BLOCK_BYTES', 1)  # blocks of one image row
    q, k, v = make_qkv(H=H, W=W)
    tables = tables_for(H, W)
    ref = full_attention(q, k, v, tables, 8 ** -0.5, 'reference')
    out = full_attention(q, k, v, tables, 8 ** -0.5, impl)
    assert out.shape == (2, H, W, 3, 8)
    assert (out - ref).abs().max().item() < 1e-5


def test_blocked_attention_with_several_rows_per_block_matches_reference(monkeypatch):
    H, W, n = 9, 4, 3
    monkeypatch.setattr(attention, '_BLOCK_BYTES', 2 * n * W * H * W * 4)  # two rows per block, ragged end
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
    mask_h, mask_w = tables.mask_h, tables.mask_w
    out = decomposed_attention(q, k, v, tables, 1.0, 'reference')
    # explicit loops over one head
    h = 1
    v1 = torch.empty(H, W, d)
    for i in range(H):
        a = (q[0, i, :, h] @ k[0, i, :, h].T + mask_w[h]).softmax(-1)
        v1[i] = a @ v[0, i, :, h]
    expected = torch.empty(H, W, d)
    for j in range(W):
        a = (q[0, :, j, h] @ k[0, :, j, h].T + mask_h[h]).softmax(-1)
        expected[:, j] = a @ v1[:, j]
    assert torch.allclose(out[0, :, :, h], expected, atol=1e-5)


def test_auto_dispatch_picks_sdpa_for_small_and_blocked_for_large_full_stages(monkeypatch):
    monkeypatch.setattr(attention, '_MASK_BUDGET_BYTES', 4 * 16 * 16 * 4 * 4)
    monkeypatch.setattr(attention, '_BMM_MAX_TOKENS', 0)
    assert select_attn_impl('auto', False, 4, torch.empty(1, 4, 4, 8)) == 'sdpa'     # 16 tokens: fits
    assert select_attn_impl('auto', False, 4, torch.empty(1, 8, 8, 8)) == 'blocked'  # 64 tokens: too big
    assert select_attn_impl('auto', True, 4, torch.empty(1, 64, 64, 8)) == 'sdpa'    # decomposed: no 2-D mask
    assert select_attn_impl('reference', True, 4, torch.empty(1, 4, 4, 8)) == 'reference'


def test_auto_dispatch_picks_bmm_for_short_float_sequences_on_cpu():
    assert select_attn_impl('auto', True, 4, torch.empty(1, 28, 14, 8)) == 'bmm'    # rows 14, columns 28
    assert select_attn_impl('auto', True, 4, torch.empty(1, 56, 14, 8)) == 'sdpa'   # columns of 56
    assert select_attn_impl('auto', False, 4, torch.empty(1, 4, 8, 8)) == 'bmm'     # 32 tokens in all
    assert select_attn_impl('auto', False, 4, torch.empty(1, 7, 7, 8)) == 'sdpa'    # 49 tokens
    assert select_attn_impl('auto', True, 4, torch.empty(1, 14, 14, 8, dtype=torch.bfloat16)) == 'sdpa'
    assert select_attn_impl('auto', True, 4, torch.empty(1, 14, 14, 8, device='meta')) == 'sdpa'
    assert select_attn_impl('bmm', True, 4, torch.empty(1, 56, 56, 8)) == 'bmm'    # asked for: always
    with torch.autocast('cpu', dtype=torch.bfloat16):  # q, k, v in bf16 although the input is float32
        assert select_attn_impl('auto', True, 4, torch.empty(1, 14, 14, 8)) == 'sdpa'


def test_tables_are_built_once_per_size_and_dtype():
    decay = SpatialDecay(16, 2, 2, 4)
    cpu = torch.device('cpu')
    first = decay(6, 5, cpu, torch.float32, True)
    assert decay(6, 5, cpu, torch.float32, True) is first
    assert decay(6, 5, cpu, torch.float64, True).sin.dtype == torch.float64
    assert decay(6, 4, cpu, torch.float32, True).sin.shape[:2] == (6, 4)


def test_tables_from_inference_mode_are_not_reused_for_training():
    decay = SpatialDecay(16, 2, 2, 4)
    cpu = torch.device('cpu')
    with torch.inference_mode():
        inference_tables = decay(3, 3, cpu, torch.float32, True)
    train_tables = decay(3, 3, cpu, torch.float32, True)
    assert inference_tables.sin.is_inference() and not train_tables.sin.is_inference()


def test_table_cache_is_bounded():
    decay = SpatialDecay(16, 2, 2, 4)
    for size in range(1, 20):
        decay(size, size, torch.device('cpu'), torch.float32, False)
    assert len(decay._cache) == SpatialDecay.cache_size


def test_unknown_attention_impl_is_rejected():
    import timm
    model = timm.create_model('rmt_t', **small_kwargs())
    with pytest.raises(ValueError, match='unknown attention implementation'):
        model.set_attn_impl('fastest')


@pytest.mark.parametrize('impl', ['bmm', 'blocked'])
def test_full_attention_gradients_match_reference(impl, monkeypatch):
    monkeypatch.setattr(attention, '_BLOCK_BYTES', 1)  # every image row checkpointed on its own
    H, W = 4, 5
    tables = tables_for(H, W)
    grads = []
    for path in ('reference', impl):
        q, k, v = [t.requires_grad_() for t in make_qkv(H=H, W=W)]
        full_attention(q, k, v, tables, 0.3, path).pow(2).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for ref, out in zip(*grads):
        assert (ref - out).abs().max().item() < 1e-5


def test_decomposed_bmm_gradients_match_reference():
    H, W = 4, 5
    tables = tables_for(H, W, with_2d=False)
    grads = []
    for impl in ('reference', 'bmm'):
        q, k, v = [t.requires_grad_() for t in make_qkv(H=H, W=W)]
        decomposed_attention(q, k, v, tables, 0.3, impl).pow(2).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for ref, out in zip(*grads):
        assert (ref - out).abs().max().item() < 1e-5


@pytest.mark.parametrize('length', [7, 14, 28])
def test_short_row_softmax_matches_torch_softmax_with_and_without_autograd(length):
    scores = torch.randn(6, 3, 5, length) * 20
    expected = scores.softmax(-1)
    assert torch.allclose(attention._softmax(scores.clone()), expected, atol=1e-6)
    leaf = scores.clone().requires_grad_()
    probs = attention._softmax(leaf)
    assert torch.allclose(probs, expected, atol=1e-6)
    weights = torch.randn_like(scores)
    (probs * weights).sum().backward()
    leaf_ref = scores.clone().requires_grad_()
    (leaf_ref.softmax(-1) * weights).sum().backward()
    assert torch.allclose(leaf.grad, leaf_ref.grad, atol=1e-6)

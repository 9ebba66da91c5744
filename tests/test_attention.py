"""Which path computes MaSA: the backends table, the dispatch rules, and the model's pipeline on each path."""
import warnings

import pytest
import timm
import torch

from rmt.attention import (
    ATTN_IMPLS, BACKENDS, AttentionPlan, Problem, dispatch_thresholds, masa_attention, masa_reference, plan_attention)
from rmt.attention.backends import input_reason
from rmt.position import theta_shift_reference
from tests.helpers import assert_close, small_kwargs, tables_for

CPU = torch.device('cpu')


def problem(grid, decomposed=True, heads=4, head_dim=16, dtype=torch.float32, **inputs):
    return Problem(dtype, list(grid), heads, head_dim, decomposed, inputs.get('num_prefix', 0),
                   inputs.get('masked', False), inputs.get('per_token_decay', False),
                   inputs.get('decay_grad', False), inputs.get('batch', 1))


def impl_of(requested, p, device=CPU):
    return plan_attention(requested, p, device).impl


@pytest.fixture
def fresh_warnings():
    """Forget which forced-path warnings this process gave (each is given once)."""
    from rmt.attention import backends
    backends._warned.clear()


def test_backends_are_tried_in_one_order_and_auto_or_any_of_them_can_be_asked_for():
    assert BACKENDS == ('triton', 'bmm', 'sdpa', 'blocked', 'reference')
    assert ATTN_IMPLS == ('auto',) + BACKENDS


def test_auto_dispatch_picks_sdpa_for_small_and_blocked_for_large_full_stages(thresholds):
    thresholds(bias_bytes=4 * 16 * 16 * 4, bmm_max_tokens=0)
    assert impl_of('auto', problem([4, 4], False)) == 'sdpa'     # 16 tokens: fits
    assert impl_of('auto', problem([4, 5], False)) == 'blocked'  # 20 tokens: too big
    assert impl_of('auto', problem([64, 64], True)) == 'sdpa'    # decomposed: no full bias
    assert impl_of('reference', problem([4, 4], True)) == 'reference'


def test_default_bias_budget_is_64_mib_of_the_compute_dtype():
    assert impl_of('auto', problem([33, 33], False, heads=8, head_dim=8)) == 'sdpa'     # 8 * 1089^2 * 4 B = 36 MiB
    assert impl_of('auto', problem([40, 40], False, heads=8, head_dim=8)) == 'blocked'  # 78 MiB
    assert impl_of('auto', problem([40, 40], False, heads=8, head_dim=8, dtype=torch.bfloat16)) == 'sdpa'  # 39 MiB


def test_auto_dispatch_picks_bmm_for_short_float_sequences_on_cpu():
    assert impl_of('auto', problem([28, 14])) == 'bmm'    # rows 14, columns 28
    assert impl_of('auto', problem([56, 14])) == 'sdpa'   # columns of 56
    assert impl_of('auto', problem([4, 8], False)) == 'bmm'     # 32 tokens in all
    assert impl_of('auto', problem([7, 7], False)) == 'sdpa'    # 49 tokens
    assert impl_of('auto', problem([14, 14], dtype=torch.bfloat16)) == 'sdpa'
    assert impl_of('auto', problem([14, 14]), torch.device('meta')) == 'sdpa'
    assert impl_of('bmm', problem([56, 56])) == 'bmm'    # asked for: always
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert impl_of('auto', problem([14, 14])) == 'sdpa'


def test_plan_gives_table_dtype_and_full_bias_with_the_path():
    assert plan_attention('sdpa', problem([7, 7], False), CPU) == AttentionPlan('sdpa', torch.float32, True)
    assert plan_attention('blocked', problem([7, 7], False), CPU) == AttentionPlan('blocked', torch.float32, False)
    assert plan_attention('sdpa', problem([7, 7], True), CPU) == AttentionPlan('sdpa', torch.float32, False)
    assert plan_attention('sdpa', problem([7, 7], False, per_token_decay=True), CPU).needs_full_bias is False
    assert plan_attention('sdpa', problem([7], False), CPU).needs_full_bias is False  # one axis: its own table
    assert plan_attention('sdpa', problem([7, 7], False, dtype=torch.bfloat16), CPU).table_dtype == torch.bfloat16


@pytest.mark.parametrize('inputs,reason', [
    (dict(num_prefix=1), 'take prefix tokens'), (dict(masked=True), 'take a padding mask'),
    (dict(per_token_decay=True), 'take a per-token decay'), (dict(decay_grad=True), 'give the decay a gradient')])
def test_auto_never_plans_the_kernels_for_an_input_they_cannot_take(inputs, reason, monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    p = problem([6, 6], **inputs)
    assert input_reason('triton', p) == reason
    assert impl_of('auto', p) != 'triton'
    with pytest.raises(ValueError, match=f'^the triton attention path cannot {reason}; use another path or auto$'):
        impl_of('triton', p)


def test_blocked_path_refuses_prefix_tokens_and_means_auto_for_decomposed_attention(fresh_warnings):
    with pytest.raises(ValueError, match='the blocked attention path cannot take prefix tokens'):
        impl_of('blocked', problem([7, 7], False, num_prefix=1))
    with pytest.warns(RuntimeWarning, match='blocked attention path cannot run here .it computes full attention'):
        assert impl_of('blocked', problem([9, 11], True)) == 'bmm'


def test_a_forced_path_that_cannot_run_here_warns_once_and_plans_auto(monkeypatch, fresh_warnings):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # the CPU without Triton's interpreter
    with pytest.warns(RuntimeWarning, match='the triton attention path cannot run here'):
        assert impl_of('triton', problem([14, 14])) == impl_of('auto', problem([14, 14])) == 'bmm'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert impl_of('triton', problem([14, 14])) == 'bmm'


def test_unknown_path_is_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown attention path 'fastest'"):
        impl_of('fastest', problem([4, 4]))


def test_dispatch_thresholds_setter_returns_the_previous_values_and_refuses_negatives(thresholds):
    before = dispatch_thresholds()
    assert thresholds(bmm_max_tokens=7) == before
    assert dispatch_thresholds() == before._replace(bmm_max_tokens=7)
    with pytest.raises(ValueError, match='>= 0'):
        thresholds(block_bytes=-1)
    assert dispatch_thresholds().block_bytes == before.block_bytes


def test_unknown_attention_impl_is_rejected_by_the_model():
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


@pytest.mark.parametrize('impl,decomposed', [('reference', True), ('sdpa', True), ('bmm', True), ('sdpa', False),
                                             ('bmm', False), ('blocked', False)])
def test_masa_pipeline_is_lce_plus_attention_of_the_shifted_projections(impl, decomposed, thresholds):
    thresholds(block_bytes=1)  # blocks of one image row
    B, H, W, n, d = 2, 5, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v, lce = [torch.randn(B, H, W, n * d, generator=g) for _ in range(4)]
    tables = tables_for([H, W], n=n, d=d, with_full=not decomposed and impl != 'blocked')
    plan = AttentionPlan(impl, torch.float32, not decomposed and impl != 'blocked')
    got, _ = masa_attention(q, k, v, lce.clone(), tables, plan, n, decomposed)
    shape = (B, H, W, n, d)
    qr, kr = [theta_shift_reference(t.view(shape), tables.sin, tables.cos).flatten(1, 2).transpose(1, 2)
              for t in (q, k)]
    want = masa_reference(qr, kr, v.view(shape).flatten(1, 2).transpose(1, 2), tables.decay, [H, W], decomposed)
    assert_close(got, lce + want.transpose(1, 2).reshape(B, H, W, n * d), atol=1e-5, name=f'{impl} output')

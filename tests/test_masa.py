"""rmt.attention.masa, the function: every path against the naive reference, values and gradients (float64),
over 1-, 2- and 3-D grids, full and decomposed, with prefix tokens, padding masks and per-token decay."""
import math

import pytest
import torch

from rmt.attention import masa, masa_reference
from rmt.position import decay_rates
from tests.helpers import assert_close

TORCH_PATHS = ['reference', 'bmm', 'sdpa', 'blocked', 'auto']
GRIDS = [[1], [13], [13, 9], [20, 28], [3, 5, 7]]


def inputs(grid, prefix=0, B=2, n=2, d=4, decay='head', masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = math.prod(grid)
    q, k, v = [torch.randn(B, n, prefix + L, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    if decay == 'head':
        rates = decay_rates(n, 2, 4).double()
    elif decay == 'sample':
        rates = -0.05 - torch.rand(B, n, generator=g, dtype=torch.float64)
    else:
        rates = -0.05 - torch.rand(B, n, L, generator=g, dtype=torch.float64)
    mask = None
    if masked:  # the second image is padded: its last column (and depth slice) hold no image
        box = torch.ones([B] + grid, dtype=torch.bool)
        box[(1,) + (slice(None),) * (len(grid) - 1) + (slice(max(1, grid[-1] - 2), None),)] = False
        mask = torch.cat([torch.ones(B, prefix, dtype=torch.bool), box.reshape(B, L)], 1)
    return q, k, v, rates.requires_grad_(), mask


def check_against_reference(grid, impl, decomposed, prefix=0, decay='head', masked=False):
    q, k, v, rates, mask = inputs(grid, prefix, decay=decay, masked=masked)
    out = masa(q, k, v, rates, grid, decomposed=decomposed, attn_mask=mask, num_prefix_tokens=prefix, impl=impl)
    ref = masa_reference(q, k, v, rates, grid, decomposed, mask, prefix)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v, rates))
    expected = torch.autograd.grad((ref * weights).sum(), (q, k, v, rates))
    assert_close(out, ref, atol=1e-6, name=f'{impl} output')
    for name, got, want in zip(('dq', 'dk', 'dv', 'd_decay'), grads, expected):
        assert_close(got, want, atol=1e-6, name=f'{impl} {name}')


# blocked computes full attention only (forced on decomposed attention it warns and runs auto)
PATH_FORMS = [(impl, False) for impl in TORCH_PATHS] + [(impl, True) for impl in TORCH_PATHS if impl != 'blocked']


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: 'x'.join(map(str, g)))
@pytest.mark.parametrize('impl,decomposed', PATH_FORMS, ids=lambda v: {True: 'decomposed', False: 'full'}.get(v, v))
def test_every_torch_path_matches_the_reference_with_a_learnable_decay(grid, impl, decomposed):
    check_against_reference(grid, impl, decomposed)


def kernels_run_here() -> bool:
    from rmt.attention import kernels
    return kernels.unsupported_reason(torch.device('cpu'), torch.float32, 4) is None


@pytest.mark.skipif(not kernels_run_here(), reason='needs Triton (its CPU interpreter)')
@pytest.mark.parametrize('grid', [[1], [13], [13, 9], [3, 5, 7]], ids=lambda g: 'x'.join(map(str, g)))
@pytest.mark.parametrize('decomposed', [False, True], ids=['full', 'decomposed'])
def test_the_kernels_match_the_reference_in_values_and_q_k_v_gradients(grid, decomposed):
    """Forced ``triton`` (Triton's CPU interpreter here): float32 kernels against the float64 reference."""
    q, k, v, rates, _ = inputs(grid)
    q32, k32, v32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = masa(q32, k32, v32, rates.detach().float(), grid, decomposed=decomposed, impl='triton')
    ref = masa_reference(q, k, v, rates.detach(), grid, decomposed)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights.float()).sum(), (q32, k32, v32))
    expected = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    assert_close(out, ref, atol=2e-5, name='triton output')
    for name, got, want in zip(('dq', 'dk', 'dv'), grads, expected):
        assert_close(got, want, atol=5e-5, name=f'triton {name}')


@pytest.mark.parametrize('grid', [[13], [5, 4], [3, 5, 2]], ids=lambda g: 'x'.join(map(str, g)))
@pytest.mark.parametrize('decomposed', [False, True], ids=['full', 'decomposed'])
@pytest.mark.parametrize('impl', ['reference', 'bmm', 'sdpa', 'auto'])
def test_prefix_tokens_padding_and_per_token_decay_together_match_the_reference(grid, decomposed, impl):
    check_against_reference(grid, impl, decomposed, prefix=2, decay='token', masked=True)


@pytest.mark.parametrize('decay', ['sample', 'token'])
@pytest.mark.parametrize('masked', [False, True])
def test_blocked_path_takes_per_sample_and_per_token_decay_and_padding(decay, masked, thresholds):
    thresholds(block_bytes=1)  # a block per row of queries
    check_against_reference([6, 5], 'blocked', False, decay=decay, masked=masked)


def test_per_sample_decay_is_a_per_token_decay_of_one_rate_per_image():
    q, k, v, rates, _ = inputs([4, 5], decay='sample')
    per_token = rates[:, :, None].expand(2, 2, 20)
    assert_close(masa(q, k, v, rates, [4, 5]), masa(q, k, v, per_token, [4, 5]), atol=0)


def test_decay_is_a_log_decay_a_strongly_negative_one_leaves_each_token_its_own_value():
    q, k, v, _, _ = inputs([3, 4])
    for decomposed in (False, True):
        out = masa(q, k, v, torch.full((2,), -80.), [3, 4], decomposed=decomposed)
        assert_close(out, v, atol=1e-12, name='output with gamma = exp(-80)')


def test_zero_decay_is_plain_softmax_attention():
    q, k, v, _, _ = inputs([3, 4])
    plain = torch.softmax(q @ k.transpose(-2, -1) / 2, -1) @ v  # d = 4
    assert_close(masa(q, k, v, torch.zeros(2), [3, 4]), plain, atol=1e-12)


@pytest.mark.parametrize('decomposed', [False, True])
def test_a_padded_grid_gives_the_unpadded_result_and_zero_where_padded(decomposed):
    q, k, v, rates, _ = inputs([4, 6], B=1)
    spatial = [t.detach().unflatten(2, (4, 6)) for t in (q, k, v)]
    padded = [torch.nn.functional.pad(t, (0, 0, 0, 3, 0, 2)) for t in spatial]  # to 6 x 9
    mask = torch.zeros(1, 6, 9, dtype=torch.bool)
    mask[:, :4, :6] = True
    out = masa(*[t.flatten(2, 3) for t in padded], rates, [6, 9], decomposed=decomposed, attn_mask=mask.flatten(1))
    out = out.unflatten(2, (6, 9))
    assert_close(out[:, :, :4, :6], masa(*spatial, rates, decomposed=decomposed), atol=1e-12)
    assert out[:, :, 4:].abs().max() == 0 and out[:, :, :, 6:].abs().max() == 0


def test_spatial_layout_is_the_token_layout_unflattened():
    q, k, v, rates, _ = inputs([3, 5, 2])
    spatial = masa(*[t.unflatten(2, (3, 5, 2)) for t in (q, k, v)], rates, decomposed=True)
    assert spatial.shape == (2, 2, 3, 5, 2, 4)
    assert_close(spatial.flatten(2, 4), masa(q, k, v, rates, [3, 5, 2], decomposed=True), atol=0)


def test_one_axis_decomposed_and_full_are_the_same():
    q, k, v, rates, _ = inputs([11])
    assert_close(masa(q, k, v, rates, [11], decomposed=True), masa(q, k, v, rates, [11]), atol=1e-12)


def test_scale_multiplies_the_logits():
    q, k, v, rates, _ = inputs([3, 4])
    assert_close(masa(q, k, v, rates, [3, 4], scale=0.25), masa(q * 0.5, k, v, rates, [3, 4]), atol=1e-12)


def test_half_precision_under_autocast_keeps_finite_values_with_a_mask():
    q, k, v, rates, mask = inputs([5, 6], prefix=1, masked=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = masa(q.float(), k.float(), v.float(), rates.float(), [5, 6], attn_mask=mask, num_prefix_tokens=1)
    assert torch.isfinite(out).all()
    ref = masa_reference(q, k, v, rates, [5, 6], attn_mask=mask, num_prefix_tokens=1)
    assert_close(out.double(), ref, atol=0.05, name='bfloat16 output')


@pytest.mark.parametrize('call,message', [
    (lambda q, r: masa(q, q, q[..., :2], r, [3, 4]), 'q, k and v must have one shape'),
    (lambda q, r: masa(q, q, q, r, [3, 5]), r'expected q of shape \(B, heads, 0 \+ 15, d\)'),
    (lambda q, r: masa(q, q, q, r, [12], num_prefix_tokens=1), r'\(B, heads, 1 \+ 12, d\)'),
    (lambda q, r: masa(q, q, q, r[:1], [3, 4]), r'decay must be \(heads,\) = \(2,\)'),
    (lambda q, r: masa(q, q, q, r.long(), [3, 4]), 'floating-point log decay'),
    (lambda q, r: masa(q, q, q, r, [3, 4], attn_mask=torch.ones(2, 12)), r'attn_mask must be a \(B, N\)'),
    (lambda q, r: masa(q, q, q, r, [1, 2, 3, 2]), 'grid must have 1 to 3 positive sizes'),
    (lambda q, r: masa(q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1), r), r'\(B, heads, \*grid, d\)'),
    (lambda q, r: masa(q, q, q, r, [3, 4], impl='fast'), "unknown attention path 'fast'"),
])
def test_misshapen_inputs_are_refused_in_one_line(call, message):
    q, _, _, rates, _ = inputs([3, 4])
    with pytest.raises(ValueError, match=message) as error:
        call(q.detach(), rates.detach())
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('what', ['prefix tokens', 'a padding mask', 'a per-token decay', 'a decay gradient'])
def test_forcing_the_kernels_with_an_input_they_cannot_take_raises_instead_of_ignoring_it(what, monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')  # so that only the input stops the kernels
    prefix = 1 if what == 'prefix tokens' else 0
    q, k, v, rates, mask = inputs([3, 4], prefix, decay='token', masked=what == 'a padding mask')
    decay = rates.detach() if what == 'a per-token decay' else decay_rates(2, 2, 4).double()
    decay.requires_grad_(what == 'a decay gradient')
    reason = {'prefix tokens': 'take prefix tokens', 'a padding mask': 'take a padding mask',
              'a per-token decay': 'take a per-token decay', 'a decay gradient': 'give the decay a gradient'}[what]
    with pytest.raises(ValueError, match=f'^the triton attention path cannot {reason}; use another path or auto$'):
        masa(q, k, v, decay, [3, 4], attn_mask=mask, num_prefix_tokens=prefix, impl='triton')


def test_forcing_the_blocked_path_with_prefix_tokens_raises():
    q, k, v, rates, _ = inputs([3, 4], prefix=1)
    with pytest.raises(ValueError, match='the blocked attention path cannot take prefix tokens'):
        masa(q, k, v, rates, [3, 4], num_prefix_tokens=1, impl='blocked')

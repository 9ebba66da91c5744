"""The kernels check their own numbers (:mod:`rmt.attention.verify`): wrong kernels are caught on first use in
eager and compiled code, correct ones are checked once per configuration and direction, the controls, the
tolerances, and the self-test ``python -m rmt --self-test``.

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``); wrong
kernels are made by wrapping :class:`rmt.attention.kernels.Launch` so that a launch corrupts what it wrote.
"""
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import rmt.__main__ as cli
from rmt.attention import (AttentionPlan, clear_kernel_failures, kernel_failures, kernel_report, kernels,
                           masa_attention, plan_attention, set_kernel_verification, triton_op, verify)
from rmt.attention.functional import problem_of
from rmt.position import RelPos

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
needs_kernels = pytest.mark.skipif(kernels.unsupported_reason(torch.device(DEVICE), torch.float32, 16) is not None,
                                   reason='needs Triton, on CUDA or in its CPU interpreter')
pytestmark = needs_kernels
# the default settings at head dim 16 in float32 (tile 32): rows of 40 tokens take the looped kernels, columns of
# 3 the tile kernels
assert kernels.default_config(16, torch.float32, kernels.target_arch(torch.device(DEVICE))).tile <= 32


@pytest.fixture(autouse=True)
def fresh_state():
    """Every test starts with nothing checked, nothing failed, and verification from the environment (first)."""
    clear_kernel_failures()
    previous = set_kernel_verification('first')
    yield
    set_kernel_verification(previous)
    clear_kernel_failures()


@pytest.fixture
def exact_calls(monkeypatch):
    """Counts of the exact path's forward and backward calls inside the op."""
    calls = {'forward': 0, 'backward': 0}
    for direction in calls:
        name = f'_fallback_{direction}'
        original = getattr(triton_op, name)

        def counted(*args, _original=original, _direction=direction, **kwargs):
            calls[_direction] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(triton_op, name, counted)
    return calls


def attention(impl, q, k, v, lce, n=1, decomposed=True, config=None):
    """MaSA of channels-last (B, H, W, C) projections along ``impl`` (the model's pipeline)."""
    H, W, C = q.shape[1:]
    plan = AttentionPlan(impl, torch.float32 if impl == 'triton' else q.dtype, not decomposed and impl != 'triton')
    tables = RelPos(C, n, 2, 4).build([H, W], q.device, plan.table_dtype, plan.needs_full_bias)
    return masa_attention(q, k, v, lce * 1, tables, plan, n, decomposed, kernel_config=config)[0]


def inputs(H=3, W=40, C=16, B=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, C, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(4)]


def forward_backward(fn, x, grad):
    out = fn(*x)
    return (out,) + torch.autograd.grad(out, x[:3], grad)


def triton_fn(decomposed, compiled):
    def fn(q, k, v, lce):
        return attention('triton', q, k, v, lce, decomposed=decomposed)
    return torch.compile(fn, backend='aot_eager', fullgraph=True) if compiled else fn


# --- wrong kernels --------------------------------------------------------------------------------------

def perturb_one_value(out):
    out.view(-1)[out.numel() // 3] += out.abs().max()


def lose_half_the_rows(out):
    out.view(out.shape[0], -1, out.shape[-1])[:, out[0, ..., 0].numel() // 2:] = 0


def scale(t):
    t.mul_(1.5)


# (kernel, index of the tensor it writes in the launch's arguments, the corruption)
WRONG_FORWARD = {
    'perturbed tile output': ('_fwd_tile_kernel', 4, perturb_one_value),
    'half the rows of the tile': ('_fwd_tile_kernel', 4, lose_half_the_rows),
    'perturbed looped output': ('_fwd_loop_kernel', 4, perturb_one_value),
    'half the rows of the loop': ('_fwd_loop_kernel', 4, lose_half_the_rows),
}
WRONG_BACKWARD = {
    'tile dk scaled': ('_bwd_tile_kernel', 5, scale),
    'looped dq perturbed': ('_bwd_dq_kernel', 6, perturb_one_value),
    'looped dk scaled': ('_bwd_dkdv_kernel', 4, scale),
    'looped dv: half the rows': ('_bwd_dkdv_kernel', 5, lose_half_the_rows),
}


def wrong_kernel(monkeypatch, kernel, index, corrupt, only_in_backward=False):
    """Make every launch of ``kernel`` corrupt its ``index``-th argument after writing it (the forward kernels
    only where a backward recomputes a pass, with ``only_in_backward``)."""
    call = kernels.Launch.__call__

    def launch(self):
        call(self)
        if self.kernel.fn.__name__ == kernel:
            corrupt(self.args[index])
    monkeypatch.setattr(kernels.Launch, '__call__', launch)


def runtime_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize('compiled', [False, True], ids=['eager', 'compiled'])
@pytest.mark.parametrize('wrong', list(WRONG_FORWARD) + list(WRONG_BACKWARD))
def test_a_wrong_kernel_is_caught_with_the_exact_results_and_one_warning(monkeypatch, wrong, compiled):
    x = inputs()
    grad = torch.randn_like(x[0])
    want = forward_backward(lambda *t: attention('reference', *t), x, grad)
    fn = triton_fn(True, compiled)
    forward_backward(fn, x, grad)  # compiles while the kernels are right: first uses are checked and verified
    clear_kernel_failures()
    wrong_kernel(monkeypatch, *(WRONG_FORWARD.get(wrong) or WRONG_BACKWARD[wrong]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        first = forward_backward(fn, x, grad)
        second = forward_backward(fn, x, grad)
    messages = runtime_warnings(caught)
    direction = 'forward' if wrong in WRONG_FORWARD else 'backward'
    assert len(messages) == 1, messages
    assert (f'the Triton MaSA {direction} kernels gave wrong results for decomposed attention over a 3x40 grid, '
            f'16 channels in 1 heads, torch.float32 on {torch.device(DEVICE)}') in messages[0]
    assert 'largest error' in messages[0] and ' at batch ' in messages[0] and 'from now on' in messages[0]
    for got in (first, second):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)
    assert [c.status for c in kernel_report() if c.direction == direction] == ['mismatch']
    assert len(kernel_failures()) == 1
    problem = problem_of(x[0], [3, 40], 1, 16, True)
    assert plan_attention('triton', problem, x[0].device).impl != 'triton'


def test_the_warning_names_the_tensor_and_where_its_largest_error_is(monkeypatch):
    def wrong_value(dk):
        dk[1, 0, 2, 13, 21] += 100.  # (B, D, H, W, C)
    wrong_kernel(monkeypatch, '_bwd_dkdv_kernel', 4, wrong_value)
    x = inputs(B=2, C=32)
    with pytest.warns(RuntimeWarning, match=r'in dk at batch 1, token \(2, 13\), channel 21 \(head 1\)'):
        torch.autograd.grad(attention('triton', *x, n=2).sum(), x[:3])


def test_the_interpreters_wrong_bfloat16_dots_are_caught():
    if DEVICE == 'cuda':
        pytest.skip('Triton\'s CPU interpreter only')
    x = [t.detach().bfloat16() for t in inputs()]
    with pytest.warns(RuntimeWarning, match='forward kernels gave wrong results .* torch.bfloat16'), torch.no_grad():
        got = attention('triton', *x)
    want = attention('reference', *[t.float() for t in x])
    assert verify._largest_error(got, want)[0] < verify.tolerance(torch.bfloat16) / 4


# --- correct kernels: checked once ---------------------------------------------------------------------

@pytest.mark.parametrize('mode,forward,backward', [('first', 2, 2), ('always', 6, 6), ('off', 0, 0)])
def test_correct_kernels_are_checked_as_the_mode_says(exact_calls, mode, forward, backward):
    set_kernel_verification(mode)
    for H in (3, 4):  # two configurations, three calls each
        x = inputs(H, 5)
        for _ in range(3):
            torch.autograd.grad(attention('triton', *x).sum(), x[:3])
    assert exact_calls == {'forward': forward, 'backward': backward}
    statuses = {'first': 'verified', 'always': 'verified', 'off': 'unchecked'}[mode]
    assert sorted((c.config[2], c.direction, c.status) for c in kernel_report()) == [
        ((H, 5), d, statuses) for H in (3, 4) for d in ('backward', 'forward')]
    assert not kernel_failures()


def test_a_compiled_model_checks_each_configuration_once(exact_calls):
    x = inputs()
    fn = triton_fn(False, True)
    for _ in range(3):
        torch.autograd.grad(fn(*x).sum(), x[:3])
    assert exact_calls == {'forward': 1, 'backward': 1}
    assert {c.status for c in kernel_report()} == {'verified'}


def test_the_recomputed_forward_of_gradient_checkpointing_is_not_checked_again(exact_calls):
    x = inputs()
    out = checkpoint(lambda *t: attention('triton', *t), *x, use_reentrant=False)
    torch.autograd.grad(out.sum(), x[:3])
    assert exact_calls == {'forward': 1, 'backward': 1}


def test_under_autocast_the_exact_path_computes_in_float32_without_autocast(monkeypatch):
    seen = []
    original = triton_op._fallback_forward
    monkeypatch.setattr(triton_op, '_fallback_forward', lambda q, *a: seen.append(
        (q.dtype, torch.is_autocast_enabled('cpu'))) or original(q, *a))
    x = [t.detach().half() for t in inputs()]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # correct float16 kernels pass their check
        with torch.autocast('cpu', dtype=torch.float16), torch.no_grad():
            attention('triton', *x)
    assert seen == [(torch.float32, False)]
    assert [c.status for c in kernel_report()] == ['verified']


# --- the controls ----------------------------------------------------------------------------------------

def test_the_environment_variable_sets_the_mode_and_a_bad_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv('RMT_VERIFY_KERNELS', 'always')
    set_kernel_verification(None)
    assert verify.kernel_verification() == 'always'
    monkeypatch.setenv('RMT_VERIFY_KERNELS', 'sometimes')
    with pytest.raises(ValueError, match=r"^RMT_VERIFY_KERNELS='sometimes': expected one of first, always, off$"):
        set_kernel_verification(None)
    monkeypatch.delenv('RMT_VERIFY_KERNELS')
    assert set_kernel_verification(None) is None and verify.kernel_verification() == 'first'


def test_the_setter_returns_the_previous_mode_and_refuses_others():
    assert set_kernel_verification('off') == 'first'
    assert set_kernel_verification('always') == 'off'
    with pytest.raises(ValueError, match="mode='never': expected one of first, always, off"):
        set_kernel_verification('never')
    assert verify.kernel_verification() == 'always'


# --- the tolerances ---------------------------------------------------------------------------------------

def test_float16_kernels_stay_within_a_fifth_of_their_tolerance():
    """What justifies float16's (and TF32's, the same 10-bit mantissa) 1e-2: the kernels' largest error
    against float32, forward and backward, tile and looped kernels, decomposed and full."""
    for decomposed, H, W in [(True, 3, 20), (False, 4, 6), (False, 5, 7)]:
        x = inputs(H, W)
        grad = torch.randn_like(x[0])
        half = [t.detach().half().requires_grad_() for t in x]
        got = forward_backward(lambda *t: attention('triton', *t, decomposed=decomposed), half, grad.half())
        want = forward_backward(lambda *t: attention('reference', *t, decomposed=decomposed),
                                [t.detach().float().requires_grad_() for t in half], grad)
        error, mismatch = verify.compare(dict(zip('oqkv', zip(got, want))), verify.tolerance(torch.float16) / 5, 2)
        assert mismatch is None and error > 1e-4, (error, mismatch)


def test_bfloat16_tolerance_is_four_times_a_bfloat16_attentions_rounding():
    """bfloat16's 4e-2: an attention that rounds what the kernels round (inputs, probabilities, output) to
    bfloat16 and computes the rest in float32 errs by less than a quarter of it against float32."""
    q, k, v = [t.detach().bfloat16().float().movedim(-1, 1) for t in inputs(1, 64, 32)[:3]]
    p = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / 32 ** 0.5).softmax(-1)
    want = p @ v.transpose(1, 2)
    rounded = (p.bfloat16().float() @ v.transpose(1, 2)).bfloat16().float()
    error, _ = verify._largest_error(rounded, want)
    assert verify.tolerance(torch.bfloat16) / 8 < error * 4 < verify.tolerance(torch.bfloat16)


def test_errors_are_relative_to_the_scale_and_a_nan_is_a_mismatch():
    want = torch.tensor([[[100., -200.]]])
    assert verify._largest_error(want + torch.tensor([[[2., 0.]]]), want) == (pytest.approx(0.01), 0)
    error, mismatch = verify.compare({'output': (torch.tensor([[[100., float('nan')]]]), want)}, 1e-2, 1)
    assert error == float('inf') and mismatch.where == 'batch 0, token 0, channel 1 (head 0)'
    inf = torch.tensor([[[float('inf'), 1.]]])
    assert verify._largest_error(inf, inf) == (0., 0)  # where the exact result is not finite nothing is judged


# --- the self-test -----------------------------------------------------------------------------------------

def test_self_test_prints_a_report_of_every_configuration_and_passes(capsys):
    assert cli.main(['--self-test', '--models', 'rmt_t,rmt_s', '--sizes', '32', '--dtypes', 'float32']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('rmt self-test: ') and f'torch {torch.__version__}, triton ' in lines[0]
    rows = [line.split(' | ') for line in lines if line.startswith('| ') and line[2].isdigit()]
    assert [(r[0], r[1], r[5]) for r in rows] == [
        ('| 8x8', 'decomposed', 'rmt_s,rmt_t'), ('| 4x4', 'decomposed', 'rmt_s,rmt_t'), ('| 2x2', 'full', 'rmt_t'),
        ('| 1x1', 'full', 'rmt_s,rmt_t'), ('| 2x2', 'decomposed', 'rmt_s')]
    assert all(float(r[6]) < 1e-5 and r[-1] == 'pass |' for r in rows)
    assert lines[-1] == 'rmt self-test: 5 of 5 configurations passed'
    assert verify.kernel_verification() == 'first'  # the self-test ran the kernels alone, then set it back


def test_self_test_fails_on_a_wrong_kernel(monkeypatch, capsys):
    wrong_kernel(monkeypatch, '_bwd_tile_kernel', 6, scale)
    assert cli.main(['--self-test', '--models', 'rmt_t', '--sizes', '16', '--dtypes', 'float32']) == 1
    out = capsys.readouterr().out
    assert '| FAIL: largest error 5.00e-01' in out and ' in dv at ' in out
    assert out.splitlines()[-1] == 'rmt self-test: 0 of 4 configurations passed; 4 FAILED'  # all tile kernels


def test_self_test_without_a_gpu_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(kernels, 'interpreting', lambda: False)
    assert cli.main(['--self-test', '--device', 'cpu']) == 0
    assert capsys.readouterr().out == ('rmt self-test: no GPU here (and TRITON_INTERPRET is not set): the Triton '
                                       'kernels do not run on this machine, nothing to test\n')


def test_stage_shapes_at_a_detection_size():
    from rmt.tools.self_test import DETECTION_SIZE, stage_shapes
    assert [s[1:3] for s in stage_shapes('rmt_s', *DETECTION_SIZE)] == [
        (200, 336), (100, 168), (50, 84), (25, 42)]

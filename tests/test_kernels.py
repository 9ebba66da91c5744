"""The Triton MaSA kernels: outputs and gradients against the reference, the op's contract, where they run,
and what happens when they cannot.

Without a GPU they run in Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``); with one,
the same tests run the compiled kernels on CUDA, and the CUDA-only tests check bfloat16.
"""
import warnings

import pytest
import timm
import torch

from rmt.attention import AttentionPlan, clear_kernel_failures, kernel_failures, kernels, masa_attention
from rmt.attention import plan_attention as plan_problem
from rmt.attention.functional import problem_of
from tests.helpers import load_small, small_kwargs, tables_for

masa_op = torch.ops.rmt.masa.default  # the custom ops, by their registered names
masa_backward_op = torch.ops.rmt.masa_backward.default


def forward_argument(name):
    """A spy on ``kernels.masa_forward`` arguments: ``(record, wrapper)``, the wrapper appending argument ``name``."""
    import inspect
    signature, original, record = inspect.signature(kernels.masa_forward), kernels.masa_forward, []

    def wrapper(*args, **kwargs):
        record.append(signature.bind(*args, **kwargs).arguments[name])
        return original(*args, **kwargs)
    return record, wrapper


DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
needs_kernels = pytest.mark.skipif(kernels.unsupported_reason(torch.device(DEVICE), torch.float32, 16) is not None,
                                   reason='needs Triton, on CUDA or in its CPU interpreter')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available(),
                                reason='needs CUDA and Triton')


@pytest.fixture(autouse=True)
def fresh_kernel_state():
    """Every test starts with no recorded kernel failures (and guarded first uses)."""
    clear_kernel_failures()
    yield
    clear_kernel_failures()


def plan_attention(requested, decomposed, num_heads, x):
    """The plan of a MaSA call on the channels-last (B, H, W, C) map ``x``."""
    grid = list(x.shape[1:-1])
    return plan_problem(requested, problem_of(x, grid, num_heads, x.shape[-1] // num_heads, decomposed), x.device)


def masa(impl, q, k, v, lce, n, decomposed, dtype=torch.float32, config=None):
    """The one MaSA pipeline along ``impl``; ``lce`` is not modified."""
    H, W = q.shape[1:3]
    plan = AttentionPlan(impl, dtype, not decomposed and impl != 'triton')
    tables = tables_for([H, W], n, q.shape[-1] // n, plan.needs_full_bias, dtype, device=DEVICE)
    return masa_attention(q, k, v, lce * 1, tables, plan,
                          n, decomposed, kernel_config=config)[0]


def inputs(B, H, W, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, C, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(4)]


# (B, H, W, heads, head_dim): several sequences packed in a tile, one sequence per tile, rows and
# columns longer than a tile (looped kernels), and head sizes padded inside the kernels (8, 12)
DECOMPOSED = [(2, 5, 7, 2, 16), (3, 14, 14, 2, 32), (1, 6, 56, 1, 16), (1, 70, 3, 2, 8), (1, 3, 66, 1, 12)]
FULL = [(2, 4, 6, 2, 16), (1, 7, 7, 2, 32), (1, 9, 10, 2, 8), (1, 5, 30, 1, 12)]
SHAPES = [(True, *s) for s in DECOMPOSED] + [(False, *s) for s in FULL]


@needs_kernels
@pytest.mark.parametrize('decomposed,B,H,W,n,d', SHAPES)
def test_masa_matches_reference(decomposed, B, H, W, n, d):
    q, k, v, lce = inputs(B, H, W, n * d)
    with torch.no_grad():
        torch.testing.assert_close(masa('triton', q, k, v, lce, n, decomposed),
                                   masa('reference', q, k, v, lce, n, decomposed), rtol=1e-5, atol=2e-5)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize('decomposed,B,H,W,n,d', SHAPES)
def test_masa_gradients_match_reference(decomposed, B, H, W, n, d):
    q, k, v, lce = inputs(B, H, W, n * d)
    out = masa('triton', q, k, v, lce, n, decomposed)
    expected = masa('reference', q, k, v, lce, n, decomposed)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, lce), grad)
    want = torch.autograd.grad(expected, (q, k, v, lce), grad)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


@needs_kernels
def test_kernel_settings_are_arguments_and_give_the_same_result():
    q, k, v, lce = [t.detach() for t in inputs(1, 3, 40, 32)]
    default = masa('triton', q, k, v, lce, 2, True)
    small_tiles = masa('triton', q, k, v, lce, 2, True, config=kernels.KernelConfig(tile=16, block_m=16, block_n=32))
    assert kernels.looped('w', (1, 3, 40), kernels.KernelConfig(tile=16))
    assert not kernels.looped('w', (1, 3, 40), kernels.KernelConfig())
    torch.testing.assert_close(small_tiles, default, rtol=1e-5, atol=2e-5)


def test_default_settings_shrink_key_blocks_where_the_compiler_would_spill():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert kernels.default_config(48, bf16, 90, (3, 8)) == kernels.KernelConfig(32, 32, 32, num_stages=1)
    assert kernels.default_config(48, bf16, 90, (3, 3)).block_n == 16  # Triton 3.3 spills with 32
    assert kernels.default_config(64, fp32, 80, (3, 8)).block_n == 16  # the float32 dk/dv kernel spills with 32
    assert kernels.default_config(32, bf16, 80, (3, 3)).bwd_warps == 8  # 3.3 spills in 4-warp backward kernels
    assert kernels.default_config(16, fp32, 90, (3, 8)) == kernels.KernelConfig(32, 32, 32, num_stages=1)
    assert kernels.default_config(16, bf16, 80, (3, 8)) == kernels.KernelConfig(block_m=32, block_n=32)
    assert kernels.default_config(16, bf16, 90, (3, 8)) == kernels.KernelConfig()
    assert kernels.default_config(48, bf16, 90, (4, 0)).block_n == 32  # a release without rows of its own: ANY's


# --- the passes over 1-, 2- and 3-D grids, against a float64 torch reference -------------------------------

def reference_passes(q, k, v, residual, rotation, decay, scale, n, passes):
    """MaSA's attention along ``passes`` in float64 torch on (B, D, H, W, C) tensors: the theta shift from the
    (D, H, W, 1, d / 2, 2) table of (cos, sin) pairs (None: none), then each pass's output is the next one's
    values, with bias decay * (|dd'| + |di'| + |dj'|) in full attention and along one axis in an axis pass."""
    B, D, H, W, C = q.shape
    q, k, v = [x.double().unflatten(-1, (n, C // n)) for x in (q, k, v)]  # (B, D, H, W, n, d)
    if rotation is not None:
        cos, sin = rotation.double().unbind(-1)  # (D, H, W, 1, d / 2)
        q, k = [torch.stack((x[..., 0::2] * cos - x[..., 1::2] * sin, x[..., 1::2] * cos + x[..., 0::2] * sin),
                            -1).flatten(-2) for x in (q, k)]
    decay = decay.double()[:, None, None]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in (D, H, W)], indexing='ij'), -1)
    for mode in passes:
        if mode == 'full':  # (B, n, L, d), all D * H * W tokens
            qs, ks, vs = [x.flatten(1, 3).transpose(1, 2) for x in (q, k, v)]
            c = grid.flatten(0, 2)
            bias = decay * (c[:, None] - c[None]).abs().sum(-1)
            v = ((qs @ ks.transpose(-2, -1) * scale + bias).softmax(-1) @ vs).transpose(1, 2).unflatten(1, (D, H, W))
        else:  # (B, ..., n, L, d), the sequences along one axis
            axis = {'w': 3, 'h': 2, 'd': 1}[mode]
            qs, ks, vs = [x.movedim(axis, -2) for x in (q, k, v)]
            t = torch.arange(q.shape[axis], dtype=torch.float64)
            bias = decay * (t[:, None] - t[None]).abs()
            v = ((qs @ ks.transpose(-2, -1) * scale + bias).softmax(-1) @ vs).movedim(-2, axis)
    out = v.flatten(-2)
    return out if residual is None else out + residual.double()


def run_kernels(q, k, v, residual, rotation, decay, scale, n, passes, config, grad=None):
    """The kernels' output, and with ``grad`` also (dq, dk, dv), on (B, D, H, W, C) tensors."""
    out, stats, launches = kernels.masa_forward(q, k, v, residual, rotation, decay, scale, n, passes,
                                                grad is not None, False, config)
    for launch in launches:
        launch()
    if grad is None:
        return out
    *grads, launches = kernels.masa_backward(grad, q, k, v, out, residual, stats, rotation, decay, scale, n, passes,
                                             False, config)
    for launch in launches:
        launch()
    return out, *grads


def grid_inputs(B, grid, n, d, rotate, residual, seed=0):
    """q, k, v, residual (or None), rotation table (or None) and decay of a (B, *grid, n * d) problem."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, res = [torch.randn(B, *grid, n * d, generator=g).to(DEVICE) for _ in range(4)]
    angles = torch.rand(*grid, 1, d // 2, generator=g) * 6.3
    rotation = torch.stack((angles.cos(), angles.sin()), -1).to(DEVICE) if rotate else None
    decay = torch.linspace(-0.2, -1.5, n).to(DEVICE)
    return q, k, v, res if residual else None, rotation, decay


SMALL = kernels.KernelConfig(tile=16, block_m=16, block_n=16)  # sequences over 16 tokens loop
# (B, (D, H, W), decomposed, heads, head dim, theta shift, residual, settings): 1-D rows packed in a tile, a
# single token, looped with a ragged last block; 2-D 13x9 both forms; 3-D 3x5x7 decomposed in tiles and full
# looped, full in one tile, the column and depth passes looped, a 1x1x1 grid; no theta shift; no residual
GRIDS = [
    (3, (1, 1, 13), True, 2, 8, True, True, kernels.KernelConfig()),
    (2, (1, 1, 1), False, 1, 16, True, True, kernels.KernelConfig()),
    (1, (1, 1, 40), True, 2, 8, False, False, SMALL),
    (1, (1, 13, 9), True, 2, 8, True, True, kernels.KernelConfig()),
    (1, (1, 13, 9), False, 1, 16, True, False, kernels.KernelConfig()),
    (2, (3, 5, 7), True, 2, 8, True, True, kernels.KernelConfig()),
    (1, (3, 5, 7), False, 2, 8, True, True, kernels.KernelConfig()),
    (2, (2, 3, 4), False, 2, 8, False, True, kernels.KernelConfig()),
    (1, (17, 17, 1), True, 1, 16, True, False, SMALL),
    (1, (1, 1, 1), True, 2, 8, True, True, kernels.KernelConfig()),
    (1, (3, 5, 7), True, 1, 16, False, False, SMALL),
]


def grid_passes(grid, decomposed):
    """The passes of a (D, H, W) grid: a 1-D one is (1, 1, W), a 2-D one (1, H, W)."""
    ndim = 3 if grid[0] > 1 else 2 if grid[1] > 1 else 1
    return kernels.pass_modes(3 if grid == (1, 1, 1) else ndim, decomposed)


@needs_kernels
@pytest.mark.parametrize('B,grid,decomposed,n,d,rotate,residual,config', GRIDS)
def test_passes_over_every_grid_match_the_float64_reference(B, grid, decomposed, n, d, rotate, residual, config):
    q, k, v, res, rotation, decay = grid_inputs(B, grid, n, d, rotate, residual)
    passes = grid_passes(grid, decomposed)
    out = run_kernels(q, k, v, res, rotation, decay, d ** -0.5, n, passes, config)
    want = reference_passes(q, k, v, res, rotation, decay, d ** -0.5, n, passes)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize('B,grid,decomposed,n,d,rotate,residual,config', GRIDS)
def test_gradients_over_every_grid_match_the_float64_reference(B, grid, decomposed, n, d, rotate, residual, config):
    q, k, v, res, rotation, decay = grid_inputs(B, grid, n, d, rotate, residual)
    passes = grid_passes(grid, decomposed)
    grad = torch.randn_like(q)
    _, *grads = run_kernels(q, k, v, res, rotation, decay, d ** -0.5, n, passes, config, grad)
    q64, k64, v64 = [x.double().requires_grad_() for x in (q, k, v)]
    want = reference_passes(q64, k64, v64, res, rotation, decay, d ** -0.5, n, passes)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad.double())
    assert len(grads) == len(want_grads) == 3
    for name, got, expected in zip('qkv', grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=5e-5, msg=lambda m: f'd{name}: {m}')


def test_pass_modes_per_number_of_axes():
    assert kernels.pass_modes(1, True) == kernels.pass_modes(1, False) == ('w',)
    assert kernels.pass_modes(2, True) == ('w', 'h')
    assert kernels.pass_modes(3, True) == ('w', 'h', 'd')
    assert kernels.pass_modes(2, False) == kernels.pass_modes(3, False) == ('full',)
    with pytest.raises(ValueError, match='MaSA grids have 1, 2 or 3 axes, got 4'):
        kernels.pass_modes(4, True)


def test_statistics_are_kept_for_each_looped_pass_of_a_3d_grid():
    q = torch.empty(2, 20, 3, 40, 16)
    shapes = kernels.stats_shapes(q, 2, ('w', 'h', 'd'), True, kernels.KernelConfig(tile=16))
    assert shapes == [(2 * 20 * 3 * 40, 2), (0,), (2 * 20 * 3 * 40, 2)]  # rows of 40 and depth lines of 20 loop
    assert kernels.stats_shapes(q, 2, ('full',), False, kernels.KernelConfig()) == [(0,)]
    assert kernels.looped('d', (20, 3, 40), kernels.KernelConfig(tile=16))
    assert not kernels.looped('h', (20, 3, 40), kernels.KernelConfig(tile=16))


# --- the op's contract -----------------------------------------------------------------------------------

def op_args(B, H, W, n, d, decomposed, keep_stats=True, dtype=torch.float32):
    q, k, v, lce = [t.detach().requires_grad_(keep_stats) for t in inputs(B, H, W, n * d, dtype)]
    tables = tables_for([H, W], n, d, with_full=False, device=DEVICE)
    return (q, k, v, lce, tables.rotation, tables.decay, n, decomposed, keep_stats, False,
            list(kernels.default_config(d, dtype)))


# tiles; looped rows with tiled columns; full attention at odd sizes; head dims 2 to 64
OPCHECK = [(2, 5, 7, 2, 16, True), (1, 3, 70, 2, 2, True), (1, 9, 11, 1, 64, False), (1, 13, 7, 1, 6, False)]


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize('B,H,W,n,d,decomposed', OPCHECK)
def test_op_passes_torch_library_opcheck(B, H, W, n, d, decomposed):
    torch.library.opcheck(masa_op, op_args(B, H, W, n, d, decomposed))


@needs_kernels
def test_statistics_of_every_looped_pass_are_written_and_of_no_other_pass_kept():
    args = op_args(1, 3, 70, 1, 8, True)
    with torch.no_grad():
        first = masa_op(*args)
        second = masa_op(*args)
    assert first[1].shape == (3 * 70, 1) and first[2].shape == (0,)  # rows of 70 loop, columns of 3 do not
    assert first[3].shape == (0,)  # no third pass
    assert torch.isfinite(first[1]).all() and torch.equal(first[1], second[1])


@needs_kernels
def test_backward_op_writes_none_of_its_inputs():
    q, k, v, lce, rotation, decay, n, decomposed, _, ieee, config = op_args(1, 3, 70, 1, 8, True)
    q, k, v, lce = [t.detach() for t in (q, k, v, lce)]
    out, rows_stats, cols_stats, none = masa_op(q, k, v, lce, rotation, decay, n, decomposed, True, ieee, config)
    inputs = [torch.randn_like(out), q, k, v, out, lce, torch.full_like(rows_stats, 7.), cols_stats, none, rotation,
              decay]
    before = [t.clone() for t in inputs]
    masa_backward_op(*inputs, n, decomposed, ieee, config)
    assert len(inputs) == len(before) == 11
    for got, want in zip(inputs, before, strict=True):
        assert torch.equal(got, want)


@needs_kernels
def test_inference_keeps_no_softmax_statistics():
    out, rows, cols, depth = masa_op(*op_args(1, 3, 70, 1, 16, True, keep_stats=False))  # rows of 70 loop
    assert out.shape == (1, 3, 70, 16) and rows.numel() == cols.numel() == depth.numel() == 0


@needs_kernels
@pytest.mark.parametrize('decomposed,H,W', [(True, 70, 3), (False, 9, 8)])
def test_empty_batch_runs_forward_and_backward(decomposed, H, W):
    q, k, v, lce = inputs(0, H, W, 16)
    out = masa('triton', q, k, v, lce, 1, decomposed)
    grads = torch.autograd.grad(out.sum(), (q, k, v, lce))
    assert out.shape == (0, H, W, 16) and [g.shape for g in grads] == [(0, H, W, 16)] * 4


@needs_kernels
def test_non_contiguous_inputs_give_the_contiguous_result():
    q, k, v, lce = [t.detach() for t in inputs(2, 6, 5, 16)]
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not transposed.is_contiguous()
    args = list(op_args(2, 6, 5, 1, 16, True, keep_stats=False))
    args[:4] = [q, k, v, lce]
    want = masa_op(*args)[0]
    args[0] = transposed
    torch.testing.assert_close(masa_op(*args)[0], want, rtol=0, atol=0)


@needs_kernels
def test_lce_alone_gets_its_gradient():
    q, k, v, lce = inputs(1, 3, 70, 16)
    out = masa('triton', q.detach(), k.detach(), v.detach(), lce, 1, True)
    (grad,) = torch.autograd.grad(out, lce, torch.ones_like(out))
    torch.testing.assert_close(grad, torch.ones_like(lce))


# --- where the kernels run ---------------------------------------------------------------------------

@pytest.mark.skipif(not kernels.available(), reason='needs Triton')
def test_kernels_need_ampere_or_newer(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    assert kernels.unsupported_reason(torch.device('cuda', 0), torch.bfloat16, 32) == \
        'compute capability 7.5 is below 8.0'
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    assert kernels.unsupported_reason(torch.device('cuda', 0), torch.bfloat16, 32) is None


@pytest.mark.skipif(not kernels.available(), reason='needs Triton')
def test_kernels_need_triton_3_2_or_newer(monkeypatch):
    monkeypatch.setattr(kernels.triton, '__version__', '3.1.0')
    assert kernels.unsupported_reason(torch.device('cpu'), torch.float32, 16) == 'Triton 3.1.0 is older than 3.2'
    x = torch.empty(1, 14, 14, 64)
    assert plan_attention('triton', True, 4, x).impl == 'bmm'  # what 'auto' picks on the CPU
    monkeypatch.setattr(kernels.triton, '__version__', '3.2.0')
    assert plan_attention('triton', True, 4, x).impl == ('triton' if kernels.interpreting() else 'bmm')


@pytest.mark.skipif(not kernels.available(), reason='needs Triton')
def test_kernels_refuse_odd_wide_and_double_heads_and_the_plain_cpu(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    cpu = torch.device('cpu')
    assert kernels.unsupported_reason(cpu, torch.float32, 15) == 'head dim 15 is odd or above 64'
    assert kernels.unsupported_reason(cpu, torch.float32, 128) == 'head dim 128 is odd or above 64'
    assert kernels.unsupported_reason(cpu, torch.float64, 32) == 'no kernels for torch.float64'
    assert kernels.unsupported_reason(cpu, torch.float32, 64) is None
    monkeypatch.delenv('TRITON_INTERPRET')
    assert kernels.unsupported_reason(cpu, torch.float32, 32) == \
        'the kernels need CUDA, or TRITON_INTERPRET=1 on the CPU'


def test_without_triton_nothing_plans_it(monkeypatch):
    monkeypatch.setattr(kernels, 'triton', None)
    x = torch.empty(1, 14, 14, 64, device=DEVICE)
    assert kernels.unsupported_reason(x.device, torch.float32, 16) == 'Triton is not installed'
    for decomposed in (True, False):
        assert plan_attention('triton', decomposed, 4, x) == plan_attention('auto', decomposed, 4, x)
        assert plan_attention('triton', decomposed, 4, x).impl != 'triton'


def fake_cuda(*shape, dtype=torch.float32, index=0):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.empty(*shape, dtype=dtype, device=f'cuda:{index}')


@pytest.mark.skipif(not kernels.available(), reason='needs Triton')
def test_auto_takes_the_kernels_on_cuda_in_half_precision_and_tf32_from_triton_3_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    x = fake_cuda(8, 56, 56, 64, dtype=torch.bfloat16)
    assert plan_attention('auto', True, 4, x) == AttentionPlan('triton', torch.float32, False)
    x32 = fake_cuda(8, 56, 56, 64)
    assert plan_attention('auto', True, 4, x32).impl == 'sdpa'  # 'highest' float32 precision: IEEE dots spill
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('high')
        monkeypatch.setattr(kernels.triton, '__version__', '3.8.0')
        assert plan_attention('auto', True, 4, x32).impl == 'triton'
        monkeypatch.setattr(kernels.triton, '__version__', '3.6.0')  # its tf32 kernels spill
        assert plan_attention('auto', True, 4, x32).impl == 'sdpa'
        assert plan_attention('auto', True, 4, x).impl == 'triton'
    finally:
        torch.set_float32_matmul_precision(precision)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    assert plan_attention('auto', True, 4, x).impl == 'sdpa'


@needs_kernels
def test_float32_dots_follow_torchs_matmul_precision(monkeypatch):
    seen, spy = forward_argument('ieee')
    monkeypatch.setattr(kernels, 'masa_forward', spy)
    q, k, v, lce = [t.detach() for t in inputs(1, 4, 4, 16)]
    precision = torch.get_float32_matmul_precision()
    try:
        for setting in ('highest', 'high', 'medium'):
            torch.set_float32_matmul_precision(setting)
            masa('triton', q, k, v, lce, 1, True)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert seen == [True, False, False]


def test_device_guard_selects_the_tensors_cuda_device(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, 'device', Recorder)
    with kernels.device_guard(torch.device('cuda', 1)):
        pass
    with kernels.device_guard(torch.device('cpu')):
        pass
    assert entered == [torch.device('cuda', 1)]


@needs_kernels
def test_every_launch_runs_under_the_inputs_device_guard(monkeypatch):
    guarded, launched = [], []
    device_guard = kernels.device_guard

    class Spy:
        def __init__(self, device):
            self.device, self.inner = device, device_guard(device)

        def __enter__(self):
            guarded.append(self.device)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            guarded.append(None)
            return self.inner.__exit__(*exc)

    call = kernels.Launch.__call__
    monkeypatch.setattr(kernels, 'device_guard', Spy)
    monkeypatch.setattr(kernels.Launch, '__call__', lambda self: launched.append(guarded[-1]) or call(self))
    q, k, v, lce = inputs(1, 3, 70, 16)
    out = masa('triton', q, k, v, lce, 1, True)
    torch.autograd.grad(out.sum(), (q, k, v))
    assert len(launched) == 6 and set(launched) == {q.device}  # forward: 2 passes; backward: rows again, 1 + 2


# --- when a kernel fails -----------------------------------------------------------------------------------

def failing_launch(monkeypatch, error, kernel_name=None):
    call = kernels.Launch.__call__

    def launch(self):
        if kernel_name is None or self.kernel.fn.__name__ == kernel_name:
            raise error
        call(self)
    monkeypatch.setattr(kernels.Launch, '__call__', launch)


@needs_kernels
@pytest.mark.parametrize('error', [RuntimeError('PassManager::run failed'),  # a compile error
                                   RuntimeError('Triton Error [CUDA]: an illegal memory access')])
def test_a_failing_kernel_falls_back_with_one_warning_to_the_sdpa_path(monkeypatch, error):
    model = load_small().to(DEVICE)
    x = torch.randn(2, 3, 64, 48, device=DEVICE)
    model.set_attn_impl('sdpa')
    with torch.no_grad():
        want = model(x)
    failing_launch(monkeypatch, error)
    model.set_attn_impl('triton')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with torch.no_grad():
            first = model(x)
            second = model(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # one warning per failed configuration (four stage shapes), naming the reason and the fallback
    assert len(messages) == 4 and all(str(error) in m and 'using torch operators' in m for m in messages), messages
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)
    assert len(kernel_failures()) == 4
    assert plan_attention('triton', True, 2, torch.empty(2, 16, 12, 16, device=DEVICE)).impl != 'triton'


@needs_kernels
def test_a_failing_backward_kernel_falls_back_to_exact_gradients(monkeypatch):
    failing_launch(monkeypatch, RuntimeError('out of resources: shared memory'), '_bwd_dkdv_kernel')
    q, k, v, lce = inputs(1, 3, 70, 16)
    out = masa('triton', q, k, v, lce, 2, True)
    grad = torch.randn_like(out)
    with pytest.warns(RuntimeWarning, match='backward kernels failed .* out of resources'):
        got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(masa('reference', q, k, v, lce, 2, True), (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)
    assert plan_attention('triton', True, 2, torch.empty(1, 3, 70, 16, device=DEVICE)).impl != 'triton'


@pytest.mark.slow
@needs_kernels
def test_a_failing_kernel_falls_back_inside_a_compiled_model(monkeypatch):
    model = load_small().to(DEVICE)
    x = torch.randn(1, 3, 64, 48, device=DEVICE)
    model.set_attn_impl('sdpa')
    with torch.no_grad():
        want = model(x)
    model.set_attn_impl('triton')
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    failing_launch(monkeypatch, RuntimeError('PassManager::run failed'))
    with pytest.warns(RuntimeWarning, match='PassManager'), torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- the model on the Triton path ----------------------------------------------------------------------------

@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize('size', ['64x64', '96x80', '70x50'])
def test_released_logits_through_the_triton_path(expected, size, monkeypatch):
    calls, spy = forward_argument('passes')
    monkeypatch.setattr(kernels, 'masa_forward', spy)
    model = load_small().to(DEVICE)
    model.set_attn_impl('triton')
    with torch.no_grad():
        logits = model(expected[size]['input'].to(DEVICE))
    assert calls == [('w', 'h')] * 3 + [('full',)] * 3  # every block of the 1-2-2-1 config, both forms
    torch.testing.assert_close(logits.cpu(), expected[size]['logits'], rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_kernels
def test_compiled_model_with_the_triton_path_matches_eager_and_trains():
    torch.manual_seed(0)
    model = timm.create_model('rmt_t', **small_kwargs(depths=(1, 1, 1, 1))).to(DEVICE).eval()  # both forms
    model.set_attn_impl('triton')
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    compiled(x).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _small_on_the_triton_path():
    """The small released-format model set to the Triton path, a 64 px input, and its eager output."""
    model = load_small().to(DEVICE)
    model.set_attn_impl('triton')
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.slow
@needs_kernels
def test_tracing_keeps_standard_operators():
    model, x, want = _small_on_the_triton_path()
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    assert 'rmt::masa' not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@needs_kernels
def test_torchscript_and_export_of_a_triton_model_take_the_standard_paths():
    model, x, want = _small_on_the_triton_path()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=1e-4, atol=1e-5)
        exported = torch.export.export(model, (x,))
    assert 'rmt.masa' not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-4, atol=1e-5)


# --- half precision (bfloat16 at full size on CUDA) --------------------------------------------------

def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check_half_precision(dtype, decomposed, B, H, W, n, d):
    q, k, v, lce = inputs(B, H, W, n * d, dtype)
    out = masa('triton', q, k, v, lce, n, decomposed)
    q64, k64, v64, lce64 = [t.detach().double().requires_grad_() for t in (q, k, v, lce)]
    want = masa('reference', q64, k64, v64, lce64, n, decomposed, dtype=torch.float64)
    assert out.dtype == dtype and relative_error(out, want) < 1e-2
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad)
    for got, ref in zip(got_grads, want_grads, strict=True):
        assert got.dtype == dtype and relative_error(got, ref) < 2e-2


@pytest.mark.slow
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
                                                  (False, 8, 7, 7, 16, 32), (False, 2, 24, 24, 8, 32),
                                                  (True, 2, 80, 80, 2, 64), (False, 2, 12, 12, 2, 64)])
def test_bfloat16_kernels_at_stage_shapes_are_close_to_the_float64_reference(decomposed, B, H, W, n, d):
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


@needs_cuda
def test_a_model_on_the_second_gpu_runs_there():
    if torch.cuda.device_count() < 2:
        pytest.skip('needs two GPUs')
    model = load_small().to('cuda:1')
    model.set_attn_impl('triton')
    x = torch.randn(1, 3, 64, 64, device='cuda:1')
    with torch.no_grad():
        got = model(x)
    model.set_attn_impl('reference')
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)

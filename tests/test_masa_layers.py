"""MaSA1d / MaSA2d / MaSA3d, the standalone layers: what they compute, padded batches, prefix tokens, a learnable
or data-dependent decay, argument and shape errors, training, TorchScript and torch.export."""
import math
import warnings

import pytest
import torch
from torch import nn

from rmt.attention import MaSA, MaSA1d, MaSA2d, MaSA3d, masa_reference
from rmt.position import rotary_tables, rotary_angles, theta_shift_reference
from tests.helpers import assert_close

LAYERS = {1: MaSA1d, 2: MaSA2d, 3: MaSA3d}
GRIDS = {1: [9], 2: [5, 7], 3: [3, 4, 5]}
PATHS = ['auto', 'reference', 'bmm', 'sdpa', 'blocked']
FORMS = [(impl, False) for impl in PATHS] + [(impl, True) for impl in PATHS if impl != 'blocked']


def layer(ndim, decomposed=False, dim=16, heads=2, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    return LAYERS[ndim](dim, heads, decomposed, **kwargs).to(dtype)


def spelled_out(m: MaSA, x: torch.Tensor, grid, prefix: int = 0) -> torch.Tensor:
    """The layer's output from its parameters: projections, theta shift at the raster index, masa_reference,
    LCE on v, output projection; x (B, P + L, C)."""
    B, C, n = x.shape[0], m.dim, m.num_heads
    q, k, v = m.q(x), m.k(x), m.v(x)
    heads = [t.unflatten(-1, (n, C // n)) for t in (q, k, v)]
    sin, cos = rotary_tables(rotary_angles(C // n), list(grid), x.device, x.dtype)
    sin, cos = sin.reshape(-1, 1, C // n), cos.reshape(-1, 1, C // n)
    q, k = [torch.cat([t[:, :prefix], theta_shift_reference(t[:, prefix:], sin, cos)], 1) for t in heads[:2]]
    out = masa_reference(*[t.transpose(1, 2) for t in (q, k, heads[2])], m.relpos.rates().to(x.dtype), list(grid),
                         m.decomposed, num_prefix_tokens=prefix).transpose(1, 2).flatten(-2)
    v_grid = v[:, prefix:].unflatten(1, grid).movedim(-1, 1)
    lce = m.lce(v_grid).movedim(1, -1).flatten(1, -2)
    return m.proj(torch.cat([out[:, :prefix], out[:, prefix:] + lce], 1))


@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('decomposed', [False, True], ids=['full', 'decomposed'])
@pytest.mark.parametrize('prefix', [0, 2])
def test_layer_is_projections_theta_shift_decayed_attention_lce_and_projection(ndim, decomposed, prefix):
    m = layer(ndim, decomposed, num_prefix_tokens=prefix)
    grid = GRIDS[ndim]
    x = torch.randn(2, prefix + math.prod(grid), 16, dtype=torch.float64)
    want = spelled_out(m, x, grid, prefix)
    got = m(x, grid=grid) if prefix else m(x[:, prefix:].unflatten(1, grid)).flatten(1, -2)
    assert_close(got, want, atol=1e-7, name=f'{ndim}-D layer output')  # tables in float32, as released


@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('impl,decomposed', FORMS, ids=str)
def test_a_padded_batch_gives_each_image_its_unpadded_output_and_zero_in_the_padding(ndim, impl, decomposed):
    m = layer(ndim, decomposed, attn_impl=impl, dtype=torch.float32)
    grid = GRIDS[ndim]
    valid = [grid, [max(1, s - 2) for s in grid]]
    x = torch.randn([2] + grid + [16])
    mask = torch.zeros([2] + grid, dtype=torch.bool)
    for b, extent in enumerate(valid):
        mask[(b,) + tuple(slice(0, e) for e in extent)] = True
    out = m(x, mask=mask)
    for b, extent in enumerate(valid):
        box = (b,) + tuple(slice(0, e) for e in extent)
        assert_close(out[box], m(x[box][None])[0], atol=1e-5, name=f'image {b}')
    assert out[~mask].abs().max() == 0


def test_a_padding_mask_must_mark_a_top_left_box_per_image():
    m = layer(2)
    mask = torch.ones(1, 5, 7, dtype=torch.bool)
    mask[0, 0, 0] = False
    with pytest.raises(ValueError, match='mask must mark each image.s valid tokens as a top-left box'):
        m(torch.randn(1, 5, 7, 16, dtype=torch.float64), mask=mask)
    with pytest.raises(ValueError, match=r'mask must be a \(1, 5, 7\) bool padding mask'):
        m(torch.randn(1, 5, 7, 16, dtype=torch.float64), mask=torch.ones(1, 35, dtype=torch.bool))


def test_prefix_tokens_with_a_padded_batch_keep_the_unpadded_result():
    m = layer(2, num_prefix_tokens=1, dtype=torch.float32)
    x = torch.randn(1, 1 + 5 * 7, 16)
    padded = torch.cat([x[:, :1], nn.functional.pad(x[:, 1:].unflatten(1, (5, 7)), (0, 0, 0, 2, 0, 1)).flatten(1, 2)],
                       1)
    mask = torch.zeros(1, 6, 9, dtype=torch.bool)
    mask[:, :5, :7] = True
    out = m(padded, grid=(6, 9), mask=mask)
    want = m(x, grid=(5, 7))
    assert_close(out[:, :1], want[:, :1], atol=1e-5, name='prefix token')
    assert_close(out[:, 1:].unflatten(1, (6, 9))[:, :5, :7], want[:, 1:].unflatten(1, (5, 7)), atol=1e-5)


def test_channels_first_layer_equals_the_channels_last_one():
    last = layer(3)
    first = layer(3, channels_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 3, 4, 5, 16, dtype=torch.float64)
    assert_close(first(x.movedim(-1, 1)), last(x).movedim(-1, 1), atol=1e-12)


def test_lce_is_a_depthwise_conv_of_five_taps_along_every_axis():
    assert [tuple(layer(n).lce.weight.shape) for n in (1, 2, 3)] == [(16, 1, 5), (16, 1, 5, 5), (16, 1, 5, 5, 5)]
    assert layer(2, lce_kernel_size=0).lce is None


@pytest.mark.parametrize('impl,decomposed', FORMS, ids=str)
def test_a_learnable_decay_gets_a_gradient_at_every_step(impl, decomposed):
    m = layer(2, decomposed, learnable_decay=True, attn_impl=impl, dtype=torch.float32)
    start = m.relpos.decay.detach().clone()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 5, 7, 16)
    for _ in range(3):  # a second backward through a cached graph would fail
        m(x).pow(2).mean().backward()
        assert m.relpos.decay.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(m.relpos.decay.detach(), start)


def test_a_data_dependent_decay_replaces_the_layers_own():
    m = layer(2, decomposed=True)
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    per_sample = torch.tensor([[-0.3, -0.1], [-0.5, -0.2]], dtype=torch.float64)
    per_token = per_sample[:, :, None].expand(2, 2, 35)
    assert_close(m(x, decay=per_sample), m(x, decay=per_token), atol=1e-12)
    default = m.relpos.rates().double()
    assert_close(m(x, decay=default.expand(2, 2)), m(x), atol=1e-7)  # the layer's own bias tables are float32
    with pytest.raises(ValueError, match=r'decay must be per sample \(2, 2\) or per grid token \(2, 2, 35\)'):
        m(x, decay=per_token[:, :, :5])


def test_heads_must_split_the_channels_evenly():
    with pytest.raises(ValueError, match='30 channels do not split into 4 heads of even size'):
        MaSA2d(30, 4)


@pytest.mark.parametrize('make,message', [
    (lambda: MaSA(16, 2, ndim=4), 'grids of 1 to 3 axes'),
    (lambda: MaSA2d(16, 2, lce_kernel_size=4), 'lce_kernel_size must be odd'),
    (lambda: MaSA2d(16, 2, num_prefix_tokens=1, channels_first=True), 'needs channels-last tokens'),
    (lambda: MaSA2d(16, 2, attn_impl='fast'), "unknown attention path 'fast'"),
])
def test_bad_arguments_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize('x,kwargs,message', [
    (torch.randn(2, 16, 5, 7), {}, r'MaSA2d expects \(B, H, W, 16\) features .*got \[2, 16, 5, 7\]'),
    (torch.randn(2, 35, 16), dict(grid=(5, 6)), r'with grid=\(5, 6\) \(0 prefix \+ 30 grid tokens\)'),
    (torch.randn(2, 5, 7, 16), dict(grid=(5, 7)), r'got \[2, 5, 7, 16\] with grid'),
])
def test_misshapen_input_names_the_expected_shape(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer(2, dtype=torch.float32)(x, **kwargs)


class ConvNeXtLike(nn.Module):
    """A patchify stem and two blocks of MaSA and MLP: a model of one's own with MaSA2d."""

    def __init__(self, impl: str, learnable: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = nn.ModuleList([MaSA2d(16, 2, decomposed=i == 0, learnable_decay=learnable, attn_impl=impl)
                                   for i in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
                                  for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(x.mean((1, 2)))


class SequenceModel(nn.Module):
    """Token embeddings, a class token and MaSA1d over the sequence."""

    def __init__(self, impl: str, learnable: bool):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = MaSA1d(16, 2, num_prefix_tokens=1, learnable_decay=learnable, attn_impl=impl)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), self.embed(tokens)], 1)
        x = self.attn(x, grid=(tokens.shape[1],))
        return self.head(x[:, 0] + x[:, 1:].mean(1))


class VolumeModel(nn.Module):
    """A 3-D patchify stem and MaSA3d over (D, H, W), channels first."""

    def __init__(self, impl: str, learnable: bool):
        super().__init__()
        self.stem = nn.Conv3d(1, 16, 2, stride=2)
        self.attn = MaSA3d(16, 2, decomposed=True, channels_first=True, learnable_decay=learnable, attn_impl=impl)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(self.stem(x)).mean((2, 3, 4)))


MODELS = {
    'convnext_like': (ConvNeXtLike, lambda: torch.randn(2, 3, 24, 20)),
    'sequence': (SequenceModel, lambda: torch.randint(0, 50, (2, 11))),
    'volume': (VolumeModel, lambda: torch.randn(2, 1, 6, 8, 10)),
}


def train_four_steps(model, x):
    """Four AdamW steps on two samples; every parameter must get a non-zero gradient at each. Returns the losses."""
    y = torch.tensor([0, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not silent, f'no gradient reached {silent}'
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('impl', ['auto', 'reference', 'bmm', 'sdpa'])
def test_models_of_ones_own_train_with_gradients_reaching_every_parameter(name, impl):
    cls, sample = MODELS[name]
    torch.manual_seed(0)
    losses = train_four_steps(cls(impl, learnable=True), sample())
    assert losses[-1] < losses[0]


# (model, path) -> the one line a forced path gives for an input it cannot take; the rest train
REFUSED = {('sequence', 'blocked'): 'the blocked attention path cannot take prefix tokens',
           ('sequence', 'triton'): 'the triton attention path cannot take prefix tokens'}


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('impl', ['blocked', 'triton'])
def test_models_of_ones_own_train_on_a_forced_path_or_are_refused_in_one_line(name, impl, monkeypatch):
    """The forced paths with a fixed decay (the kernels give no decay gradient; a learnable decay is refused
    like the other inputs they cannot take): blocked falls back to auto on decomposed layers, with a warning."""
    from rmt.attention import kernels
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    if impl == 'triton' and kernels.unsupported_reason(torch.device('cpu'), torch.float32, 8) is not None:
        pytest.skip('needs Triton (its CPU interpreter)')
    cls, sample = MODELS[name]
    torch.manual_seed(0)
    model, x = cls(impl, learnable=False), sample()
    if (name, impl) in REFUSED:
        with pytest.raises(ValueError, match=f'^{REFUSED[name, impl]}; use another path or auto$'):
            model(x)
        return
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # blocked on a decomposed layer: 'using auto'
        losses = train_four_steps(model, x)
    assert losses[-1] < losses[0]


def test_a_learnable_decay_on_the_forced_kernels_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    from rmt.attention import kernels
    if kernels.unsupported_reason(torch.device('cpu'), torch.float32, 8) is not None:
        pytest.skip('needs Triton (its CPU interpreter)')
    model = MODELS['convnext_like'][0]('triton', learnable=True)
    with pytest.raises(ValueError, match='^the triton attention path cannot give the decay a gradient'):
        model(MODELS['convnext_like'][1]())


@pytest.mark.parametrize('ndim', [1, 2, 3])
def test_layers_script_and_match_eager(ndim):
    m = layer(ndim, decomposed=ndim > 1, dtype=torch.float32)
    x = torch.randn([2] + GRIDS[ndim] + [16])
    assert_close(torch.jit.script(m)(x), m(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('decomposed', [False, True], ids=['full', 'decomposed'])
def test_exported_layers_with_dynamic_sizes_match_eager(ndim, decomposed):
    m = layer(ndim, decomposed, dtype=torch.float32).eval()
    grid = GRIDS[ndim]
    dims = {1 + a: torch.export.Dim(f'size{a}', min=2, max=64) for a in range(ndim)}
    dims[0] = torch.export.Dim('batch', min=1, max=8)
    program = torch.export.export(m, (torch.randn([2] + grid + [16]),), dynamic_shapes=({**dims},))
    for sizes in ([3] + [s + 3 for s in grid], [1] + [2] * ndim):
        x = torch.randn(sizes + [16])
        assert_close(program.module()(x), m(x), atol=1e-5, name=f'exported output at {sizes}')

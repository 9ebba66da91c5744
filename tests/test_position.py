"""Position tables: decay rates, rotary angles, the theta shift and the Manhattan bias against the spec."""
import math

import pytest
import torch

from rmt.checkpoint import load_checkpoint_file
from rmt.position import (
    RelPos2d, axis_bias, decay_rates, manhattan_bias, rotary_angles, theta_shift, theta_shift_reference)
from tests.helpers import SMALL_CHECKPOINT

CPU = torch.device('cpu')


def tables_for(H, W, n=3, d=8, with_2d=True):
    return RelPos2d(n * d, n, 2., 4.).build(H, W, CPU, torch.float32, with_2d)


def test_decay_rates_follow_the_formula():
    expected = [math.log(1 - 2 ** (-2 - 6 * h / 8)) for h in range(8)]
    torch.testing.assert_close(decay_rates(8, 2, 6), torch.tensor(expected), rtol=0, atol=1e-7)


def test_position_buffers_equal_the_released_ones():
    state = load_checkpoint_file(SMALL_CHECKPOINT)['model']
    # fixture config: stage 2 has 48 channels in 4 heads, heads_range 6
    # the last bit differs between CPUs and torch builds (e.g. -0.28768209 and -0.28768206)
    torch.testing.assert_close(rotary_angles(12), state['layers.2.Relpos.angle'], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(decay_rates(4, 2, 6), state['layers.2.Relpos.decay'], rtol=1e-6, atol=1e-7)


def test_rotary_angles_repeat_each_frequency_twice():
    a = rotary_angles(8)
    assert torch.equal(a[0::2], a[1::2])
    torch.testing.assert_close(a[0::2], 1 / 10000 ** torch.linspace(0, 1, 4))


def test_theta_shift_rotates_consecutive_pairs_at_the_raster_index():
    H, W, d = 3, 4, 8
    tables = tables_for(H, W, n=1, d=d)
    x = torch.randn(2, H, W, 1, d)
    phase = torch.arange(H * W, dtype=torch.float32).reshape(H, W, 1, 1) * rotary_angles(d)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    torch.testing.assert_close(theta_shift_reference(x, tables.sin, tables.cos), x * phase.cos() + rotated * phase.sin(),
                               rtol=0, atol=1e-6)


def test_inverse_theta_shift_undoes_the_shift_and_is_its_transpose():
    tables = tables_for(3, 5, n=2, d=8)
    x, y = torch.randn(2, 3, 5, 2, 8), torch.randn(2, 3, 5, 2, 8)
    shifted = theta_shift_reference(x, tables.sin, tables.cos)
    torch.testing.assert_close(theta_shift_reference(shifted, tables.sin, tables.cos, inverse=True), x,
                               rtol=0, atol=1e-6)
    # <R x, y> == <x, R^T y>
    back = theta_shift_reference(y, tables.sin, tables.cos, inverse=True)
    torch.testing.assert_close((shifted * y).sum(), (x * back).sum(), rtol=1e-5, atol=1e-5)


def test_rotation_table_holds_cos_sin_pairs_of_each_frequency():
    H, W, d = 3, 4, 8
    tables = tables_for(H, W, n=1, d=d)
    phase = torch.arange(H * W, dtype=torch.float32).reshape(H, W, 1, 1) * rotary_angles(d)[0::2]
    assert tables.rotation.shape == (H, W, 1, d // 2, 2)
    torch.testing.assert_close(tables.rotation, torch.stack((phase.cos(), phase.sin()), -1), rtol=0, atol=1e-6)


def test_complex_theta_shift_matches_reference():
    tables = tables_for(5, 6, n=2, d=8)
    x = torch.randn(2, 5, 6, 2, 8)
    torch.testing.assert_close(theta_shift(x, tables), theta_shift_reference(x, tables.sin, tables.cos),
                               rtol=0, atol=1e-6)


def test_theta_shift_without_complex_table_uses_the_reference_formula():
    tables = RelPos2d(16, 2, 2, 4).build(3, 4, CPU, torch.bfloat16, False)
    x = torch.randn(1, 3, 4, 2, 8, dtype=torch.bfloat16)
    assert tables.rotation.numel() == 0
    assert torch.equal(theta_shift(x, tables), theta_shift_reference(x, tables.sin, tables.cos))


def test_axis_bias_is_decay_times_distance_along_the_axis():
    decay = torch.tensor([-0.5, -0.25])
    bias = axis_bias(decay, 4, CPU, torch.float32)
    distance = torch.tensor([[abs(i - j) for j in range(4)] for i in range(4)], dtype=torch.float32)
    torch.testing.assert_close(bias, decay[:, None, None] * distance)


def test_manhattan_bias_is_decay_times_city_block_distance():
    H, W = 3, 5
    tables = tables_for(H, W, with_2d=False)
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    ij = torch.stack([i.flatten(), j.flatten()], -1).float()
    distance = (ij[:, None] - ij[None]).abs().sum(-1)
    torch.testing.assert_close(manhattan_bias(tables.bias_h, tables.bias_w), tables.decay[:, None, None] * distance,
                               rtol=0, atol=1e-6)


def test_manhattan_bias_of_a_row_slice_is_that_slice_of_the_whole():
    tables = tables_for(6, 4, with_2d=True)
    buffer = torch.empty(3 * 2 * 4 * 24)
    part = manhattan_bias(tables.bias_h, tables.bias_w, (2, 4), buffer)
    assert part.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(part, tables.bias_2d[:, 8:16])


def test_decomposed_tables_hold_no_hw_by_hw_bias():
    assert tables_for(6, 6, with_2d=False).bias_2d.numel() == 0


def test_tables_are_built_once_per_size_and_dtype():
    relpos = RelPos2d(16, 2, 2, 4)
    first = relpos(6, 5, CPU, torch.float32, True)
    assert relpos(6, 5, CPU, torch.float32, True) is first
    assert relpos(6, 5, CPU, torch.float64, True).sin.dtype == torch.float64
    assert relpos(6, 4, CPU, torch.float32, True).sin.shape[:2] == (6, 4)


def test_tables_from_inference_mode_are_not_reused_for_training():
    relpos = RelPos2d(16, 2, 2, 4)
    with torch.inference_mode():
        inference_tables = relpos(3, 3, CPU, torch.float32, True)
    train_tables = relpos(3, 3, CPU, torch.float32, True)
    assert inference_tables.sin.is_inference() and not train_tables.sin.is_inference()


def test_table_cache_is_bounded():
    relpos = RelPos2d(16, 2, 2, 4)
    for size in range(1, 20):
        relpos(size, size, CPU, torch.float32, False)
    assert len(relpos._cache) == RelPos2d.cache_size


def test_heads_must_split_the_width_evenly():
    with pytest.raises(ValueError, match='dim 30 must split into 4 heads of even size'):
        RelPos2d(30, 4, 2, 4)


def test_former_names_still_resolve_with_a_warning():
    import rmt
    import rmt.decay
    with pytest.warns(FutureWarning, match='rmt.position.RelPos2d'):
        assert rmt.decay.SpatialDecay is RelPos2d
    with pytest.warns(FutureWarning, match='rmt.RelPos2d'):
        assert rmt.SpatialDecay is RelPos2d

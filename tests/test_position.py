"""Position tables: decay rates, rotary angles, the theta shift and the Manhattan bias against the spec."""
import math

import pytest
import torch

from rmt.checkpoint import load_checkpoint_file
from rmt.position import (
    RelPos, axis_bias, decay_bias, decay_rates, manhattan_bias, pair_order, pairs_split, raster_positions,
    rotary_angles, theta_shift, theta_shift_reference)
from tests.helpers import SMALL_CHECKPOINT, assert_close, tables_for

CPU = torch.device('cpu')


def city_block(grid):
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in grid], indexing='ij'), -1).reshape(-1, len(grid))
    return (coords[:, None] - coords[None]).abs().sum(-1).float()


def test_decay_rates_follow_the_formula():
    expected = [math.log(1 - 2 ** (-2 - 6 * h / 8)) for h in range(8)]
    assert_close(decay_rates(8, 2, 6), torch.tensor(expected), atol=1e-7, name='decay rates')


def test_position_buffers_equal_the_released_ones():
    state = load_checkpoint_file(SMALL_CHECKPOINT)['model']
    # fixture config: stage 2 has 48 channels in 4 heads, heads_range 6
    # the last bit differs between CPUs and torch builds (e.g. -0.28768209 and -0.28768206)
    assert_close(rotary_angles(12), state['layers.2.Relpos.angle'], atol=1e-7, rtol=1e-6, name='angle')
    assert_close(decay_rates(4, 2, 6), state['layers.2.Relpos.decay'], atol=1e-7, rtol=1e-6, name='decay')


def test_rotary_angles_repeat_each_frequency_twice():
    a = rotary_angles(8)
    assert torch.equal(a[0::2], a[1::2])
    assert_close(a[0::2], 1 / 10000 ** torch.linspace(0, 1, 4), atol=1e-7)


def test_theta_shift_rotates_consecutive_pairs_at_the_raster_index():
    H, W, d = 3, 4, 8
    tables = tables_for([H, W], n=1, d=d)
    x = torch.randn(2, H, W, 1, d)
    phase = torch.arange(H * W, dtype=torch.float32).reshape(H, W, 1, 1) * rotary_angles(d)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    assert_close(theta_shift_reference(x, tables.sin, tables.cos), x * phase.cos() + rotated * phase.sin(), atol=1e-6)


def test_raster_index_of_a_volume_runs_over_depth_then_rows_then_columns():
    assert torch.equal(raster_positions([2, 3, 4], CPU), torch.arange(24.).reshape(2, 3, 4))
    tables = tables_for([2, 3, 4], n=1, d=4)
    assert tables.sin.shape == (2, 3, 4, 1, 4)
    assert_close(tables.cos[1, 2, 3, 0], (23 * rotary_angles(4)).cos(), atol=1e-6)


def test_padded_images_keep_their_own_raster_index():
    extents = torch.tensor([[2, 3], [3, 4]])  # (valid rows, valid columns) of two images in a 3x4 batch
    positions = raster_positions([3, 4], CPU, extents)
    assert positions[0, 1, 2].item() == 1 * 3 + 2  # row 1 of a 3-wide image
    assert positions[1, 1, 2].item() == 1 * 4 + 2
    assert positions[0, 2].abs().sum().item() == 0 and positions[0, :, 3].abs().sum().item() == 0  # padding


def test_inverse_theta_shift_undoes_the_shift_and_is_its_transpose():
    tables = tables_for([3, 5], n=2, d=8)
    x, y = torch.randn(2, 3, 5, 2, 8), torch.randn(2, 3, 5, 2, 8)
    shifted = theta_shift_reference(x, tables.sin, tables.cos)
    assert_close(theta_shift_reference(shifted, tables.sin, tables.cos, inverse=True), x, atol=1e-6)
    # <R x, y> == <x, R^T y>
    back = theta_shift_reference(y, tables.sin, tables.cos, inverse=True)
    assert_close((shifted * y).sum(), (x * back).sum(), atol=1e-5, rtol=1e-5)


def test_rotation_table_holds_cos_sin_pairs_of_each_frequency():
    H, W, d = 3, 4, 8
    tables = tables_for([H, W], n=1, d=d)
    phase = torch.arange(H * W, dtype=torch.float32).reshape(H, W, 1, 1) * rotary_angles(d)[0::2]
    assert tables.rotation.shape == (H, W, 1, d // 2, 2)
    assert_close(tables.rotation, torch.stack((phase.cos(), phase.sin()), -1), atol=1e-6)


def test_complex_theta_shift_matches_reference():
    tables = tables_for([5, 6], n=2, d=8)
    x = torch.randn(2, 5, 6, 2, 8)
    assert_close(theta_shift(x, tables), theta_shift_reference(x, tables.sin, tables.cos), atol=1e-6)


def test_theta_shift_without_complex_table_gives_the_reference_in_pair_order():
    tables = tables_for([3, 4], n=2, d=8, dtype=torch.float64, with_full=False)
    x = torch.randn(1, 3, 4, 2, 8, dtype=torch.float64)
    reference = theta_shift_reference(x, tables.sin, tables.cos)
    assert pairs_split(x, tables._replace(rotation=tables.rotation.new_empty(0)))
    shifted = theta_shift(x, tables._replace(rotation=tables.rotation.new_empty(0)))
    assert_close(shifted, pair_order(reference), atol=1e-12)
    assert_close(shifted[..., :4], reference[..., 0::2], atol=1e-12, name='first members of the pairs')
    # q . k is the same in either order
    y = torch.randn_like(x)
    assert_close((shifted * pair_order(y)).sum(-1), (reference * y).sum(-1), atol=1e-12)


def test_axis_bias_is_decay_times_distance_along_the_axis():
    decay = torch.tensor([-0.5, -0.25])
    distance = torch.tensor([[abs(i - j) for j in range(4)] for i in range(4)], dtype=torch.float32)
    assert_close(axis_bias(decay, 4, CPU, torch.float32), decay[None, :, None, None] * distance, atol=0)


@pytest.mark.parametrize('grid', [[7], [3, 5], [2, 3, 4]])
def test_manhattan_bias_is_decay_times_city_block_distance(grid):
    tables = tables_for(grid, with_full=False)
    assert_close(manhattan_bias(tables.axis_bias), tables.decay[None, :, None, None] * city_block(grid), atol=1e-6)


@pytest.mark.parametrize('grid', [[6, 4], [5, 2, 3]])
def test_manhattan_bias_of_a_row_slice_is_that_slice_of_the_whole_written_in_the_buffer(grid):
    tables = tables_for(grid)
    inner = math.prod(grid[1:])
    buffer = torch.empty(3 * 2 * inner * math.prod(grid))
    part = manhattan_bias(tables.axis_bias, (2, 4), buffer)
    assert part.data_ptr() == buffer.data_ptr()
    assert_close(part, tables.bias[:, :, 2 * inner:4 * inner], atol=0)


def test_per_token_decay_scales_each_querys_distances():
    grid = [2, 3]
    decay = -torch.rand(2, 3, 6)
    bias = decay_bias(decay, grid)
    assert bias.shape == (2, 3, 6, 6)
    assert_close(bias, decay[..., None] * city_block(grid), atol=1e-6)
    # along the rows (the last axis): sequences (batch, row), each query's rate times |j - j'|
    rows = decay_bias(decay, grid, axis=1)
    assert rows.shape == (2 * 2, 3, 3, 3)
    assert_close(rows[1 * 2 + 1, 2], decay[1, 2, 3:6, None] * city_block([3]), atol=1e-6)


def test_decomposed_tables_hold_no_full_bias():
    assert tables_for([6, 6], with_full=False).bias.numel() == 0


def test_tables_are_built_once_per_size_and_dtype():
    relpos = RelPos(16, 2, 2, 4)
    first = relpos([6, 5], CPU, torch.float32, True)
    assert relpos([6, 5], CPU, torch.float32, True) is first
    assert relpos([6, 5], CPU, torch.float64, True).sin.dtype == torch.float64
    assert relpos([6, 4], CPU, torch.float32, True).sin.shape[:2] == (6, 4)


def test_tables_from_inference_mode_are_not_reused_for_training():
    relpos = RelPos(16, 2, 2, 4)
    with torch.inference_mode():
        inference_tables = relpos([3, 3], CPU, torch.float32, True)
    train_tables = relpos([3, 3], CPU, torch.float32, True)
    assert inference_tables.sin.is_inference() and not train_tables.sin.is_inference()


def test_table_cache_is_bounded():
    relpos = RelPos(16, 2, 2, 4)
    for size in range(1, 20):
        relpos([size, size], CPU, torch.float32, False)
    assert len(relpos._cache) == RelPos.cache_size


def test_learnable_decay_builds_its_bias_from_the_parameter_at_every_call():
    relpos = RelPos(16, 2, 2, 4, learnable_decay=True)
    for step in range(2):  # a cached graph would fail the second backward
        tables = relpos([3, 4], CPU, torch.float32, True)
        (tables.bias.sum() + tables.axis_bias[0].sum()).backward()
        assert relpos.decay.grad is not None and relpos.decay.grad.abs().sum() > 0
        relpos.decay.grad = None
    with torch.no_grad():
        relpos.decay.mul_(2)
    assert_close(relpos([3, 4], CPU, torch.float32, False).axis_bias[1], axis_bias(relpos.decay, 4, CPU, torch.float32),
                 atol=0, name='bias after the parameter changed')


def test_heads_must_split_the_width_evenly():
    with pytest.raises(ValueError, match='30 channels do not split into 4 heads of even size'):
        RelPos(30, 4, 2, 4)

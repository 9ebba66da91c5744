"""fvcore FLOPs: fused attention counted as its two matmuls; the released variants' counts at 224 px."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import rmt
from rmt.flops import count_flops, flops_by_operator

pytestmark = pytest.mark.slow  # end-to-end runs and subprocesses


FIXTURES = Path(__file__).parent / 'fixtures'

# fvcore's FlopCountAnalysis on the released code at 224 x 224, and the released models' parameter counts
RELEASED = {'rmt_t': (2.65e9, 14_334_216), 'rmt_s': (4.80e9, 26_967_240),
            'rmt_b': (10.41e9, 54_154_896), 'rmt_l': (19.55e9, 95_464_864)}


class _Attend(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_fused_attention_counts_as_qk_and_av_matmuls():
    from rmt.flops import flop_analysis

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    analysis = flop_analysis(_Attend(), (q, k, v))
    # q @ k^T: (2*3) * 5 x 8 x 7 multiply-adds; attn @ v: (2*3) * 5 x 7 x 4
    assert analysis.total() == 6 * 5 * 8 * 7 + 6 * 5 * 7 * 4 == 2520


def test_fused_and_explicit_matmul_attention_count_the_same():
    cfg = rmt.official_config_to_kwargs(json.loads((FIXTURES / 'official_small_config.json').read_text()))
    model = timm.create_model('rmt_t', **cfg)
    counts = {}
    for impl in ('sdpa', 'bmm', 'reference'):
        model.set_attn_impl(impl)
        counts[impl] = flops_by_operator(model, (3, 96, 80))
    fused, packed, explicit = counts['sdpa'], counts['bmm'], counts['reference']
    assert 'matmul' not in fused and fused['scaled_dot_product_attention'] > 0
    assert 'scaled_dot_product_attention' not in explicit
    assert fused['scaled_dot_product_attention'] == explicit['matmul'] == packed['bmm']
    assert sum(fused.values()) == sum(explicit.values()) == sum(packed.values())


@pytest.mark.parametrize('name', ['rmt_t', 'rmt_s'])  # B and L take longer: scripts/flops.py reports all four
def test_flops_and_params_at_224_match_fvcore_on_released_code(name):
    released_flops, released_params = RELEASED[name]
    params, flops, table = count_flops(timm.create_model(name), (3, 224, 224))
    assert params == released_params
    assert abs(flops / released_flops - 1) < 0.03
    assert table.splitlines()[2].split('|')[1].strip() == 'model'

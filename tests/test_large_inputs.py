"""Detection-size inputs: large full-attention stages take the blocked path with the default budget,
and it is exact; nothing of size (HW x HW) is built in decomposed stages."""
import timm
import torch

import rmt  # noqa: F401
from rmt.attention import masa, plan_masa
from rmt.position import decay_rates
from tests.helpers import assert_close


def test_default_budget_sends_a_40x40_full_stage_to_the_blocked_path():
    # RMT-T stage 3 at 640 px: 8 heads over 1600 tokens, an 82 MB bias
    assert plan_masa('auto', torch.empty(1, 40, 40, 256), [40, 40], 8, False).impl == 'blocked'
    assert plan_masa('auto', torch.empty(1, 14, 14, 256), [14, 14], 8, False).impl == 'sdpa'


def test_blocked_path_at_default_budget_matches_reference_over_1600_tokens():
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 8, 40, 40, 32, generator=g) for _ in range(3)]
    decay = decay_rates(8, 2, 6)
    assert_close(masa(q, k, v, decay, impl='blocked'), masa(q, k, v, decay, impl='reference'), atol=1e-5)


def test_model_at_640px_on_the_automatic_path_matches_reference():
    model = timm.create_model('rmt_t', depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 640, 608)
    with torch.no_grad():
        fast = model.forward_intermediates(x, intermediates_only=True)
        model.set_attn_impl('reference')
        ref = model.forward_intermediates(x, intermediates_only=True)
    assert len(fast) == len(ref) == 4
    for a, b in zip(fast, ref, strict=True):
        assert_close(a, b, atol=1e-4)


def test_decomposed_stages_hold_no_2d_bias_at_detection_size():
    model = timm.create_model('rmt_t', depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 512, 512))
    for stage, side in zip(model.stages[:2], (128, 64)):  # decomposed in RMT-T
        tables = list(stage.relpos._cache.values())
        assert len(tables) == 1
        assert tables[0].bias.numel() == 0 and tables[0].axis_bias[0].shape == (1, stage.num_heads, side, side)

"""Numerical parity with the released code, through timm's pretrained-loading path (tolerance 1e-4)."""
import pytest
import torch

from tests.helpers import SMALL_TL_CHECKPOINT, assert_close, load_small

SIZES = ['64x64', '96x80', '70x50']
ATOL = 1e-4


@pytest.mark.parametrize('size', SIZES)
def test_logits_match_released_code(small_model, expected, size):
    with torch.no_grad():
        logits = small_model(expected[size]['input'])
    assert_close(logits, expected[size]['logits'], atol=ATOL)


@pytest.mark.parametrize('size', SIZES)
def test_stage_features_match_released_code(small_model, expected, size):
    with torch.no_grad():
        features = small_model.forward_intermediates(expected[size]['input'], intermediates_only=True)
    for ours, theirs in zip(features, expected[size]['stage_features'], strict=True):
        assert ours.shape == theirs.shape
        assert_close(ours, theirs, atol=ATOL)


def test_token_label_logits_match_released_code(expected_tl):
    model = load_small(SMALL_TL_CHECKPOINT, token_label=True)
    assert list(expected_tl) == ['64x64']  # the token-labeling fixture has one size
    with torch.no_grad():
        logits = model(expected_tl['64x64']['input'])
    assert_close(logits, expected_tl['64x64']['logits'], atol=ATOL)


@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'bmm', 'blocked'])
def test_every_attention_path_matches_released_code(expected, impl, thresholds):
    thresholds(block_bytes=1)  # one image row per block
    model = load_small()
    model.set_attn_impl(impl)
    for size in SIZES:
        with torch.no_grad():
            logits = model(expected[size]['input'])
        assert_close(logits, expected[size]['logits'], atol=ATOL, name=str(size))

"""Shared fixtures: the released-format reference files and a small RMT built from their config."""
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # check the Triton kernels in Triton's CPU interpreter
    os.environ.setdefault('TRITON_INTERPRET', '1')

import timm  # noqa: E402
import rmt  # noqa: E402

FIXTURES = Path(__file__).parent / 'fixtures'
SMALL_CHECKPOINT = FIXTURES / 'official_small_checkpoint.pth'
SMALL_TL_CHECKPOINT = FIXTURES / 'official_small_tokenlabel_checkpoint.pth'


def small_kwargs(**overrides):
    """Model kwargs of the fixtures' small configuration (10 classes)."""
    cfg = json.loads((FIXTURES / 'official_small_config.json').read_text())
    return dict(rmt.official_config_to_kwargs(cfg), **overrides)


def load_small(checkpoint=SMALL_CHECKPOINT, **overrides):
    """The small released-format checkpoint, loaded through timm's pretrained path."""
    return timm.create_model(
        'rmt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint), num_classes=10),
        **small_kwargs(**overrides)).eval()


@pytest.fixture(scope='session')
def expected():
    return torch.load(FIXTURES / 'official_small_expected.pt', weights_only=True)


@pytest.fixture(scope='session')
def expected_tl():
    return torch.load(FIXTURES / 'official_small_tokenlabel_expected.pt', weights_only=True)


@pytest.fixture(scope='session')
def small_model():
    return load_small()

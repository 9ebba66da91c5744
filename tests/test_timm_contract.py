"""scripts/timm_contract.py: timm's model tests narrowed to the RMT models (on a stand-in test file; the real
one comes from timm's source archive, and a full run takes minutes, see the README)."""
import pytest

from tests.helpers import script

pytestmark = pytest.mark.slow  # end-to-end runs and subprocesses


STAND_IN = '''
import pytest
from timm import list_models


@pytest.mark.base
@pytest.mark.parametrize('model_name', list_models(exclude_filters=['rmt_l']))
def test_model_forward(model_name):
    assert model_name in ('rmt_t', 'rmt_s', 'rmt_b')


@pytest.mark.features
@pytest.mark.parametrize('model_name', list_models(module=['resnet', 'convnext']))
def test_model_forward_intermediates(model_name):
    assert model_name.startswith('rmt_')


@pytest.mark.parametrize('model_name', list_models(include_tags=True))
def test_model_load_pretrained(model_name):
    raise AssertionError('downloads weights')


def test_some_other_model():
    raise AssertionError('not parametrized with an RMT model')
'''


def test_runs_timms_model_tests_on_the_rmt_models_only(tmp_path):
    (tmp_path / 'test_models.py').write_text(STAND_IN)
    proc = script('timm_contract', '--test-file', tmp_path / 'test_models.py')
    result = proc.stdout.strip().splitlines()[-1]
    # 3 + 4 (rmt's module joins the forward_intermediates list) run; 7 pretrained tags and 1 other test deselected
    assert result.startswith('RESULT passed=7 failed=0 errors=0 skipped=0 deselected=8 ')

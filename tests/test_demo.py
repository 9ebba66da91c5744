"""``python -m rmt``: the README's first command, and the released or converted files it takes."""
import pytest

from tests.helpers import SMALL_CHECKPOINT, SMALL_CONFIG, load_script, run

pytestmark = pytest.mark.slow  # end-to-end runs and subprocesses


def test_demo_classifies_with_random_weights():
    proc = run(['-m', 'rmt', '--model', 'rmt_t', '--top-k', '3'])
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == 'rmt_t: 14,334,216 parameters, weights: random (no --checkpoint)'
    assert len(lines) == 2 + 3  # model, input, top 3


def test_demo_takes_a_released_config_and_a_converted_file_with_no_model_flags(tmp_path):
    released = run(['-m', 'rmt', '--official-config', SMALL_CONFIG, '--checkpoint', SMALL_CHECKPOINT, '--top-k', '10'])
    converted = tmp_path / 'small.safetensors'
    load_script('convert_checkpoint').main([str(SMALL_CHECKPOINT), str(converted), '--model', 'rmt_t',
                                            '--official-config', str(SMALL_CONFIG), '--verify-size', '32'])
    from_file = run(['-m', 'rmt', '--checkpoint', converted, '--top-k', '10'])
    assert from_file.stdout.splitlines()[0].startswith('rmt_t: 189,890 parameters') and 'small.safetensors' in from_file.stdout
    # the same model and weights: the same ranking of the same classes (the timing line aside)
    assert released.stdout.splitlines()[2:] == from_file.stdout.splitlines()[2:]

"""scripts/validate.py: the numbers training logged, recomputed from the saved weights."""
import json
import os

import pytest

from tests.helpers import (
    SMALL_CHECKPOINT, SMALL_CONFIG, digits_folder, load_script, read_summary, run, script, smoke_run)

validate = load_script('validate')
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]


def test_validate_on_saved_checkpoint_agrees_with_the_training_log():
    proc = script('validate', '--data-dir', digits_folder(), '--checkpoint',
                  os.path.join(smoke_run(), 'last.pth.tar'), '--workers', '0', '--device', 'cpu')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logged = read_summary(smoke_run())[-1]
    assert result['images'] == 360 and result['img_size'] == 32  # settings taken from the run
    assert result['top1'] == logged['eval_top1'] and result['top5'] == logged['eval_top5']
    assert abs(result['loss'] - logged['eval_loss']) < 1e-6


def test_validate_with_ema_weights_agrees_with_the_logged_ema_metrics():
    result = validate.main(['--data-dir', digits_folder(), '--checkpoint', os.path.join(smoke_run(), 'last.pth.tar'),
                            '--use-ema', '--workers', '0', '--device', 'cpu', '-b', '100'])
    logged = read_summary(smoke_run())[-1]
    assert result['ema'] and result['top1'] == logged['eval_ema_top1']
    assert abs(result['loss'] - logged['eval_ema_loss']) < 1e-6


def test_a_released_checkpoint_and_its_converted_file_validate_alike(tmp_path):
    """The released file with its released config, and the same weights converted to a .safetensors that
    names its own model: the same images, the same scores and the same loss (random digits, 10 classes)."""
    released = validate.main([
        '--data-dir', digits_folder(), '--checkpoint', str(SMALL_CHECKPOINT), '--model', 'rmt_t',
        '--official-config', str(SMALL_CONFIG), '--img-size', '32', '--workers', '0', '--device', 'cpu'])
    converted = str(tmp_path / 'small.safetensors')
    load_script('convert_checkpoint').main([str(SMALL_CHECKPOINT), converted, '--model', 'rmt_t', '--official-config',
                                            str(SMALL_CONFIG), '--verify-size', '32'])
    result = validate.main(['--data-dir', digits_folder(), '--checkpoint', converted, '--img-size', '32',
                            '--workers', '0', '--device', 'cpu'])
    assert released['images'] == result['images'] == 360 and result['model'] == 'rmt_t'
    assert (result['top1'], result['top5']) == (released['top1'], released['top5'])
    assert abs(result['loss'] - released['loss']) < 1e-6 and result['loss'] > 0


def test_importing_the_validation_and_conversion_scripts_leaves_pillow_alone():
    run(['-c', 'from PIL import ImageOps; before = ImageOps.posterize; from tests.helpers import load_script; '
               'load_script("validate"); load_script("convert_checkpoint"); assert ImageOps.posterize is before'])

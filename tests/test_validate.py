"""scripts/validate.py: the numbers training logged, recomputed from the saved weights."""
import json
import os
import sys


from _rmt_training import (FIXTURES, SCRIPTS, digits_folder, one_thread, read_summary,  # noqa: F401
                           script, smoke_run)  # one_thread: autouse fixture

sys.path.insert(0, SCRIPTS)
import validate  # noqa: E402




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


def test_validate_reads_a_released_checkpoint_given_its_model_arguments():
    result = validate.main([
        '--data-dir', digits_folder(), '--checkpoint', os.path.join(FIXTURES, 'official_small_checkpoint.pth'),
        '--model', 'rmt_t', '--model-kwargs', 'embed_dims=(16,32,48,64)', 'depths=(1,2,2,1)', 'num_heads=(2,2,4,4)',
        'layer_scales=(False,False,True,True)', 'projection=128', '--num-classes', '10', '--img-size', '32',
        '--workers', '0', '--device', 'cpu'])
    assert result['images'] == 360 and 0 <= result['top1'] <= 100 and result['loss'] > 0

"""rmt.tools, what the scripts share: errors as exceptions until ``run_main``, checked values, AMP, datasets,
Pillow's fix; and the library's independence of it."""
import argparse
import ast
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import pytest
import torch
from PIL import Image

import rmt
from rmt.tools.cli import (
    ArgumentParser, ParseModelKwargs, ScriptError, autocast_for, data_workers, parse_args_with_config, positive_int,
    run_main)
from rmt.tools.data import open_dataset
from rmt.tools.train_utils import allow_posterize_to_zero_bits


def test_script_error_is_an_ordinary_exception_of_one_line():
    error = ScriptError('first\n  second\n')
    assert isinstance(error, Exception) and not isinstance(error, SystemExit)
    assert str(error) == 'first; second'


def test_library_raises_ordinary_exceptions_for_bad_data_folders(tmp_path):
    args = SimpleNamespace(dataset='', data_dir=str(tmp_path / 'nowhere'), batch_size=8)
    with pytest.raises(FileNotFoundError, match='nowhere does not exist'):
        open_dataset(args, 'train', True)
    args.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match='has no "train" split'):
        open_dataset(args, 'train', True)


def test_run_main_turns_a_script_error_into_one_line_and_status_2(capsys):
    def main(argv):
        raise ScriptError(f'--flag {argv[0]}: expected something else')
    with pytest.raises(SystemExit) as exit_:
        run_main(main, ['bad'], prog='tool')
    assert exit_.value.code == 2
    assert capsys.readouterr().err == 'tool: error: --flag bad: expected something else\n'


def test_run_main_leaves_a_bug_its_traceback():
    def main(argv):
        return {}['bug']
    with pytest.raises(KeyError):
        run_main(main, [])


def test_parser_errors_are_script_errors_without_the_usage_text():
    parser = ArgumentParser(prog='tool')
    parser.add_argument('--n', type=int)
    with pytest.raises(ScriptError, match="^argument --n: invalid int value: 'x'$"):
        parser.parse_args(['--n', 'x'])


def _kwargs(*items):
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseModelKwargs)
    return parser.parse_args(['--model-kwargs', *items]).model_kwargs


def test_model_kwargs_are_literals_or_bare_words():
    assert _kwargs('depths=(1,1,1,1)', 'projection=64', 'decay=flat', 'norm=None') == \
        dict(depths=(1, 1, 1, 1), projection=64, decay='flat', norm=None)


@pytest.mark.parametrize('item', ['depths=(1,1,1', 'embed=[16, 32', 'x=1+', 'depths'])
def test_a_malformed_model_kwarg_is_an_error_not_a_string(item):
    with pytest.raises(SystemExit):  # argparse's own parser exits; the scripts' ArgumentParser raises ScriptError
        _kwargs(item)


def test_config_values_go_through_the_flags_checks_and_types(tmp_path):
    parser = ArgumentParser()
    parser.add_argument('-c', '--config')
    parser.add_argument('--lr', type=float)
    parser.add_argument('-b', '--batch-size', type=positive_int)
    parser.add_argument('--mode', choices=('a', 'b'))
    (tmp_path / 'ok.yaml').write_text('lr: 1e-3\nbatch_size: 8\n')  # YAML reads 1e-3 as a string
    args = parse_args_with_config(parser, ['--config', str(tmp_path / 'ok.yaml')])
    assert args.lr == 1e-3 and args.batch_size == 8
    for text, message in (('batch_size: 0', "batch_size: expected a positive integer, got '0'"),
                          ('lr: fast', "lr: 'fast' is not a valid float"),
                          ('mode: c', "mode: 'c' is not one of a, b")):
        (tmp_path / 'bad.yaml').write_text(text + '\n')
        with pytest.raises(ScriptError, match=f'--config .*bad.yaml: {message}'):
            parse_args_with_config(parser, ['--config', str(tmp_path / 'bad.yaml')])


def test_workers_never_exceed_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    assert data_workers('0') == 0 and data_workers('1') == 1
    assert data_workers(str(cores + 7)) == cores


def _amp(amp, dtype, device):
    return autocast_for(SimpleNamespace(amp=amp, amp_dtype=dtype), torch.device(device))


def test_amp_on_the_cpu_is_off_unless_bfloat16_is_asked_for():
    autocast, scale = _amp(True, None, 'cpu')
    with autocast():
        assert not torch.is_autocast_enabled('cpu')
    autocast, scale = _amp(True, 'bfloat16', 'cpu')
    with autocast():
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
    assert not scale
    with pytest.raises(ScriptError, match='--amp-dtype float16: float16 autocast on the CPU'):
        _amp(True, 'float16', 'cpu')


def test_amp_on_cuda_defaults_to_float16_with_loss_scaling():
    autocast, scale = _amp(True, None, 'cuda')
    assert scale and autocast.keywords == dict(device_type='cuda', dtype=torch.float16)
    autocast, scale = _amp(True, 'bfloat16', 'cuda')
    assert not scale and autocast.keywords['dtype'] == torch.bfloat16
    assert _amp(False, 'float16', 'cuda')[1] is False


def test_pillow_is_patched_only_inside_the_block():
    from PIL import Image, ImageOps
    image = Image.new('RGB', (4, 4), (200, 120, 40))
    before = ImageOps.posterize
    with allow_posterize_to_zero_bits():
        assert ImageOps.posterize(image, 0).getpixel((0, 0)) == (0, 0, 0)
    assert ImageOps.posterize is before


def test_a_skipped_truncated_image_is_named_in_the_warning(tmp_path, caplog):
    folder = tmp_path / 'train' / 'digit0'
    folder.mkdir(parents=True)
    pixels = np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / 'a_whole.jpg')
    (folder / 'b_truncated.jpg').write_bytes((folder / 'a_whole.jpg').read_bytes()[:600])
    Image.fromarray(pixels).save(folder / 'c_whole.jpg')
    dataset = open_dataset(SimpleNamespace(dataset='', data_dir=str(tmp_path), batch_size=2), 'train', True)
    assert dataset.filename(1, basename=True) == 'b_truncated.jpg'
    with caplog.at_level(logging.WARNING):
        image, target = dataset[1]
    assert image.size == (64, 64) and target == 0  # the next image in its place, as timm does
    assert len(caplog.records) == 1
    assert str(folder / 'b_truncated.jpg') in caplog.records[0].getMessage()
    assert 'truncated' in caplog.records[0].getMessage().lower()


def test_the_library_imports_nothing_from_the_command_line_layer():
    package = Path(rmt.__file__).parent
    library = [p for p in package.rglob('*.py') if 'tools' not in p.relative_to(package).parts[:1]
               and p.name != '__main__.py']
    assert len(library) > 10
    for path in library:
        module = '.'.join(('rmt',) + path.relative_to(package).with_suffix('').parts).removesuffix('.__init__')
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = module.rsplit('.', node.level - (path.name == '__init__.py'))[0] if node.level else ''
                names = [f'{base}.{node.module}' if node.module and base else node.module or base]
                names += [f'{names[0]}.{alias.name}' for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n == 'rmt.tools' or n.startswith('rmt.tools.') for n in names), \
                f'{path.relative_to(package.parent)} imports {names[0]} (line {node.lineno})'
